"""rule + provenance -> .safetensors + model card, under a name that ``weights=`` finds.

    python -m meta_train.export RUN_DIR NAME [--out DIR] [--force] [--evaluation RESULT.json ...]
    python -m meta_train.export --refresh NAME [NAME ...] --pretrained-dir pretrained [--results results]
    python -m meta_train.export --refresh NAME --run RUN_DIR --pretrained-dir pretrained

The first form copies ``RUN_DIR/weights.safetensors`` to ``DIR/NAME.safetensors`` with the run's wall-clock and the
epoch and horizon of the model it holds (both from ``log.jsonl``) and an optional evaluation summary added to its
metadata, writes the model card ``DIR/NAME.md`` and
pins the file's sha256 in ``DIR/registry.json``. ``DIR`` defaults to your own weights folder
(``$LEARNED_OPTIM_HOME/weights``, else ``~/.cache/learned_optim/weights``), where ``learned_optim`` finds the name:
``L2ODM(params, weights=NAME)``. A name that exists already, bundled or yours, is refused unless ``--force``
(then your export is the one the name resolves to). ``--pretrained-dir`` writes into a checkout's bundled
``pretrained/`` folder instead (maintainers, to ship weights in the wheel).
``--refresh`` re-embeds in bundled files and their cards the evaluations in ``--results`` of exactly
those weights (same :func:`learned_optim.weights_digest`; per task the one with the most seeds); tensors
and recipe are kept, so the digest, and every evaluation keyed on it, stays valid. ``--refresh NAME --run RUN_DIR``
also adds the epoch and horizon of the model the file holds, read from the log of the run it was exported from.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from learned_optim.rules import Rule
from learned_optim.weights import pretrained_dir as bundled_dir
from learned_optim.weights import (WeightsError, load_rule, model_card, read_metadata, read_registry,
                                   registry, save_weights, sha256_file, user_weights_dir, weights_digest)

from .cli import ArgumentParser


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


class ExportError(ValueError):
    """An export that would lose or shadow something, or has nothing to export; the message says what to do."""


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def check_target(name: str, folder: Path, *, force: bool) -> None:
    """Refuse a bad name, or one that exists (in ``folder`` or bundled) unless ``force``."""
    if not NAME_PATTERN.fullmatch(name) or name.endswith(".safetensors"):
        raise ExportError(f"invalid weights name {name!r}: use letters, digits and . _ + - (no path, no extension)")
    if force:
        return
    where = []
    if name in registry():
        where.append(f"bundled with learned_optim ({bundled_dir()})")
    if name in read_registry(folder) or (folder / f"{name}.safetensors").exists():
        where.append(f"in {folder}")
    if where:
        raise ExportError(f"weights {name!r} exist already {' and '.join(dict.fromkeys(where))}; choose another name, "
                          "or pass --force to replace them (your export then wins on this name)")


def bundle(run_dir: Path, name: str, pretrained_dir: Path, evaluation: dict | None = None,
           notes: str | None = None, *, force: bool = False) -> Path:
    src = Path(run_dir) / "weights.safetensors"
    if not src.is_file():
        raise ExportError(f"{src} does not exist: RUN_DIR must be a meta_train --out folder with a validated model "
                          "(weights.safetensors is written at the first validation)")
    check_target(name, Path(pretrained_dir), force=force)
    meta = read_metadata(src)
    recipe = dict(meta["recipe"])
    log = Path(run_dir) / "log.jsonl"
    if log.exists():
        lines = read_log(log)
        elapsed = [r["elapsed"] for r in lines if "elapsed" in r]
        if elapsed:
            recipe["wall_clock_s"] = elapsed[-1]
        recipe.update(exported_model(lines, recipe))
    if notes:
        recipe["notes"] = notes
    return _write_bundled(src, name, pretrained_dir, recipe, evaluation or meta["evaluation"])


def read_log(path: Path) -> list[dict]:
    """A run's ``log.jsonl``: one record per non-empty line."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def exported_model(log: list[dict], recipe: dict) -> dict:
    """Which model of the run a weight file of it holds, read from the run's ``log.jsonl`` records: the last
    validation that improved (the trainer keeps that model as its best and exports it; an ADVANCE restores it, a
    baseline does not replace it), as ``best_epoch`` and ``best_horizon`` (the unroll horizon N it was trained at).
    Where the log holds the validation value the file records (``best_val_loss``), the log is read up to its last
    such record, so a run that went on after the file was written still names the file's model. An ``--init`` run
    that never improved exports its starting weights (epoch 0). Empty when the log cannot say."""
    evals = [r for r in log if r.get("type") == "eval"]
    best = recipe.get("best_val_loss")
    same = [i for i, r in enumerate(evals) if best is not None and r.get("val_loss") == best]
    if same:
        evals = evals[:same[-1] + 1]
    improved = [r["epoch"] for r in evals if r.get("action") == "improved"]
    if not improved:
        return {"best_epoch": 0} if recipe.get("init") else {}
    epoch = improved[-1]
    horizons = [r["horizon"] for r in log if r.get("type") == "epoch" and r.get("epoch") == epoch and "horizon" in r]
    return {"best_epoch": epoch, **({"best_horizon": horizons[-1]} if horizons else {})}


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


