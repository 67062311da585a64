"""Diagnostic (not shipped): why Conv-MNIST's 10k-step losses sit on a few discrete levels.

The paper's Conv-MNIST (reproduced in ``meta_train.tasks.models.ConvNet``) puts a ReLU on the logits. Once a
class's pre-activation is negative on every input its logit is 0 and no gradient reaches its FC row (only a change
of the shared conv features could revive it), and every image of that class then costs at least ln 10 (its logit
is 0, the others can only be >= 0). With ``k`` such dead classes out of 10 the mean loss cannot go below ln(10)
times their share of the data; on a balanced split that is ``k * ln(10) / 10``, whose ln is -1.47, -0.77, -0.37,
-0.08, +0.14, +0.32, +0.48 for k = 1 ... 7.

1. From the committed results (no compute): for each optimizer's 10 seeds on conv-mnist, the final ln loss, the
   most dead classes it allows (the largest k whose floor is not above it) and that floor.
2. Measured directly: the evaluation protocol's own rollout (``meta_train.evaluate``: same task, seed, data
   order and optimizer) for ``--steps`` steps, then the number of classes whose logit is 0 on every test image.
   The rollout's losses are checked against the committed curve of the same seed (they must match exactly).

Usage: python scripts/experiments/conv_dead_logits.py [--optimizers dm-cl-il,adam,sgd,rmsprop] [--seeds 0,1,2]
       [--steps 1000] [--data-root PATH] [--out results/diagnostics/conv_dead_logits.json]
       ``--optimizers ""`` only refreshes part 1 from results/ and keeps the rollouts already in --out.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from pathlib import Path

import torch

from learned_optim.weights import available_weights
from meta_train import curves
from meta_train import evaluate as ev

TASK = "conv-mnist"
CLASSES = 10


def floor_ln(k: int) -> float:
    """ln of the lowest mean loss reachable with ``k`` dead classes on a balanced 10-class split."""
    return math.log(k * math.log(CLASSES) / CLASSES) if k else -math.inf


def floor_ln_of(dead: list[int], y: torch.Tensor) -> float | None:
    """The same floor for these dead classes, weighted by their frequency in the split ``y`` (None: no floor)."""
    share = float(torch.isin(y.cpu(), torch.tensor(dead, dtype=y.dtype)).float().mean()) if dead else 0.0
    return round(math.log(share * math.log(CLASSES)), 3) if share else None


# The final loss is a mean over 100 random batches (12,800 test images) whose share of any 4 classes varies by about
# 1% (ln +-0.01): a final loss this far below a floor still counts as sitting on it.
TOLERANCE = 0.035


def implied_dead(final_ln: float | None) -> int | None:
    """At most how many classes can be dead for this final ln loss: the largest k whose (balanced) floor is not
    above it (None for a seed that hit NaN/Inf). The loss sits on that floor when it is within a few hundredths."""
    if final_ln is None:
        return None
    return max(k for k in range(CLASSES + 1) if floor_ln(k) <= final_ln + TOLERANCE)


def committed(results: Path, name: str) -> dict | None:
    """The best-point evaluation file of ``name`` on conv-mnist (None if not evaluated yet)."""
    path = results / f"{name}__{TASK}.json"
    return json.loads(path.read_text()) if path.exists() else None


def from_results(results: Path, names: list[str]) -> dict:
    out = {}
    for name in names:
        data = committed(results, name)
        if data is None:
            continue
        dead = [implied_dead(f) for f in data["final_ln_loss"]]
        out[name] = {"lr": data["lr"], "final_ln_loss": data["final_ln_loss"], "max_dead_classes": dead,
                     "floor_of_implied": [round(floor_ln(k), 3) if k else None for k in dead]}
    return out


@torch.no_grad()
def dead_classes(model: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> list[int]:
    """Classes whose (post-ReLU) logit is 0 on every image of ``x`` (batch norm in training mode, as trained)."""
    alive = torch.zeros(CLASSES, dtype=torch.bool)
    for i in range(0, len(x), batch):
        alive |= (model(x[i:i + batch]) > 0).any(0).cpu()
    return [c for c in range(CLASSES) if not alive[c]]


def measured(name: str, lr: float | None, seeds: list[int], steps: int, data_root, stored: dict | None) -> list:
    spec = ev.make_spec(name, TASK, lr=lr, steps=steps, seeds=seeds, data_root=data_root)
    data = ev.load_task_data(spec)
    x, y = data
    rows = []
    for seed in seeds:
        start = time.perf_counter()
        model, losses = ev.train_seed(spec, seed, data)
        dead = dead_classes(model, x)
        row = {"seed": seed, "steps": steps, "dead_classes": dead,
               "ln_loss_last100": math.log(sum(losses[-100:]) / len(losses[-100:])),
               "floor_ln_of_dead": floor_ln_of(dead, y), "seconds": round(time.perf_counter() - start, 1)}
        if stored is not None:
            row["matches_committed_curve"] = curves.matches(stored, stored["seeds"].index(seed), losses)
            row["committed_final_ln_loss_10k"] = stored["final_ln_loss"][stored["seeds"].index(seed)]
        print(name, row, flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", default="dm-cl-il,adam,sgd,rmsprop")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--results", default="results")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default="results/diagnostics/conv_dead_logits.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = [n for n in args.optimizers.split(",") if n]
    every = [*ev.BASELINES, *available_weights()]
    out = Path(args.out)
    # --optimizers "" refreshes part 1 only and keeps the rollouts already measured in --out
    previous = json.loads(out.read_text()) if not names and out.exists() else {}
    kept = previous.get("measured", {})
    result = {"task": TASK, "floors_ln": {k: round(floor_ln(k), 3) for k in range(1, 8)},
              "from_results": from_results(Path(args.results), every), "measured": kept}
    for name, row in result["from_results"].items():
        print(name, "at most this many dead classes per seed:", row["max_dead_classes"], flush=True)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for name in names:
        stored = committed(Path(args.results), name)
        lr = None if name not in ev.BASELINES else stored["lr"]
        result["measured"][name] = measured(name, lr, seeds, args.steps, args.data_root, stored)
    result["command"] = shlex.join(["python", "scripts/experiments/conv_dead_logits.py", *(argv or [])])
    if not names and kept:
        result["measured_by"] = previous.get("measured_by") or previous["command"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
