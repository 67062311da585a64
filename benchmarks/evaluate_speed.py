"""Speed of the evaluation protocol: seeds one at a time against all seeds as one population.

For each task and optimizer, the same ``--seeds`` optimizees are trained for ``--steps`` steps twice, in
one process and back to back: (sequential) ``meta_train.evaluate.run_seed`` once per seed, the path that
made the stored results (a real ``nn.Module`` and the optimizer class, one seed after the other); (batched)
``meta_train.evaluate.run_seeds``, the seeds as one population (stacked parameters through
``vmap(functional_call)``, the same optimizer classes). Both include building the task and the optimizer,
as an evaluation does. Reported: optimizee-steps per second of each (seeds x steps / wall time), their
ratio, the extrapolated time of the protocol's 10 seeds x 10,000 steps, and the largest relative
difference between the two paths' loss curves (float rounding; it grows along a trajectory). Learned
optimizers are fresh rules (``torch.manual_seed(0)``), saved to a temporary file: speed does not depend
on the weights.

    python benchmarks/evaluate_speed.py --threads 1 --out benchmarks/results/evaluate_speed.json
    python benchmarks/evaluate_speed.py --device cuda --steps 1000 --out benchmarks/results/evaluate_speed_cuda.json

Prints the JSON; ``--out`` also writes it. Data: the test split from ``--data-root`` /
``$LEARNED_OPTIM_DATA``, else uniform random images of the same shape (said so in ``config.data``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402  (benchmarks/common.py)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import learned_optim  # noqa: E402
from meta_train import evaluate as ev  # noqa: E402
from meta_train.data import load_dataset  # noqa: E402
from meta_train.tasks import IMAGE_SHAPES, TASKS  # noqa: E402

OPTIMIZERS = {"adam": 1e-2, "rmsprop": 1e-3, "sgd": 0.1, "dm": 1.0, "rnnprop": 1.0, "scale": 1.0}
PROTOCOL_SEED_STEPS = 10 * 10_000


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def test_split(task: str, data_root, device: str) -> tuple[tuple[torch.Tensor, torch.Tensor], dict]:
    """The task's test split, else a random synthetic one of the same shape (said so)."""
    dataset = TASKS[task][1]
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)  # the loader tries a download when the files are missing
    try:
        x, y = load_dataset(dataset, train=False, root=data_root, device=device)
        return (x, y), {"source": "real", "dataset": dataset, "n_examples": len(y)}
    except Exception as exc:
        channels, size = IMAGE_SHAPES[dataset]
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(10000, channels, size, size, generator=gen).to(device)
        y = torch.randint(10, (10000,), generator=gen).to(device)
        return (x, y), {"source": "synthetic", "dataset": dataset, "n_examples": len(y),
                        "note": "real data unavailable; uniform random images of the same shape, random labels",
                        "error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        socket.setdefaulttimeout(old)


def max_rel_diff(a: list[list[float | None]], b: list[list[float | None]]) -> float | None:
    """Largest |a - b| / |a| over the steps both curves reached with finite losses (None if none)."""
    diffs = [abs(x - y) / max(abs(x), 1e-30) for ca, cb in zip(a, b) for x, y in zip(ca, cb)
             if x is not None and y is not None]
    return max(diffs) if diffs else None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="mlp-orig", help="comma list (default mlp-orig)")
    ap.add_argument("--optimizers", default="adam,dm,rnnprop,scale",
                    help=f"comma list of {','.join(OPTIMIZERS)} (default adam,dm,rnnprop,scale)")
    ap.add_argument("--seeds", type=int, default=10, help="optimizees per population (default 10, the protocol's)")
    ap.add_argument("--steps", type=int, default=200, help="optimizee steps per seed (default 200)")
    ap.add_argument("--warmup-steps", type=int, default=5, help="untimed steps of both paths first")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    names = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    for t in tasks:
        if t not in TASKS:
            raise SystemExit(f"unknown task {t!r}; choose from {','.join(TASKS)}")
    for o in names:
        if o not in OPTIMIZERS:
            raise SystemExit(f"unknown optimizer {o!r}; choose from {','.join(OPTIMIZERS)}")
    if args.seeds < 1 or args.steps < 1:
        raise SystemExit("--seeds and --steps must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "device": args.device,
           "load_avg_start": list(os.getloadavg()), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    t_start = time.perf_counter()
    results, data_info = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = {}
        for name in names:
            if name in ev.BASELINES:
                continue
            torch.manual_seed(0)
            path = Path(tmp) / f"{name}.safetensors"
            weights[name] = str(learned_optim.save_weights(learned_optim.build_rule(name), path))
        for task in tasks:
            data, data_info[task] = test_split(task, args.data_root, args.device)
            for name in names:
                optimizer = weights.get(name, name)
                spec = ev.make_spec(optimizer, task, lr=OPTIMIZERS[name], steps=args.steps, seeds=args.seeds,
                                    device=args.device, injected_data=True)
                warm = ev.make_spec(optimizer, task, lr=OPTIMIZERS[name], steps=args.warmup_steps, seeds=2,
                                    device=args.device, injected_data=True)
                if args.warmup_steps:
                    ev.run_seed(warm, 0, data)
                    ev.run_seeds(warm, warm.seeds, data)
                timings, curves = {}, {}
                for mode in ("sequential", "batched"):
                    sync()
                    t0 = time.perf_counter()
                    if mode == "sequential":
                        records = [ev.run_seed(spec, seed, data) for seed in spec.seeds]
                    else:
                        records = ev.run_seeds(spec, spec.seeds, data)
                    sync()
                    timings[mode] = time.perf_counter() - t0
                    curves[mode] = [r["losses"] for r in records]
                seed_steps = args.seeds * args.steps
                entry = {"task": task, "optimizer": name, "lr": OPTIMIZERS[name], "seeds": args.seeds,
                         "steps": args.steps, "optimizee_params": sum(
                             p.numel() for p in TASKS[task][0](*IMAGE_SHAPES[TASKS[task][1]]).parameters()),
                         "max_rel_diff_of_curves": max_rel_diff(curves["sequential"], curves["batched"]),
                         "curves_identical": curves["sequential"] == curves["batched"]}
                for mode, seconds in timings.items():
                    entry[mode] = {"seconds": seconds, "seed_steps_per_s": seed_steps / seconds,
                                   "protocol_10x10000_s": PROTOCOL_SEED_STEPS * seconds / seed_steps}
                entry["speedup_batched"] = timings["sequential"] / timings["batched"]
                results.append(entry)
                print(f"{task} {name}: sequential {entry['sequential']['seed_steps_per_s']:.0f} seed-steps/s, "
                      f"batched {entry['batched']['seed_steps_per_s']:.0f} (x{entry['speedup_batched']:.2f})",
                      file=sys.stderr)
    env["load_avg_end"] = list(os.getloadavg())
    env["wall_s"] = time.perf_counter() - t_start
    out = {"benchmark": "evaluate_speed", "schema_version": 1, "env": env,
           "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
           "config": {"seeds": args.seeds, "steps": args.steps, "warmup_steps": args.warmup_steps, "data": data_info,
                      "timing": "wall time of run_seed over every seed (sequential, one process) and of run_seeds "
                                "(batched), back to back per task and optimizer, each including the task and "
                                "optimizer set-up; protocol_10x10000_s extrapolates linearly to 10 seeds x 10,000 "
                                "steps"},
           "results": results}
    return emit(out, args.out)


if __name__ == "__main__":
    main()
