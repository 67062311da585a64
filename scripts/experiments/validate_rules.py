"""What the meta-trainer's validation says about trained rules: each weight file validated exactly as a run with
``--fixed-validation --eval-runs RUNS --seed SEED`` (and ``--valid-examples``) validates, at one horizon. Writes a
JSON and prints a markdown table:

    python scripts/experiments/validate_rules.py W [W ...] --horizon 10000 --examples 10000 --runs 2 \\
        --out results/diagnostics/validation/NAME.json

``--examples 0`` validates on the whole training split (the default of meta_train).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from learned_optim.weights import read_metadata, weights_digest  # noqa: E402
from meta_train.trainer import Config, Trainer  # noqa: E402


def validate(weights: str, *, horizon: int, examples: int, runs: int, seed: int, data_root: str | None) -> float:
    rule = read_metadata(weights)["rule"]
    with tempfile.TemporaryDirectory() as out:
        cfg = Config(model=rule, out=out, init=weights, eval_runs=runs, fixed_validation=True, seed=seed,
                     valid_examples=examples or None, data_root=data_root, progress=False)
        return Trainer(cfg).validate(horizon)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("weights", nargs="+")
    ap.add_argument("--horizon", type=int, default=10000)
    ap.add_argument("--examples", type=int, default=10000, help="validation subset size (0: the whole split)")
    ap.add_argument("--runs", type=int, default=2, help="validation optimizees (--eval-runs)")
    ap.add_argument("--seed", type=int, default=0, help="the run seed the validation optimizees belong to")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="JSON file to write (refused if it exists)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        ap.error(f"--out {out} exists; choose another file")
    torch.set_num_threads(args.threads)
    rows = []
    for w in args.weights:
        start = time.perf_counter()
        value = validate(w, horizon=args.horizon, examples=args.examples, runs=args.runs, seed=args.seed,
                         data_root=args.data_root)
        rows.append({"weights": w, "weights_digest": weights_digest(w), "val_loss": value,
                     "ln_val_loss": math.log(value) if value > 0 and math.isfinite(value) else None,
                     "seconds": time.perf_counter() - start})
        print(f"| `{w}` | {rows[-1]['ln_val_loss']:.2f} |", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"horizon": args.horizon, "examples": args.examples, "runs": args.runs,
                               "seed": args.seed, "command": "python " + " ".join(sys.argv), "rows": rows},
                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
