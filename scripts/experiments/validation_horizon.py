"""Which validation horizon ranks RNNprop rules the way the 10,000-step evaluation does? Reads every RNNprop
evaluation on MLP-orig under ``results/`` (one row per distinct weights, the curves the evaluator stores every 20
steps) and prints a markdown table for docs/findings.md:

    python scripts/experiments/validation_horizon.py [--results results] [--seeds 2]

For each rule and horizon H: ln of the loss a validation at N_valid = H would measure on the first ``--seeds``
evaluation seeds (the mean over those runs of their mean loss over steps H-100..H, the last samples before H);
last column: the evaluation's result (mean ln final loss over all its seeds). Under the table, for each H, the
Spearman rank correlation between the two over the random-scaled rules (and over all rules), and the evaluation
result of the rule a validation at H would pick. The curves are those of the test split; the trainer validates on
the training split, on other optimizees.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from learned_optim.weights import WeightsError, read_metadata, weights_digest  # noqa: E402

HORIZONS = (200, 500, 1000, 2000, 3000, 5000, 7000)


def _minus(text: str) -> str:
    return text.replace("-", "\u2212")


def _rank(values: list[float]) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    return float(np.corrcoef(_rank(a), _rank(b))[0, 1])


def _random_scale(results: Path, path: Path, d: dict) -> float | None:
    """B of the evaluated weights: 0 for a superseded unscaled file, else the recipe of the weight file when it
    still holds the evaluated weights; None when that cannot be told."""
    if path.parent.name == "superseded" and "-unscaled__" in path.name:
        return 0.0
    try:
        if weights_digest(d["weights_path"]) != d["weights_digest"]:
            return None
        return float(read_metadata(d["weights_path"])["recipe"].get("random_scale") or 0)
    except (WeightsError, OSError, KeyError, TypeError, ValueError):
        return None


def collect(results: Path, seeds: int) -> list[dict]:
    best: dict[str, tuple[Path, dict]] = {}  # one row per distinct weights: the evaluation with the most seeds
    for path in sorted(results.rglob("*__mlp-orig.json")):
        d = json.loads(path.read_text())
        if d.get("type") != "evaluation" or d.get("rule") != "rnnprop" or d.get("lr") != 1.0:
            continue
        curves, every = d.get("losses"), (d.get("curves") or {}).get("every")
        if not curves or not every or len(curves) < seeds:
            continue
        if any(len(c) * every < max(HORIZONS) for c in curves[:seeds]):
            continue  # a run that diverged early has no loss at the longer horizons
        kept = best.get(d["weights_digest"])
        if kept is None or len(d["seeds"]) > len(kept[1]["seeds"]):
            best[d["weights_digest"]] = (path, d)
    rows = []
    for path, d in best.values():
        curves, every = d["losses"], d["curves"]["every"]
        at = {}
        for h in HORIZONS:
            window = [float(np.mean(c[max(0, h // every - 100 // every):h // every])) for c in curves[:seeds]]
            at[h] = math.log(float(np.mean(window)))
        rows.append({"label": str(path.relative_to(results)).removesuffix("__mlp-orig.json"), "seeds": len(d["seeds"]),
                     "final": d["final_ln_loss_mean"], "at": at, "random_scale": _random_scale(results, path, d)})
    return sorted(rows, key=lambda r: r["final"])


def table(rows: list[dict], seeds: int) -> list[str]:
    head = " | ".join(f"N = {h}" for h in HORIZONS)
    lines = [f"| evaluation (under `results/`) | B | {head} | 10,000 steps (seeds) |",
             "|---|---|" + "---|" * len(HORIZONS) + "---|"]
    for r in rows:
        b = "?" if r["random_scale"] is None else f"{r['random_scale']:g}"
        cells = " | ".join(_minus(f"{r['at'][h]:.2f}") for h in HORIZONS)
        lines.append(f"| `{r['label']}` | {b} | {cells} | {_minus(format(r['final'], '.2f'))} ({r['seeds']}) |")
    scaled = [r for r in rows if r["random_scale"]]
    for name, group in ((f"Spearman, random-scaled rules ({len(scaled)})", scaled), (f"Spearman, all ({len(rows)})", rows)):
        if len(group) < 3:
            continue
        finals = [r["final"] for r in group]
        cells = " | ".join(_minus(f"{spearman([r['at'][h] for r in group], finals):+.2f}") for h in HORIZONS)
        lines.append(f"| {name} | | {cells} | |")
    if len(scaled) >= 2:
        picks = " | ".join(_minus(f"{min(scaled, key=lambda r: r['at'][h])['final']:.2f}") for h in HORIZONS)
        best = min(r["final"] for r in scaled)
        lines.append(f"| picked by validation at N (its 10,000-step result; best: {_minus(format(best, '.2f'))}) | | "
                     f"{picks} | |")
    lines.append("")
    lines.append(f"ln of the validation value at N on evaluation seeds 0–{seeds - 1}; lower is better.")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results")
    ap.add_argument("--seeds", type=int, default=2, help="evaluation seeds a validation is taken over (default 2)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    rows = collect(Path(args.results), args.seeds)
    if not rows:
        ap.error(f"no RNNprop evaluation on mlp-orig with curves under {args.results}")
    print("\n".join(table(rows, args.seeds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