def refresh(name: str, pretrained_dir: Path, results: Path, run_dir: Path | None = None) -> Path:
    """Re-embed the current evaluations of bundled ``name`` (see the module doc). With ``run_dir``, the run the
    file was exported from, also record which model of that run it holds (:func:`exported_model`), for files
    exported before export recorded it; the run's log must hold the file's validation value."""
    src = pretrained_dir / f"{name}.safetensors"
    if not src.is_file():
        raise ExportError(f"{src} does not exist; names in {pretrained_dir}: "
                          f"{sorted(p.stem for p in pretrained_dir.glob('*.safetensors'))}")
    recipe = dict(read_metadata(src)["recipe"])
    if run_dir is not None:
        log = Path(run_dir) / "log.jsonl"
        if not log.is_file():
            raise ExportError(f"{log} does not exist: --run must be the meta_train --out folder {name} was "
                              "exported from")
        lines = read_log(log)
        best = recipe.get("best_val_loss")
        if best is None or not any(r.get("type") == "eval" and r.get("val_loss") == best for r in lines):
            raise ExportError(f"{log} has no validation with {name}'s best_val_loss {best}: {name} was not exported "
                              "from that run; pass the --out folder it came from")
        recipe.update(exported_model(lines, recipe))
    return _write_bundled(src, name, pretrained_dir, recipe, summarize_evaluations(evaluations_of(src, results)))


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(prog="python -m meta_train.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, nargs="?", help="meta-training output folder (not with --refresh)")
    ap.add_argument("name", nargs="?", help="the name weights= will know the export by")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None,
                       help="folder to export to (default: your weights folder, $LEARNED_OPTIM_HOME/weights or "
                            "~/.cache/learned_optim/weights, where weights=NAME finds it)")
    where.add_argument("--pretrained-dir", type=Path, default=None,
                       help="a checkout's bundled pretrained/ folder (maintainers: ships the weights in the wheel)")
    ap.add_argument("--force", action="store_true", help="replace weights that exist under NAME (bundled or yours)")
    ap.add_argument("--refresh", nargs="+", metavar="NAME",
                    help="re-embed the evaluations in --results of these weights in --pretrained-dir or --out "
                         "(same digest)")
    ap.add_argument("--results", type=Path, default=Path("results"), help="evaluation results folder (--refresh)")
    ap.add_argument("--run", type=Path, default=None, metavar="RUN_DIR",
                    help="with --refresh NAME: the run NAME was exported from; records which model of it (epoch, "
                         "horizon) the file holds, for files exported before export recorded it")
    ap.add_argument("--evaluation", type=Path, nargs="*", default=[],
                    help="meta_train.evaluate result files whose summaries (not curves) are embedded, one per task")
    ap.add_argument("--notes", help="free text recorded in the recipe (e.g. how the recipe was shortened)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    folder = args.pretrained_dir or args.out or user_weights_dir()
    try:
        if args.refresh:
            if args.run_dir or args.name:
                ap.error("--refresh takes names only, no RUN_DIR NAME")
            if args.pretrained_dir is None and args.out is None:
                ap.error("--refresh needs the folder it rewrites: --pretrained-dir pretrained (bundled) or --out DIR")
            if args.run is not None and len(args.refresh) != 1:
                ap.error("--run names the run of one bundled file: --refresh NAME --run RUN_DIR")
            for name in args.refresh:
                print(refresh(name, folder, args.results, args.run))
            return 0
        if args.run is not None:
            ap.error("--run goes with --refresh NAME (RUN_DIR NAME exports read the run's log already)")
        if not (args.run_dir and args.name):
            ap.error("RUN_DIR and NAME are required (or --refresh NAME ...)")
        evaluation = summarize_evaluations(args.evaluation) if args.evaluation else None
        path = bundle(args.run_dir, args.name, folder, evaluation, args.notes, force=args.force)
    except (ExportError, WeightsError, FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
