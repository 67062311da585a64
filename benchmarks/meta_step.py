"""Cost of meta-training per unrolled optimizee step, next to the optimizee's own forward+backward.

For each model (dm, rnnprop, scale) on MLP-orig (784-20-10 sigmoid, batch 128): one timed
"truncation" = ``meta_unroll`` of ``--unroll`` (20) steps + ``backward`` of the meta-loss + an
Adam step on the rule's weights, divided by the unroll length. In the same round, right after it,
the plain optimizee forward+backward (``task.loss_and_grad``, no meta-graph) is timed on the
batches of ``--unroll`` pre-drawn minibatches at the current parameters, also per step, and the
no-grad rollout step (forward+backward of the optimizee + the rule's forward, as in evaluation).
Rounds rotate over the models, so machine load affects all measurements alike; ratios are taken
within the run.

Populations (``--population 1,8,64``): the same for K optimizees advancing together (the vectorized unroll of
``meta_train --population K``: ``population_meta_unroll``, the meta-loss the mean of the members'), timed per
unrolled step of the whole population; ``optimizee_steps_per_s`` = K / that time, and ``cost_vs_population_1``
the ratio to K = 1 measured in the same rounds. Populations above 8 are timed ``--repeats-large`` times. On the
CPU with a population above 1, the process keeps freed memory for reuse as ``meta_train`` does then
(``meta_train.unroll.keep_freed_memory``, recorded as ``env.keep_freed_memory``).

    python benchmarks/meta_step.py --threads 1 --out benchmarks/results/meta_step.json
    python benchmarks/meta_step.py --threads 1 --population 1,8 --out benchmarks/results/meta_step_population.json
    python benchmarks/meta_step.py --device cuda --population 1,8,64 --out benchmarks/results/meta_step_cuda.json

``--models dm,dm+compile,...``: a ``+compile`` model (dm, rnnprop) runs its rule through ``torch.compile`` as
``meta_train --compile`` does, timed in the same rounds as the eager one; its entry adds ``speedup_over_eager``
(the eager model's time over its own, same K). Compilation happens in the untimed ``--warmup`` rounds.
A ``+torchcell`` model (dm, rnnprop) runs the rule's LSTM cell as torch ops (``kernels.cell_kernel("off")``), where
the default takes the fused cell kernels (CUDA); the default model's entry then adds ``fused_cell_speedup`` (the
``+torchcell`` time over its own, same K). On the CPU both are the same computation.

Prints the JSON (schema in benchmarks/README.md); ``--out`` also writes it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import socket
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402  (benchmarks/common.py)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from learned_optim import kernels  # noqa: E402
from learned_optim.rules import build_rule  # noqa: E402
from meta_train.tasks import Task  # noqa: E402
from meta_train.trainer import GRAD_CLIP_SCALE, MODEL_DEFAULTS, member_seed  # noqa: E402
from meta_train.unroll import (CompiledRule, Trajectory, keep_freed_memory, meta_unroll,  # noqa: E402
                               population_blocks, population_meta_unroll, population_step, split_state, start,
                               start_population)

MODELS = ("dm", "rnnprop", "scale")
#: suffix of a model timed with its rule's forward through torch.compile (``meta_train --compile``)
COMPILED = "+compile"
#: suffix of a model whose LSTM cell runs as torch ops, not through the fused cell kernels (a GPU's default)
TORCH_CELL = "+torchcell"
VARIANTS = (COMPILED, TORCH_CELL)


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(per_step: list[tuple[float, float, float, float]]) -> dict:
    ms = [t[0] * 1e3 for t in per_step]
    user, sys_, faults = (sum(t[i] for t in per_step) / len(per_step) for i in (1, 2, 3))
    return {"median_ms": quantile(ms, 0.5), "iqr_ms": [quantile(ms, 0.25), quantile(ms, 0.75)],
            "min_ms": min(ms), "times_ms": [round(t, 4) for t in ms], "cpu_user_ms": user * 1e3,
            "cpu_sys_ms": sys_ * 1e3, "sys_fraction": sys_ / (user + sys_) if user + sys_ > 0 else 0.0,
            "minor_faults": faults}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_task(name: str, data_root, device: torch.device) -> tuple[Task, dict]:
    """The real training set, else a random synthetic one of the same shape (said so in the JSON)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)  # the loader tries a download when the files are missing
    try:
        task = Task(name, train=True, data_root=data_root, device=device)
        return task, {"source": "real", "dataset": task.dataset, "n_examples": len(task.y)}
    except Exception as exc:
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(60000, 1, 28, 28, generator=gen)
        y = torch.randint(10, (60000,), generator=gen)
        task = Task(name, train=True, device=device, data=(x, y))
        return task, {"source": "synthetic", "dataset": task.dataset, "n_examples": len(y),
                      "note": "real data unavailable; uniform random images of the same shape, random labels",
                      "error": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        socket.setdefaulttimeout(old)


class Bench:
    """One model's meta-training state: the rule, its Adam, the generators and the trajectory of its
    ``population`` optimizees (1: the one-optimizee functions, as ``meta_train`` runs K = 1)."""

    def __init__(self, model: str, task: Task, args, device: torch.device, population: int = 1):
        torch.manual_seed(args.seed)
        self.model, self.task, self.args, self.population = model, task, args, population
        base = model.removesuffix(COMPILED).removesuffix(TORCH_CELL)
        self.cell_mode = "off" if model.endswith(TORCH_CELL) else None
        self.rule = build_rule(base).to(device)
        # what the unroll calls: the rule, or (a "+compile" model) its torch.compile'd forward, as meta_train --compile
        self.step_rule = CompiledRule(self.rule) if model.endswith(COMPILED) else self.rule
        self.meta_opt = torch.optim.Adam(self.rule.parameters(), lr=args.meta_lr)
        self.objective = MODEL_DEFAULTS[base]["objective"]
        self.gen = torch.Generator().manual_seed(args.seed)
        self.gens = [self.gen] + [torch.Generator().manual_seed(member_seed(args.seed, 0, j))
                                  for j in range(1, population)]
        self.traj: Trajectory = self.start()
        self.restarts = 0

    def start(self) -> Trajectory:
        if self.population == 1:
            return start(self.rule, self.task, self.gen)
        return start_population(self.rule, self.task, self.gens)[0]

    def maybe_restart(self) -> None:  # untimed: a fresh optimizee every --horizon steps, as in training
        if self.traj.step >= self.args.horizon:
            self.traj = self.start()
            self.restarts += 1

    def cells(self):
        """The cell kernel mode of this model (``+torchcell``: off), else the default."""
        return kernels.cell_kernel(self.cell_mode) if self.cell_mode else contextlib.nullcontext()

    def meta_truncation(self) -> None:
        with self.cells():
            self._meta_truncation()

    def _meta_truncation(self) -> None:
        if self.population == 1:
            loss, traj, values = meta_unroll(self.step_rule, self.task, self.traj, self.args.unroll, self.gen,
                                             objective=self.objective)
            finite = math.isfinite(values[-1])
        else:
            member_losses, traj, values = population_meta_unroll(self.step_rule, self.task, self.traj, self.args.unroll,
                                                                 self.gens, objective=self.objective)
            loss = member_losses.mean()
            finite = bool(torch.isfinite(values[-1]).all())
        self.meta_opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.model == "scale":  # as meta_train.trainer: meta-gradients made finite, then value-clipped
            for p in self.rule.parameters():
                if p.grad is not None:
                    p.grad.nan_to_num_(0.0, GRAD_CLIP_SCALE, -GRAD_CLIP_SCALE).clamp_(-GRAD_CLIP_SCALE,
                                                                                        GRAD_CLIP_SCALE)
        self.meta_opt.step()
        self.traj = traj if finite else self.start()

    def batches(self) -> list:
        if self.population == 1:
            return [self.task.sample_batch(self.gen) for _ in range(self.args.unroll)]
        return [self.task.sample_batches(self.gens) for _ in range(self.args.unroll)]

    def plain(self, batches) -> None:
        theta = self.traj.theta
        for b in batches:
            if self.population == 1:
                self.task.loss_and_grad(theta, b)
            else:
                self.task.population_loss_and_grad(theta, b)

    @torch.no_grad()
    def rollout(self, batches) -> None:
        with self.cells():
            self._rollout(batches)

    def _rollout(self, batches) -> None:
        theta, state = self.traj.theta, self.traj.state
        blocks = population_blocks(self.rule, theta) if self.population > 1 else None
        state = split_state(state, blocks)
        for i, b in enumerate(batches):
            if self.population == 1:
                _, grad = self.task.loss_and_grad(theta, b)
                update, state = self.step_rule(grad, state, self.traj.step + i + 1)
            else:
                _, grad = self.task.population_loss_and_grad(theta, b)
                update, state = population_step(self.step_rule, grad, state, self.traj.step + i + 1, blocks)
            theta = theta + update


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--task", default="mlp-orig")
    ap.add_argument("--data-root", default=None, help="default: $LEARNED_OPTIM_DATA, else ~/.cache/learned_optim/data")
    ap.add_argument("--unroll", type=int, default=20)
    ap.add_argument("--horizon", type=int, default=100, help="optimizee restarted every this many steps (untimed)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--repeats", type=int, default=20, help="timed truncations per model (default 20)")
    ap.add_argument("--population", default="1",
                    help="comma list of population sizes K (default 1), e.g. 1,8,64: each timed for every model")
    ap.add_argument("--repeats-large", type=int, default=5,
                    help="timed truncations per model for populations above 8 (default 5)")
    ap.add_argument("--meta-lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS and m not in (f"{c}{v}" for c in ("dm", "rnnprop") for v in VARIANTS):
            raise SystemExit(f"unknown model {m!r}; choose from {','.join(MODELS)}, or dm / rnnprop with the suffix "
                             f"{COMPILED} or {TORCH_CELL}")
    if args.repeats < 1 or args.repeats_large < 1 or args.warmup < 0 or args.unroll < 1:
        raise SystemExit("--repeats, --repeats-large and --unroll must be >= 1, --warmup >= 0")
    try:
        populations = sorted({int(k) for k in args.population.split(",") if k.strip()})
    except ValueError:
        raise SystemExit(f"--population: expected comma-separated integers, got {args.population!r}") from None
    if not populations or populations[0] < 1:
        raise SystemExit("--population: sizes must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(fn, *a) -> tuple[float, float, float, float]:
        """(wall, user, sys, minor faults) per unrolled step; getrusage(RUSAGE_SELF) covers all threads."""
        sync()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        fn(*a)
        sync()
        t1 = time.perf_counter()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        k = args.unroll
        return ((t1 - t0) / k, (ru1.ru_utime - ru0.ru_utime) / k, (ru1.ru_stime - ru0.ru_stime) / k,
                (ru1.ru_minflt - ru0.ru_minflt) / k)

    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "interop_threads": torch.get_num_interop_threads(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
           "device": str(device), "load_avg_start": list(os.getloadavg()),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    # as meta_train does for a population on the CPU (every case of this run then measured with it)
    env["keep_freed_memory"] = device.type == "cpu" and populations[-1] > 1 and keep_freed_memory()
    t_start = time.perf_counter()
    task, data = load_task(args.task, args.data_root, device)
    cases = [(k, m) for k in populations for m in models]
    benches = {(k, m): Bench(m, task, args, device, k) for k, m in cases}
    times = {case: {"meta": [], "plain": [], "rollout": []} for case in cases}
    for r in range(args.warmup + args.repeats):
        order = cases[r % len(cases):] + cases[: r % len(cases)]
        for k, m in order:
            if k > 8 and r >= args.warmup + args.repeats_large:
                continue
            b = benches[k, m]
            b.maybe_restart()
            batches = b.batches()  # drawn before the truncation: plain/rollout use the same parameters
            measured = {"meta": timed(b.meta_truncation), "plain": timed(b.plain, batches),
                        "rollout": timed(b.rollout, batches)}
            if r >= args.warmup:
                for kind, value in measured.items():
                    times[k, m][kind].append(value)
    by_population = {}
    for k, m in cases:
        meta, plain, roll = (summary(times[k, m][kind]) for kind in ("meta", "plain", "rollout"))
        paired = [a[0] / b[0] for a, b in zip(times[k, m]["meta"], times[k, m]["plain"])]
        entry = {"objective": benches[k, m].objective,
                 "rule_params": sum(p.numel() for p in benches[k, m].rule.parameters()),
                 "meta_ms_per_step": meta, "plain_fwd_bwd_ms_per_step": plain, "rollout_ms_per_step": roll,
                 "ratio_meta_to_plain": meta["median_ms"] / plain["median_ms"],
                 "ratio_meta_to_plain_paired_median": quantile(paired, 0.5),
                 "ratio_rollout_to_plain": roll["median_ms"] / plain["median_ms"],
                 "optimizee_restarts": benches[k, m].restarts, "population": k,
                 "optimizee_steps_per_s": k * 1e3 / meta["median_ms"],
                 "rollout_optimizee_steps_per_s": k * 1e3 / roll["median_ms"]}
        base = by_population.get(str(populations[0]), {}).get(m)
        if base is not None and populations[0] == 1:
            entry["cost_vs_population_1"] = meta["median_ms"] / base["meta_ms_per_step"]["median_ms"]
            entry["rollout_cost_vs_population_1"] = roll["median_ms"] / base["rollout_ms_per_step"]["median_ms"]
        eager = by_population.get(str(k), {}).get(m.removesuffix(COMPILED))
        if m.endswith(COMPILED) and eager is not None:  # the eager rule's time over the compiled one's, same run
            entry["speedup_over_eager"] = eager["meta_ms_per_step"]["median_ms"] / meta["median_ms"]
            entry["rollout_speedup_over_eager"] = eager["rollout_ms_per_step"]["median_ms"] / roll["median_ms"]
        by_population.setdefault(str(k), {})[m] = entry
    for k, m in cases:  # the fused cell kernels (the default model) against torch's ops (+torchcell), same run
        row = by_population[str(k)]
        if m.endswith(TORCH_CELL) and m.removesuffix(TORCH_CELL) in row:
            fused = row[m.removesuffix(TORCH_CELL)]
            fused["fused_cell_speedup"] = (row[m]["meta_ms_per_step"]["median_ms"]
                                           / fused["meta_ms_per_step"]["median_ms"])
    results = by_population[str(populations[0])]  # the smallest population, in the one-population schema
    env["cell_kernels_used"] = any(d.type == device.type for d in kernels._cell_checked)  # the fused cell kernels ran
    env["load_avg_end"] = list(os.getloadavg())
    env["wall_s"] = time.perf_counter() - t_start
    out = {"benchmark": "meta_step", "schema_version": 1, "env": env,
           "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
           "config": {"task": args.task, "optimizee_params": task.num_params, "batch_size": task.batch_size,
                      "unroll": args.unroll, "horizon": args.horizon, "warmup": args.warmup, "repeats": args.repeats,
                      "populations": populations, "repeats_large": args.repeats_large,
                      "meta_optimizer": f"Adam(lr={args.meta_lr}) for every model", "seed": args.seed,
                      "timing": "per round and model, back to back: (meta) meta_unroll of `unroll` steps + "
                                "backward + meta-optimizer step; (plain) task.loss_and_grad on `unroll` minibatches "
                                "at the current parameters; (rollout) the same minibatches, no grad, plus the rule's "
                                "forward and the parameter update; each divided by `unroll`. Model order rotates "
                                "between rounds. cpu_user_ms/cpu_sys_ms/minor_faults: getrusage(RUSAGE_SELF) deltas "
                                "per unrolled step (mean).",
                      "data": data},
           "results": results, "results_by_population": by_population}
    return emit(out, args.out)


if __name__ == "__main__":
    main()
