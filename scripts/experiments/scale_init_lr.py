"""Diagnostic (not shipped): why the bundled L2O-Scale weights train some optimizees and stall on others.

L2O-Scale's step is exp(log_lr - 1) times an RMS-normalised direction. Each coordinate's initial log_lr is
U(ln(1e-6)/2, ln(1e-2)/2) plus an offset from the same range. The two bundled files were written before the rule
config ``lr_offset`` existed, so they mean ``lr_offset="shared"``: one offset for the whole parameter layout
(``L2OScaleRule.init_state``), from a generator seeded by the first parameter's position, so the draw depends only on
how many coordinates the model has: every evaluation seed of a task gets the same step sizes.
The TF code draws the offset once per variable (``hierarchical_rnn.py``, ``_initialize_state(var)``).
Both bundled Scale files leave the log-lr readout at its zero initialisation (meta-lr 1e-6, see their cards), so
the step sizes never move from that draw.

For every task this prints and writes to ``--out``:

1. From the committed results (no compute): the final ln loss and initial ln loss of ``scale`` and ``scale-cl-il``
   per seed, and whether every seed ended at least 0.1 below its start (claim (e)'s test).
2. Measured: the evaluation rollout (same task, seed 0, data order and optimizer as ``meta_train.evaluate``) for
   ``--steps`` steps, checked against the committed curve of seed 0. It records the coordinate count, the
   offset's position u in [0, 1] within its range, and the quantiles of the step size exp(log_lr - 1) after
   step 1 and after the last step.
3. With ``--per-tensor-steps N``: the same rollout of ``scale-cl-il`` for N steps on ``--per-tensor-tasks``, once as
   shipped and once with one offset per tensor (the TF code's draw: the same weights with the rule config
   ``lr_offset="tensor"``, the default of a fresh ``L2OScaleRule``), reporting ln of the last 100 losses.

Usage: python scripts/experiments/scale_init_lr.py [--steps 200] [--per-tensor-steps 2000]
       [--per-tensor-tasks nas-cell] [--data-root PATH] [--out results/diagnostics/scale_init_lr.json]
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from learned_optim.rules import build_rule
from learned_optim.rules import scale as scale_rule
from learned_optim.rules.base import layout_numels
from learned_optim.weights import load_rule, resolve_weights, save_weights
from meta_train import curves
from meta_train import evaluate as ev
from meta_train.report import STALL_NATS
from meta_train.tasks import Task

NAMES = ("scale", "scale-cl-il")
TASKS = ("mlp-orig", "mlp-relu", "mlp-deeper", "conv-mnist", "lenet", "nas-cell", "mlp-fashion")
LOG_LR_ROW = scale_rule._LOGLR  # row of log_lr in the per-coordinate state


def committed_curve(results: Path, name: str, task: str, seed: int = 0) -> tuple[dict, int] | None:
    """(result, seed index) of the committed evaluation, or None."""
    path = results / f"{name}__{task}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return data, data["seeds"].index(seed)


def committed(results: Path, name: str, task: str) -> dict | None:
    path = results / f"{name}__{task}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    first = [round(math.log(curve[0]), 3) for curve in data["losses"]]
    final = data["final_ln_loss"]
    return {"final_ln_loss_mean": round(data["final_ln_loss_mean"], 3), "first_ln_loss": first,
            "final_ln_loss": [round(f, 3) if f is not None else None for f in final],
            "trained_every_seed": all(f is not None and f <= s - STALL_NATS for f, s in zip(final, first))}


def step_sizes(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict:
    lr = torch.cat([torch.exp(opt.state[p]["coord"][LOG_LR_ROW].float() - 1.0) for p in params])
    q = torch.quantile(lr, torch.tensor([0.1, 0.5, 0.9]))
    return {"p10": float(f"{q[0]:.3g}"), "median": float(f"{q[1]:.3g}"), "p90": float(f"{q[2]:.3g}"),
            "max": float(f"{lr.max():.3g}")}


def rollout(name: str, task_name: str, steps: int, data, data_root, seed: int = 0,
            committed_losses: tuple[dict, int] | None = None) -> dict:
    """The evaluation's rollout of seed ``seed``, keeping the optimizer to read its step sizes; with
    ``committed_losses`` (that seed's committed curve) it records whether the rollout reproduces it."""
    spec = ev.make_spec(name, task_name, steps=steps, seeds=[seed], data_root=data_root)
    torch.manual_seed(seed)
    task = Task(spec.task, train=False, device=spec.device, data=data)
    generator = torch.Generator().manual_seed(seed)
    model = ev.build_model(task, task.init_params(generator))
    params = list(model.parameters())
    opt = ev.build_optimizer(spec, params)
    losses, after_first = [], None
    for _ in range(steps):
        batch = task.sample_batch(generator)
        opt.zero_grad()
        loss = F.cross_entropy(model(batch.x), batch.y)
        losses.append(ev.round6(float(loss.detach())))  # as the evaluation stores them
        loss.backward()
        opt.step()
        if after_first is None:
            after_first = step_sizes(opt, params)
    readout = opt.rule.log_lr
    numels = layout_numels([tuple(p.shape) for p in params])
    # the shared offset is the (n+1)-th draw of the generator init_state receives (seeded by position 0)
    u = float(torch.rand(sum(numels) + 1, generator=torch.Generator().manual_seed(0))[-1])
    row = {} if committed_losses is None else {"matches_committed_curve": curves.matches(*committed_losses, losses)}
    return {**row, "coordinates": sum(numels), "tensors": len(numels), "offset_u": round(u, 3),
            "step_size_after_step_1": after_first, f"step_size_after_step_{steps}": step_sizes(opt, params),
            "log_lr_readout": {"weight_abs_max": float(f"{readout.weight.abs().max():.3g}"),
                               "bias": float(f"{readout.bias.item():.3g}")},
            "ln_loss_first": round(math.log(losses[0]), 3),
            "ln_loss_last100": round(math.log(sum(losses[-100:]) / len(losses[-100:])), 3)}


def per_tensor_copy(name: str, folder: Path) -> Path:
    """The bundled weights ``name`` re-saved with ``lr_offset="tensor"`` (the TF code's draw): same tensors."""
    shipped = load_rule(resolve_weights(name))
    rule = build_rule("scale", {**shipped.config(), "lr_offset": "tensor"})
    rule.load_state_dict(shipped.state_dict())
    return save_weights(rule, folder / f"{name}-per-tensor.safetensors")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--per-tensor-steps", type=int, default=0)
    ap.add_argument("--per-tensor-tasks", default="nas-cell")
    ap.add_argument("--results", default="results")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default="results/diagnostics/scale_init_lr.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = {"tasks": {}, "per_tensor_offsets": {}}
    for task_name in TASKS:
        spec = ev.make_spec("scale", task_name, steps=1, seeds=[0], data_root=args.data_root)
        data = ev.load_task_data(spec)
        row = {name: {"results": committed(Path(args.results), name, task_name)} for name in NAMES}
        for name in NAMES:
            start = time.perf_counter()
            row[name]["rollout"] = rollout(name, task_name, args.steps, data, args.data_root,
                                           committed_losses=committed_curve(Path(args.results), name, task_name))
            row[name]["rollout"]["seconds"] = round(time.perf_counter() - start, 1)
        out["tasks"][task_name] = row
        print(task_name, json.dumps(row), flush=True)
    for task_name in [t for t in args.per_tensor_tasks.split(",") if t] if args.per_tensor_steps else []:
        spec = ev.make_spec("scale-cl-il", task_name, steps=1, seeds=[0], data_root=args.data_root)
        data = ev.load_task_data(spec)
        shipped = rollout("scale-cl-il", task_name, args.per_tensor_steps, data, args.data_root,
                          committed_losses=committed_curve(Path(args.results), "scale-cl-il", task_name))
        with tempfile.TemporaryDirectory() as tmp:
            per_tensor = rollout(str(per_tensor_copy("scale-cl-il", Path(tmp))), task_name, args.per_tensor_steps,
                                 data, args.data_root)
        del per_tensor["offset_u"]  # the shipped draw's single offset, which this draw does not use
        out["per_tensor_offsets"][task_name] = {"steps": args.per_tensor_steps, "shipped": shipped,
                                                "one_offset_per_tensor": per_tensor}
        print(task_name, "per-tensor offsets", json.dumps(out["per_tensor_offsets"][task_name]), flush=True)
    out["command"] = shlex.join(["python", "scripts/experiments/scale_init_lr.py", *(argv or [])])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
