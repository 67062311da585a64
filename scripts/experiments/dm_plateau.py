"""Diagnostic (not shipped): why L2O-DM sits on MLP-orig's initial plateau (loss ln 10).

1. At the N(0, 0.01) initialisation, how large the gradient coordinates are and what L2O-DM's LogAndSign (k=5)
   makes of them: the log feature is clamped at -1 for every |g| < e^-5, and the sign feature is g * e^5.
2. For the fresh (untrained) rules and the bundled weights: the loss after 100 and 1,000 steps (the vanilla
   recipe's training horizon is N=100) and the mean cosine between the update and -grad over the first 100 steps.

Usage: python scripts/experiments/dm_plateau.py [--seeds 5] [--data-root PATH] [--out results/diagnostics/dm_plateau.json]
Runs on the MNIST training split (what meta-training sees), one thread.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics

import torch

from learned_optim.rules import build_rule
from learned_optim.rules.dm import log_and_sign
from learned_optim.weights import load_rule, resolve_weights
from meta_train.tasks import Task


def init_gradient_stats(task: Task, seeds: int, k: float) -> dict:
    rows = []
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        theta = task.init_params(gen)
        loss, grad = task.loss_and_grad(theta, task.sample_batch(gen))
        a = grad.abs()
        rows.append({"loss": float(loss), "median_abs_grad": float(a.median()),
                     "frac_log_feature_clamped": float((a < math.exp(-k)).float().mean()),
                     "median_abs_sign_feature": float(log_and_sign(grad, k)[1].abs().median()),
                     "median_abs_grad_per_tensor": [float(p.median()) for p in a.split(
                         [math.prod(s) for s in task.layout])]})
    keys = ["loss", "median_abs_grad", "frac_log_feature_clamped", "median_abs_sign_feature"]
    return {"per_seed": rows, "median": {key: statistics.median(r[key] for r in rows) for key in keys},
            "tensor_shapes": [list(s) for s in task.layout]}


@torch.no_grad()
def early_behaviour(rule, task: Task, seeds: int, steps: int = 1000, cosine_steps: int = 100) -> dict:
    at100, at1000, cos = [], [], []
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(1000 + seed)
        theta = task.init_params(gen)
        state = rule.init_state(task.layout, generator=gen)
        losses, cosines = [], []
        for step in range(1, steps + 1):
            loss, grad = task.loss_and_grad(theta, task.sample_batch(gen))
            losses.append(float(loss))
            update, state = rule(grad, state, step)
            if step <= cosine_steps:
                cosines.append(float(torch.nn.functional.cosine_similarity(update, -grad, dim=0)))
            theta = theta + update
        at100.append(statistics.mean(losses[90:100]))
        at1000.append(statistics.mean(losses[990:1000]))
        cos.append(statistics.mean(cosines))
    return {"loss_steps_91_100": statistics.mean(at100), "loss_steps_991_1000": statistics.mean(at1000),
            "mean_cosine_update_vs_neg_grad_first_100": statistics.mean(cos)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default="results/diagnostics/dm_plateau.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    task = Task("mlp-orig", train=True, data_root=args.data_root)
    result = {"task": "mlp-orig (train split)", "seeds": args.seeds,
              "init_gradients": init_gradient_stats(task, args.seeds, k=5.0), "rules": {}}
    torch.manual_seed(0)
    candidates = {"dm (fresh init)": build_rule("dm"), "rnnprop (fresh init)": build_rule("rnnprop")}
    for name in ["dm", "dm-cl", "dm-il", "dm-cl-il", "rnnprop", "rnnprop-cl-il"]:
        candidates[name] = load_rule(resolve_weights(name))
    for name, rule in candidates.items():
        result["rules"][name] = early_behaviour(rule.eval(), task, args.seeds)
        print(name, result["rules"][name], flush=True)
    result["command"] = "python scripts/experiments/dm_plateau.py " + " ".join(argv or [])
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(result["init_gradients"]["median"], indent=1))


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
