"""Host cost of the fused ``step()``: the Python work per step, with the Triton launches replaced by no-ops.

On a GPU the fused L2O-DM / RNNprop step is a few kernel launches per param group, and for a model of many
small tensors what the host does before the launches (walking the group, checking the cached plan, filling
the pointer table) can cost more than the kernels: the GPU waits for it. This measures that work on any
machine, GPU or not: the optimizer takes its fused path on CPU tensors with the three kernels
(``_nonfinite_kernel``, ``_lstm_step_kernel``, ``_advance_steps_kernel``) stubbed, so a step is exactly the
host side of a real one minus the launches themselves and the table's copy to the device (on a GPU: one
pinned, non-blocking copy). Gradients alternate between two sets of tensors from step to step, as a
training loop's fresh gradients do, so the plan's per-step gradient pointers are exercised.

Side by side in the same rounds: ``torch.optim.Adam(foreach=True)``'s own host-side work is not separable
from its CPU kernels, so the reference is the cost of a bare Python walk over the group,
``[p.grad for p in params]`` (``walk``), the floor of any per-step work that looks at every tensor.

    python benchmarks/step_host.py --sizes 1M --layouts matrix,many --out benchmarks/results/step_host.json
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402
from step import LEARNED, SIZES, env_info, layout, parse_sizes, summary  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import learned_optim  # noqa: E402
from learned_optim import kernels  # noqa: E402


class _NoLaunch:
    """Stands in for a ``triton.jit`` kernel: ``kernel[grid](*args, **meta)`` and ``kernel.warmup`` do nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None

    def warmup(self, *args, **kwargs):  # the compile check of a freshly scanned plan
        return None


@contextlib.contextmanager
def stubbed_kernels():
    """The fused path on CPU tensors, with its launches as no-ops."""
    from learned_optim.kernels import lstm

    saved = (kernels.use_kernel, lstm._nonfinite_kernel, lstm._lstm_step_kernel, lstm._advance_steps_kernel)
    kernels.use_kernel = lambda backend, rule, device: rule.name in ("dm", "rnnprop") and backend != "torch"
    lstm._nonfinite_kernel = lstm._lstm_step_kernel = lstm._advance_steps_kernel = _NoLaunch()
    try:
        yield
    finally:
        kernels.use_kernel, lstm._nonfinite_kernel, lstm._lstm_step_kernel, lstm._advance_steps_kernel = saved


def run_case(size: str, shape: str, models: list[str], repeats: int, steps: int) -> dict:
    n = SIZES[size]
    shapes = layout(n, shape)
    gen = torch.Generator().manual_seed(0)
    cases = {}
    for name in models:
        params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]
        grads = [[torch.randn(s, generator=gen) * 1e-3 for s in shapes] for _ in range(2)]
        opt = LEARNED[name](params, learned_optim.build_rule(name), backend="auto")  # fresh: the cost is the same
        cases[name] = (params, grads, opt)

    def fused(name):
        params, grads, opt = cases[name]

        def run(i):
            for p, g in zip(params, grads[i % 2]):
                p.grad = g
            start = time.perf_counter()
            opt.step()
            return time.perf_counter() - start
        return run

    def walk(i):
        params, grads, _ = cases[models[0]]
        for p, g in zip(params, grads[i % 2]):
            p.grad = g
        start = time.perf_counter()
        [p.grad for p in params]
        return time.perf_counter() - start

    runners = {name: fused(name) for name in models}
    runners["walk"] = walk
    for run in runners.values():  # first steps: state and plan built
        for i in range(3):
            run(i)
    for name in models:  # what is timed must be the fused path's fast plan, not the torch path
        if not any(k[0] == "fast" for k in cases[name][2]._kernel_cache):
            raise RuntimeError(f"{name}: step() did not take the fused path's fast plan; nothing to measure")
    times = {name: [] for name in runners}
    for r in range(repeats):
        order = list(runners)[r % len(runners):] + list(runners)[:r % len(runners)]
        for name in order:  # the median over `steps` consecutive steps, one value per round
            times[name].append(statistics.median(runners[name](i) for i in range(steps)))
    out = {"size": size, "shape": shape, "num_params": n, "num_tensors": len(shapes), "results": {}}
    for name, ts in times.items():
        entry = summary(ts)
        entry["per_tensor_us"] = entry["median_ms"] * 1e3 / len(shapes)
        out["results"][name] = entry
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1M", help="comma list of " + ",".join(SIZES))
    parser.add_argument("--layouts", default="matrix,many")
    parser.add_argument("--models", default="dm,rnnprop")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds")
    parser.add_argument("--steps", type=int, default=10, help="steps per round (their median is the round's time)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in ("dm", "rnnprop"):
            parser.error(f"--models: the fused kernel exists for dm and rnnprop, not {m!r}")
    out = {"benchmark": "step_host", "env": env_info(torch.device("cpu")),
           "method": "host time of opt.step() on the fused path, Triton launches stubbed (benchmarks/step_host.py); "
                     "walk = [p.grad for p in params], the floor of any per-tensor host work",
           "config": {"repeats": args.repeats, "steps": args.steps, "threads": args.threads}, "cases": []}
    with stubbed_kernels():
        for size in parse_sizes(args.sizes):
            for shape in args.layouts.split(","):
                out["cases"].append(run_case(size, shape, models, args.repeats, args.steps))
                emit(out, args.out) if args.out else None
    return emit(out, args.out)


if __name__ == "__main__":
    main()
