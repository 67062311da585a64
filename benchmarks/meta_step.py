"""Cost of meta-training per unrolled optimizee step, next to the optimizee's own forward+backward.

For each model (dm, rnnprop, scale) on MLP-orig (784-20-10 sigmoid, batch 128): one timed
"truncation" = ``meta_unroll`` of ``--unroll`` (20) steps + ``backward`` of the meta-loss + an
Adam step on the rule's weights, divided by the unroll length. In the same round, right after it,
the plain optimizee forward+backward (``task.loss_and_grad``, no meta-graph) is timed on the
batches of ``--unroll`` pre-drawn minibatches at the current parameters, also per step, and the
no-grad rollout step (forward+backward of the optimizee + the rule's forward, as in evaluation).
Rounds rotate over the models, so machine load affects all measurements alike; ratios are taken
within the run.

    python benchmarks/meta_step.py --threads 1 --out benchmarks/results/meta_step.json

Prints the JSON (schema in benchmarks/README.md); ``--out`` also writes it.
"""
from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from learned_optim.rules import build_rule  # noqa: E402
from meta_train.tasks import Task  # noqa: E402
from meta_train.trainer import GRAD_CLIP_SCALE, MODEL_DEFAULTS  # noqa: E402
from meta_train.unroll import Trajectory, meta_unroll, start  # noqa: E402

MODELS = ("dm", "rnnprop", "scale")


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
    """One model's meta-training state: the rule, its Adam, the generator and the trajectory."""

    def __init__(self, model: str, task: Task, args, device: torch.device):
        torch.manual_seed(args.seed)
        self.model, self.task, self.args = model, task, args
        self.rule = build_rule(model).to(device)
        self.meta_opt = torch.optim.Adam(self.rule.parameters(), lr=args.meta_lr)
        self.objective = MODEL_DEFAULTS[model]["objective"]
        self.gen = torch.Generator().manual_seed(args.seed)
        self.traj: Trajectory = start(self.rule, task, self.gen)
        self.restarts = 0

    def maybe_restart(self) -> None:  # untimed: a fresh optimizee every --horizon steps, as in training
        if self.traj.step >= self.args.horizon:
            self.traj = start(self.rule, self.task, self.gen)
            self.restarts += 1

    def meta_truncation(self) -> None:
        loss, traj, values = meta_unroll(self.rule, self.task, self.traj, self.args.unroll, self.gen,
                                         objective=self.objective)
        self.meta_opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.model == "scale":  # as meta_train.trainer: meta-gradients made finite, then value-clipped
            for p in self.rule.parameters():
                if p.grad is not None:
                    p.grad.nan_to_num_(0.0, GRAD_CLIP_SCALE, -GRAD_CLIP_SCALE).clamp_(-GRAD_CLIP_SCALE,
                                                                                        GRAD_CLIP_SCALE)
        self.meta_opt.step()
        self.traj = traj if math.isfinite(values[-1]) else start(self.rule, self.task, self.gen)

    def batches(self) -> list:
        return [self.task.sample_batch(self.gen) for _ in range(self.args.unroll)]

    def plain(self, batches) -> None:
        theta = self.traj.theta
        for b in batches:
            self.task.loss_and_grad(theta, b)

    @torch.no_grad()
    def rollout(self, batches) -> None:
        theta, state = self.traj.theta, self.traj.state
        for i, b in enumerate(batches):
            _, grad = self.task.loss_and_grad(theta, b)
            update, state = self.rule(grad, state, self.traj.step + i + 1)
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
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}; choose from {','.join(MODELS)}")
    if args.repeats < 1 or args.warmup < 0 or args.unroll < 1:
        raise SystemExit("--repeats and --unroll must be >= 1, --warmup >= 0")
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
    t_start = time.perf_counter()
    task, data = load_task(args.task, args.data_root, device)
    benches = {m: Bench(m, task, args, device) for m in models}
    times = {m: {"meta": [], "plain": [], "rollout": []} for m in models}
    for r in range(args.warmup + args.repeats):
        order = models[r % len(models):] + models[: r % len(models)]
        for m in order:
            b = benches[m]
            b.maybe_restart()
            batches = b.batches()  # drawn before the truncation: plain/rollout use the same parameters
            measured = {"meta": timed(b.meta_truncation), "plain": timed(b.plain, batches),
                        "rollout": timed(b.rollout, batches)}
            if r >= args.warmup:
                for kind, value in measured.items():
                    times[m][kind].append(value)
    results = {}
    for m in models:
        meta, plain, roll = (summary(times[m][k]) for k in ("meta", "plain", "rollout"))
        paired = [a[0] / b[0] for a, b in zip(times[m]["meta"], times[m]["plain"])]
        results[m] = {"objective": benches[m].objective, "rule_params": sum(p.numel() for p in benches[m].rule.parameters()),
                      "meta_ms_per_step": meta, "plain_fwd_bwd_ms_per_step": plain, "rollout_ms_per_step": roll,
                      "ratio_meta_to_plain": meta["median_ms"] / plain["median_ms"],
                      "ratio_meta_to_plain_paired_median": quantile(paired, 0.5),
                      "ratio_rollout_to_plain": roll["median_ms"] / plain["median_ms"],
                      "optimizee_restarts": benches[m].restarts}
    env["load_avg_end"] = list(os.getloadavg())
    env["wall_s"] = time.perf_counter() - t_start
    out = {"benchmark": "meta_step", "schema_version": 1, "env": env,
           "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
           "config": {"task": args.task, "optimizee_params": task.num_params, "batch_size": task.batch_size,
                      "unroll": args.unroll, "horizon": args.horizon, "warmup": args.warmup, "repeats": args.repeats,
                      "meta_optimizer": f"Adam(lr={args.meta_lr}) for every model", "seed": args.seed,
                      "timing": "per round and model, back to back: (meta) meta_unroll of `unroll` steps + "
                                "backward + meta-optimizer step; (plain) task.loss_and_grad on `unroll` minibatches "
                                "at the current parameters; (rollout) the same minibatches, no grad, plus the rule's "
                                "forward and the parameter update; each divided by `unroll`. Model order rotates "
                                "between rounds. cpu_user_ms/cpu_sys_ms/minor_faults: getrusage(RUSAGE_SELF) deltas "
                                "per unrolled step (mean).",
                      "data": data},
           "results": results}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
