"""rule + provenance -> .safetensors + model card; bundling a finished run into ``pretrained/``.

    python -m meta_train.export RUN_DIR NAME [--pretrained-dir pretrained] [--evaluation RESULT.json ...]
    python -m meta_train.export --refresh NAME [NAME ...] [--results results]

The first form copies ``RUN_DIR/weights.safetensors`` to ``pretrained/NAME.safetensors`` with the run's
wall-clock (from ``log.jsonl``) and an optional evaluation summary added to its metadata, writes
the model card ``pretrained/NAME.md`` and pins the file's sha256 in ``pretrained/registry.json``.
``--refresh`` re-embeds in bundled files and their cards the evaluations in ``--results`` of exactly
those weights (same :func:`learned_optim.weights_digest`; per task the one with the most seeds); tensors
and recipe are kept, so the digest, and every evaluation keyed on it, stays valid.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from learned_optim.rules import Rule
from learned_optim.weights import load_rule, model_card, read_metadata, save_weights, sha256_file, weights_digest


def export_weights(rule: Rule, path: Path, *, recipe: dict, evaluation: dict | None = None) -> Path:
    return save_weights(rule, path, recipe=recipe, evaluation=evaluation)


SUMMARY_KEYS = ("task", "steps", "lr", "final_ln_loss_mean", "final_ln_loss_std", "diverged", "nonfinite", "command",
                "weights_sha256", "weights_digest")


def summarize_evaluations(paths: list[Path]) -> dict:
    """{task: summary} from ``meta_train.evaluate`` result files (the curves are left out)."""
    out = {}
    for path in paths:
        result = json.loads(Path(path).read_text())
        summary = {k: result.get(k) for k in SUMMARY_KEYS}
        summary["seeds"] = len(result.get("seeds", []))
        out[result["task"]] = summary
    return out


def bundle(run_dir: Path, name: str, pretrained_dir: Path, evaluation: dict | None = None,
           notes: str | None = None) -> Path:
    src = Path(run_dir) / "weights.safetensors"
    meta = read_metadata(src)
    recipe = dict(meta["recipe"])
    log = Path(run_dir) / "log.jsonl"
    if log.exists():
        lines = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
        elapsed = [r["elapsed"] for r in lines if "elapsed" in r]
        if elapsed:
            recipe["wall_clock_s"] = elapsed[-1]
    if notes:
        recipe["notes"] = notes
    return _write_bundled(src, name, pretrained_dir, recipe, evaluation or meta["evaluation"])


def _write_bundled(src: Path, name: str, pretrained_dir: Path, recipe: dict, evaluation: dict) -> Path:
    """``src``'s rule with ``recipe`` and ``evaluation`` -> ``pretrained_dir/NAME.safetensors``, its card, its pin."""
    rule = load_rule(src)
    pretrained_dir.mkdir(parents=True, exist_ok=True)
    dst = pretrained_dir / f"{name}.safetensors"
    save_weights(rule, dst, recipe=recipe, evaluation=evaluation)
    (pretrained_dir / f"{name}.md").write_text(model_card(dst, name=name))
    reg_path = pretrained_dir / "registry.json"
    reg = json.loads(reg_path.read_text()) if reg_path.exists() else {}
    reg[name] = {"file": dst.name, "sha256": sha256_file(dst), "rule": rule.name}
    reg_path.write_text(json.dumps(dict(sorted(reg.items())), indent=2) + "\n")
    return dst


def evaluations_of(path: Path, results: Path) -> list[Path]:
    """Result files in ``results`` (not grids, not sub-folders) of the weights in ``path``, the one with the most
    seeds per task."""
    digest, best = weights_digest(path), {}
    for file in sorted(Path(results).glob("*.json")):
        result = json.loads(file.read_text())
        if result.get("type") != "evaluation" or result.get("weights_digest") != digest:
            continue
        if len(result["seeds"]) > best.get(result["task"], (0, None))[0]:
            best[result["task"]] = (len(result["seeds"]), file)
    return [file for _, file in best.values()]


def refresh(name: str, pretrained_dir: Path, results: Path) -> Path:
    """Re-embed the current evaluations of bundled ``name`` (see the module doc)."""
    src = pretrained_dir / f"{name}.safetensors"
    if not src.is_file():
        raise SystemExit(f"{src} does not exist; bundled names: "
                         f"{sorted(p.stem for p in pretrained_dir.glob('*.safetensors'))}")
    return _write_bundled(src, name, pretrained_dir, read_metadata(src)["recipe"],
                          summarize_evaluations(evaluations_of(src, results)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m meta_train.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, nargs="?", help="meta-training output folder (not with --refresh)")
    ap.add_argument("name", nargs="?")
    ap.add_argument("--pretrained-dir", type=Path, default=Path("pretrained"))
    ap.add_argument("--refresh", nargs="+", metavar="NAME",
                    help="re-embed the evaluations in --results of these bundled weights (same digest)")
    ap.add_argument("--results", type=Path, default=Path("results"), help="evaluation results folder (--refresh)")
    ap.add_argument("--evaluation", type=Path, nargs="*", default=[],
                    help="meta_train.evaluate result files whose summaries (not curves) are embedded, one per task")
    ap.add_argument("--notes", help="free text recorded in the recipe (e.g. how the recipe was shortened)")
    args = ap.parse_args(argv)
    if args.refresh:
        if args.run_dir or args.name:
            ap.error("--refresh takes bundled names only, no RUN_DIR NAME")
        for name in args.refresh:
            print(refresh(name, args.pretrained_dir, args.results))
        return
    if not (args.run_dir and args.name):
        ap.error("RUN_DIR and NAME are required (or --refresh NAME ...)")
    evaluation = summarize_evaluations(args.evaluation) if args.evaluation else None
    print(bundle(args.run_dir, args.name, args.pretrained_dir, evaluation, args.notes))


if __name__ == "__main__":
    main()
