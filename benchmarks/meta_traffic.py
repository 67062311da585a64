"""Memory traffic of a meta-training step as a GPU runs it, counted on any machine: kernels and bytes per unrolled
step, with the rules' LSTM cell as torch ops and through the fused cell kernels (``learned_optim.kernels.cell``).

On a GPU a meta-training step of a population is a sequence of memory-bound kernels, so its floor is the bytes
they move over the memory bandwidth (and, for small populations, their count times the launch cost). This
counts both without a GPU: one truncation of ``meta_train``'s unroll (forward, and the backward of the
meta-loss) runs on the CPU under a ``TorchDispatchMode`` that records every aten operator with the bytes of its
tensor arguments and results (views and metadata operators excluded, and the draws of batch indices, which
are CPU work on a GPU too; a gather such as indexing counts what it reads and writes, not its whole source). The element-wise tanh is counted as a GPU runs it (``torch.tanh``, not the
CPU's sigmoid form). With ``cell=fused`` the cell kernels run under Triton's interpreter and each launch
counts as one kernel with its exact traffic (forward: reads the gates and c, writes h' and c'; backward: reads
the gates, c, dh', dc', writes the gates' gradient and dc). ``floor_ms`` is bytes / ``--bandwidth`` (default
4.3e12 B/s, about what an H200 streams): a lower bound, not a prediction of the time (the matrix products,
launch latency and caches are not in it).

    TRITON_INTERPRET=1 python benchmarks/meta_traffic.py --population 1,8,64 --out benchmarks/results/meta_traffic.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402
from meta_step import Bench, load_task  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import learned_optim.rules.base as rules_base  # noqa: E402
import meta_train.unroll as unroll  # noqa: E402
from learned_optim import kernels  # noqa: E402

#: operators that only make views or change metadata: no kernel, no traffic
VIEWS = {"view", "_unsafe_view", "t", "transpose", "expand", "as_strided", "detach", "unsqueeze", "squeeze", "slice",
         "select", "split", "split_with_sizes", "permute", "reshape", "alias", "unbind", "chunk", "narrow",
         "_reshape_alias", "lift_fresh", "view_as", "empty", "empty_like", "empty_strided", "_to_copy_noop"}
GATHERS = {"index", "gather", "index_select", "embedding"}
#: host work on a GPU too: each member's batch indices are drawn on its CPU generator
HOST = {"randint"}


def _nbytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


class Traffic(TorchDispatchMode):
    """Counts kernels and bytes per operator."""

    def __init__(self):
        super().__init__()
        self.kernels, self.bytes = Counter(), Counter()
        self.paused = False  # inside a fused launch: the interpreter's own copies are not GPU traffic

    def add(self, name: str, nbytes: int) -> None:
        self.kernels[name] += 1
        self.bytes[name] += nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in VIEWS or name in HOST or self.paused:
            return out
        self.add(name, 2 * _nbytes(out) if name in GATHERS else _nbytes((args, kwargs, out)))
        return out


def _count_cell_kernels(counter_of):
    """Make each fused cell launch count as one kernel with its traffic; returns the function that undoes it."""
    from learned_optim.kernels import cell

    forward, backward = cell.cell_forward, cell.cell_backward

    def counted(name, fn, tensors, *args):
        counter = counter_of()
        if counter is None:
            return fn(*args)
        counter.paused = True
        try:
            out = fn(*args)
        finally:
            counter.paused = False
        counter.add(name, _nbytes((tensors, out)))
        return out

    def counted_forward(gates, c):
        return counted("cell_forward (fused)", forward, (gates, c), gates, c)

    def counted_backward(gates, c, dh, dc, need_dc=True):
        return counted("cell_backward (fused)", backward, (gates, c, dh, dc), gates, c, dh, dc, need_dc)

    cell.cell_forward, cell.cell_backward = counted_forward, counted_backward

    def undo():
        cell.cell_forward, cell.cell_backward = forward, backward

    return undo


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="dm,rnnprop")
    ap.add_argument("--population", default="1,8", help="comma list of population sizes K")
    ap.add_argument("--task", default="mlp-orig")
    ap.add_argument("--unroll", type=int, default=5, help="steps per counted truncation (the counts are per step)")
    ap.add_argument("--cells", default="torch,fused", help="comma list of torch,fused (fused: TRITON_INTERPRET=1)")
    ap.add_argument("--bandwidth", type=float, default=4.3e12, help="bytes per second for floor_ms")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cells = [c for c in args.cells.split(",") if c]
    if "fused" in cells and not (kernels.triton_available() and kernels.interpreter_enabled()):
        raise SystemExit("--cells fused runs the cell kernels under Triton's interpreter: set TRITON_INTERPRET=1")
    populations = sorted({int(k) for k in args.population.split(",") if k.strip()})
    started = time.perf_counter()
    saved = unroll.POPULATION_BLOCK, rules_base.fast_tanh
    unroll.POPULATION_BLOCK = 1 << 62  # one rule call over the population's coordinates, as on a GPU
    rules_base.fast_tanh = torch.tanh  # the element-wise tanh as a GPU runs it
    active: list[Traffic | None] = [None]
    undo = _count_cell_kernels(lambda: active[0]) if "fused" in cells else (lambda: None)
    try:
        results, data = _count(args, cells, populations, active)
    finally:
        unroll.POPULATION_BLOCK, rules_base.fast_tanh = saved
        undo()
    return emit({"benchmark": "meta_traffic", "schema_version": 1,
                 "env": {"torch": torch.__version__, "wall_s": time.perf_counter() - started, "data": data,
                         "triton_interpret": os.environ.get("TRITON_INTERPRET")},
                 "command": "meta_traffic.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "config": {"task": args.task, "unroll": args.unroll, "bandwidth_bytes_per_s": args.bandwidth},
                 "results": results}, args.out)


def _count(args, cells: list[str], populations: list[int], active: list) -> tuple[dict, dict]:
    task, data = load_task(args.task, args.data_root, torch.device("cpu"))
    bench_args = argparse.Namespace(seed=0, meta_lr=1e-3, unroll=args.unroll, horizon=10 * args.unroll)
    results = {}
    for model in [m for m in args.models.split(",") if m]:
        for k in populations:
            row = {}
            for cell in cells:
                with kernels.cell_kernel("on" if cell == "fused" else "off"):
                    bench = Bench(model, task, bench_args, torch.device("cpu"), k)
                    bench.meta_truncation()  # first use: lazy state, caches
                    active[0] = counter = Traffic()
                    with counter:
                        bench.meta_truncation()
                    active[0] = None
                total = sum(counter.bytes.values()) / args.unroll
                row[cell] = {"kernels_per_step": sum(counter.kernels.values()) / args.unroll,
                             "bytes_per_step": total, "bytes_per_step_per_optimizee": total / k,
                             "floor_ms": total / args.bandwidth * 1e3,
                             "top": {name: {"kernels": counter.kernels[name] / args.unroll, "bytes": b / args.unroll}
                                     for name, b in counter.bytes.most_common(8)}}
                print(f"# {model} K={k} cell={cell}: {row[cell]['kernels_per_step']:.0f} kernels, "
                      f"{total / 1e9:.3f} GB per unrolled step (floor {row[cell]['floor_ms']:.3f} ms)", file=sys.stderr)
            if "torch" in row and "fused" in row:
                row["fused_over_torch"] = {"kernels": row["fused"]["kernels_per_step"] / row["torch"]["kernels_per_step"],
                                           "bytes": row["fused"]["bytes_per_step"] / row["torch"]["bytes_per_step"]}
            results.setdefault(model, {})[str(k)] = row
    return results, data


if __name__ == "__main__":
    main()
