"""Cost of one ``optimizer.step()`` of the learned optimizers next to ``torch.optim.Adam(foreach=True)``.

For every model size (10k, 100k, 1M, 10M parameters) and two parameter shapes -- ``matrix`` (one
(n/1000, 1000) tensor) and ``many`` (a network-like list of (k, 64) tensors of 64..4096 elements) --
the optimizers run side by side in one process: every timed round steps each of them once (the
order rotates between rounds), so machine load hits them alike. Gradients are pre-filled with
random values once; only ``opt.step()`` is timed. Rules are freshly initialised (no weights): the
cost does not depend on the trained values.

Also measured, in the same rounds: the "GEMM floor" of each rule (its bare matrix products, with
preallocated outputs, on random feature-major inputs of the same sizes, chunked like the optimizer)
and, on CUDA (or with ``--bandwidth-floor on``), the "bandwidth floor" of each optimizer: a device
copy moving the bytes its step must read and write (parameter, gradient and state read; parameter
and state written); after the timing, per optimizer: the peak temporary memory of one step (torch
profiler allocation events, see ``memory_method`` in the JSON) and the state bytes per parameter.
``--backends torch,triton`` times L2O-DM and RNNprop once per backend (``dm[torch]``, ``dm[triton]``).

    python benchmarks/step.py --sizes 10k,100k,1M --repeats 10 --out benchmarks/results/step.json
    python benchmarks/step.py --device cuda --sizes 1M,10M --backends torch,triton --out results/gpu/step.json

Prints the JSON (schema in benchmarks/README.md); ``--out`` also writes it.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402  (benchmarks/common.py)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import learned_optim  # noqa: E402

SIZES = {"10k": 10_000, "100k": 100_000, "1M": 1_000_000, "10M": 10_000_000, "100M": 100_000_000}
SMALL_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)  # "many": cycled, each a (k, 64) tensor
LEARNED = {"dm": learned_optim.L2ODM, "rnnprop": learned_optim.RNNprop, "scale": learned_optim.L2OScale}
FUSED = ("dm", "rnnprop")  # the rules with a Triton kernel (learned_optim.kernels); L2O-Scale: torch path only
FLOOR_PIECE = 1 << 30  # bytes per device copy of the bandwidth floor (bounded buffers at any model size)

# multiply-adds of each rule's matrix products, x2 = flops
FLOPS_PER_COORD = {
    "dm": 2 * (22 * 80 + 40 * 80 + 20 * 1),  # LSTM1 [x(2);h(20)]->80, LSTM2 [20;20]->80, readout 20->1
    "rnnprop": 2 * (2 * 20 + 40 * 80 + 40 * 80 + 20 * 1),  # input proj 2->20, 2 LSTMs [20;20]->80, readout
    # per-coordinate GRU: W_ih (30,12), W_hh (30,10); readouts direction/log_lr/scl/inp 10->1, shortcut 4->1
    "scale": 2 * (12 * 30 + 10 * 30 + 4 * 10 + 4),
}
# L2O-Scale's per-tensor work: tensor_to_param 20->30, tensor GRU W_ih (60,22), W_hh (60,20)
SCALE_FLOOR_PIECE = 1 << 20
FLOPS_PER_TENSOR = {"dm": 0, "rnnprop": 0, "scale": 2 * (20 * 30 + 22 * 60 + 20 * 60)}
MEMORY_METHOD_CPU = ("torch.profiler.profile(profile_memory=True) around one step(); the allocation events "
                     "(alloc +bytes / free -bytes, all devices) sorted by time, cumulative sum, maximum. Counts "
                     "every tensor allocated during step() beyond what existed before it (the optimizer state "
                     "already exists: measured after the warm-up), i.e. the temporaries of the step.")
MEMORY_METHOD_CUDA = ("torch.cuda.max_memory_allocated() during one step() minus memory_allocated() before it "
                      "(reset_peak_memory_stats first).")


# ---------------------------------------------------------------------- helpers
def parse_sizes(text: str) -> list[str]:
    out = []
    for s in text.split(","):
        s = s.strip()
        if s not in SIZES:
            raise SystemExit(f"unknown size {s!r}; choose from {','.join(SIZES)}")
        out.append(s)
    return out


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(times_s: list[float]) -> dict:
    ms = [t * 1e3 for t in times_s]
    return {"median_ms": quantile(ms, 0.5), "iqr_ms": [quantile(ms, 0.25), quantile(ms, 0.75)],
            "min_ms": min(ms), "times_ms": [round(t, 4) for t in ms]}


def usage_summary(u, repeats: int) -> dict:
    """Process CPU time and minor page faults per timed call (getrusage(RUSAGE_SELF), all threads)."""
    user, sys_, faults = u[0] / repeats, u[1] / repeats, u[2] / repeats
    return {"cpu_user_ms": user * 1e3, "cpu_sys_ms": sys_ * 1e3,
            "sys_fraction": sys_ / (user + sys_) if user + sys_ > 0 else 0.0, "minor_faults": faults}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def env_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(), "device": str(device), "load_avg_start": list(os.getloadavg()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "allocator_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def layout(n: int, shape: str) -> list[tuple[int, ...]]:
    if shape == "matrix":
        return [(n // 1000, 1000)]
    shapes, total = [], 0
    for s in itertools.cycle(SMALL_SIZES):
        s = min(s, n - total)
        if s <= 0:
            break
        shapes.append((s // 64, 64) if s % 64 == 0 else (s,))
        total += s
    return shapes


def make_params(shapes, device, seed: int, grad_std: float) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(device))
        p.grad = (torch.randn(s, generator=gen) * grad_std).to(device)
        params.append(p)
    return params


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.nbytes for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_temp_bytes(fn: Callable[[], None], device: torch.device) -> int | None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            allocs.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    allocs.sort()
    return max(itertools.accumulate(a for _, a in allocs), default=0)


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# state bytes per parameter, and temporaries of one step (measured: L2O-Scale ~9 B per parameter of the whole
# group plus its chunk; the chunked rules ~1150 B per coordinate of one chunk)
_STATE_B = {"adam": 8, "dm": 320, "rnnprop": 328, "scale": 84, "dm_bf16": 160}


def estimate_bytes(n: int, names: list[str], chunk_size: int) -> int:
    names = [base_name(k) for k in names]
    params = 8 * n * len(names)  # each optimizer's own parameters + gradients
    state = sum(_STATE_B[k] * n for k in names)
    temp = max([4 * n] + [(12 * n if k == "scale" else 0) + 1200 * min(n, chunk_size) for k in names if k != "adam"])
    floors = 57 * 4 * min(n, SCALE_FLOOR_PIECE) if "scale" in names else 0
    return int(1.1 * (params + state + temp + floors)) + (256 << 20)


def base_name(name: str) -> str:
    """'dm[triton]' -> 'dm'."""
    return name.split("[", 1)[0]


def optimizer_names(models: list[str], backends: list[str], size: str, args) -> list[tuple[str, str, str]]:
    """(name, rule, backend) of every optimizer timed at ``size``."""
    out = []
    for m in models:
        if m not in FUSED or backends == ["auto"]:
            out.append((m, m, "auto"))
            continue
        for b in backends:
            if b == "torch" and args.torch_max_size and SIZES[size] > SIZES[args.torch_max_size]:
                continue
            out.append((f"{m}[{b}]", m, b))
    for cfg in args.triton_configs:  # extra kernel launch configurations, e.g. dm[triton:128x8:tf32]
        for m in models:
            if m in FUSED:
                out.append((f"{m}[triton:{cfg}]", m, "triton"))
    if args.bf16_size == size and "dm" in models:
        for b in (["auto"] if backends == ["auto"] else backends):
            if b == "torch" and args.torch_max_size and SIZES[size] > SIZES[args.torch_max_size]:
                continue
            out.append(("dm_bf16" if b == "auto" else f"dm_bf16[{b}]", "dm_bf16", b))
    return out


def with_launch_config(name: str, step: Callable[[], None]) -> Callable[[], None]:
    """``dm[triton:128x8:tf32:128]``: step with BLOCK 128, 8 warps, tl.dot precision tf32, at most 128 registers
    per thread (learned_optim.kernels reads LEARNED_OPTIM_TRITON_* at every step); other names: ``step``."""
    if "[triton:" not in name:
        return step
    block_warps, *rest = name.split("[triton:", 1)[1].rstrip("]").split(":")
    block, _, warps = block_warps.partition("x")
    env = {"LEARNED_OPTIM_TRITON_BLOCK": block, "LEARNED_OPTIM_TRITON_WARPS": warps}
    if rest and rest[0]:
        env["LEARNED_OPTIM_TRITON_PRECISION"] = rest[0]
    if len(rest) > 1:
        env["LEARNED_OPTIM_TRITON_MAXNREG"] = rest[1]

    def run():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            step()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return run


def traffic_bytes(opt: torch.optim.Optimizer) -> dict:
    """Bytes one step must move at the least: read parameter, gradient and state, write parameter and state."""
    params = [p for g in opt.param_groups for p in g["params"]]
    p_bytes = sum(p.nbytes for p in params)
    g_bytes = sum(p.grad.nbytes for p in params if p.grad is not None)
    s_bytes = state_bytes(opt)
    return {"read": p_bytes + g_bytes + s_bytes, "write": p_bytes + s_bytes}


def bandwidth_floor(total_bytes: int, device: torch.device, buffers: dict) -> Callable[[], None]:
    """A device copy that reads and writes ``total_bytes`` in all (total/2 copied), in pieces of FLOOR_PIECE."""
    half = total_bytes // 2
    pieces = [FLOOR_PIECE] * (half // FLOOR_PIECE) + ([half % FLOOR_PIECE] if half % FLOOR_PIECE else [])
    if "src" not in buffers:
        size = min(max(pieces, default=0), FLOOR_PIECE)
        buffers["src"] = torch.ones(size, dtype=torch.uint8, device=device)
        buffers["dst"] = torch.empty(size, dtype=torch.uint8, device=device)
    src, dst = buffers["src"], buffers["dst"]

    def run():
        for c in pieces:
            dst[:c].copy_(src[:c])
    return run


# ---------------------------------------------------------------------- GEMM floors
def gemm_floor(rule: str, n: int, num_tensors: int, chunk_size: int, device: torch.device) -> Callable[[], None]:
    """The rule's bare matrix products on random feature-major inputs: torch.mm into preallocated outputs,
    over chunks of ``chunk_size`` coordinates for the coordinate-wise rules, the whole group for L2O-Scale."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    if rule in ("dm", "rnnprop"):
        # (weight rows, weight cols) of each product, applied to a (cols, c) input
        mats = ([(80, 22), (80, 40), (1, 20)] if rule == "dm" else [(20, 2), (80, 40), (80, 40), (1, 20)])
        weights = [rand(r, k) for r, k in mats]
        chunks = [chunk_size] * (n // chunk_size) + ([n % chunk_size] if n % chunk_size else [])
        bufs = {}
        for c in set(chunks):
            bufs[c] = [(rand(k, c), torch.empty(r, c, device=device)) for r, k in mats]

        def run():
            for c in chunks:
                for w, (x, out) in zip(weights, bufs[c]):
                    torch.mm(w, x, out=out)
        return run
    # L2O-Scale: whole group (in pieces of SCALE_FLOOR_PIECE coordinates beyond that, to bound the buffers;
    # the products are linear in N there); per coordinate GRU (30x12, 30x10) + 5 readouts, per tensor 3 products
    w_ih, w_hh, w_read, w_short = rand(30, 12), rand(30, 10), rand(4, 10), rand(1, 4)
    pieces = [SCALE_FLOOR_PIECE] * (n // SCALE_FLOOR_PIECE) + ([n % SCALE_FLOOR_PIECE] if n % SCALE_FLOOR_PIECE else [])
    t = num_tensors
    wt = [rand(30, 20), rand(60, 22), rand(60, 20)]
    xt = [rand(20, t), rand(22, t), rand(20, t)]
    outt = [torch.empty(w.shape[0], t, device=device) for w in wt]
    views = {c: (rand(12, c), rand(10, c), rand(4, c), torch.empty(30, c, device=device),
                 torch.empty(1, c, device=device)) for c in set(pieces)}

    def run():
        for c in pieces:
            x, h, s, o30, o1 = views[c]
            torch.mm(w_ih, x, out=o30)
            torch.mm(w_hh, h, out=o30)
            for i in range(4):  # direction, log_lr, scl_decay, inp_decay: 10 -> 1 each
                torch.mm(w_read[i: i + 1], h, out=o1)
            torch.mm(w_short, s, out=o1)
        for w, x, o in zip(wt, xt, outt):
            torch.mm(w, x, out=o)
    return run


def _triton_launch(device: torch.device) -> dict | None:
    """The fused kernels' launch configuration (BLOCK, num_warps, tl.dot precision), when they can run."""
    from learned_optim import kernels

    if device.type != "cuda" or not kernels.triton_available():
        return None
    from learned_optim.kernels import lstm

    return lstm.launch_config()


# ---------------------------------------------------------------------- one (size, shape) case
def run_case(size: str, shape: str, args, device: torch.device) -> dict:
    n = SIZES[size]
    shapes = layout(n, shape)
    specs = [("adam", "adam", "auto")] + optimizer_names(args.models, args.backends, size, args)
    names = [name for name, _, _ in specs]
    need = estimate_bytes(n, names, args.chunk_size) + (2 * FLOOR_PIECE if args.floor else 0)
    avail = mem_available() if device.type == "cpu" else torch.cuda.mem_get_info(device)[0]
    if avail is not None and need > avail and not args.force:
        where = "MemAvailable" if device.type == "cpu" else "free device memory"
        msg = (f"skipped: needs ~{need / 2**30:.1f} GiB (all optimizers alive at once), {where} "
               f"{avail / 2**30:.1f} GiB; --force to run anyway, or fewer --models")
        print(f"# {size} {shape}: {msg}", file=sys.stderr, flush=True)
        return {"size": size, "n_params": n, "shape": shape, "n_tensors": len(shapes), "skipped": msg}
    opts: dict[str, torch.optim.Optimizer] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "untrained rule": speed does not depend on the weights
        for name, rule, backend in specs:
            params = make_params(shapes, device, seed=args.seed, grad_std=args.grad_std)
            if name == "adam":
                opts[name] = torch.optim.Adam(params, lr=1e-3, foreach=True)
            elif rule == "dm_bf16":
                opts[name] = learned_optim.L2ODM(params, chunk_size=args.chunk_size, state_dtype=torch.bfloat16,
                                                 backend=backend)
            else:
                opts[name] = LEARNED[rule](params, chunk_size=args.chunk_size, backend=backend)
    fns: dict[str, Callable[[], None]] = {name: with_launch_config(name, opt.step) for name, opt in opts.items()}
    for m in args.models:
        if not args.no_gemm_floor:
            fns[f"gemm:{m}"] = gemm_floor(m, n, len(shapes), args.chunk_size, device)
    floor_of: dict[str, str] = {}
    if args.floor:
        buffers: dict = {}
        for name, opt in opts.items():
            fns[name]()  # creates the state, whose bytes are part of the traffic
            traffic = traffic_bytes(opt)
            key = f"floor:{traffic['read'] + traffic['write']}"
            floor_of[name] = key
            if key not in fns:
                fns[key] = bandwidth_floor(traffic["read"] + traffic["write"], device, buffers)
    keys = list(fns)
    times: dict[str, list[float]] = {k: [] for k in keys}
    usage = {k: [0.0, 0.0, 0] for k in keys}  # user s, sys s, minor page faults over the timed runs
    host: dict[str, list[float]] = {k: [] for k in keys}  # the call's own host time (on CUDA: until it returns)
    memory: dict[str, dict] = {}

    def probe(name: str) -> None:  # one step under the memory probe (after the state exists)
        try:
            peak = peak_temp_bytes(fns[name], device)
            memory[name] = {"peak_temp_bytes": peak, "peak_temp_bytes_per_param": None if peak is None else peak / n}
        except Exception as exc:  # the profiler API is private; never lose the timings over it
            memory[name] = {"peak_temp_bytes": None, "peak_temp_error": f"{type(exc).__name__}: {exc}"}

    probe_round = args.warmup - 1 if args.warmup >= 2 else None  # the last warm-up round: no extra steps
    for r in range(args.warmup + args.repeats):
        order = keys[r % len(keys):] + keys[: r % len(keys)]  # rotate: no optimizer always runs first
        for k in order:
            if r == probe_round and k in opts and not args.no_memory:
                probe(k)
                continue
            sync(device)
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            if device.type == "cuda":
                events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                events[0].record()
                th = time.perf_counter()
                fns[k]()
                th = time.perf_counter() - th
                events[1].record()
                events[1].synchronize()
            else:
                th = time.perf_counter()
                fns[k]()
                th = time.perf_counter() - th
            sync(device)
            t1 = time.perf_counter()
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            if r >= args.warmup:
                # CUDA: device time between two events around the call (host gaps inside the step included)
                times[k].append(events[0].elapsed_time(events[1]) / 1e3 if device.type == "cuda" else t1 - t0)
                host[k].append(th)
                u = usage[k]
                u[0] += ru1.ru_utime - ru0.ru_utime
                u[1] += ru1.ru_stime - ru0.ru_stime
                u[2] += ru1.ru_minflt - ru0.ru_minflt
    result = {"size": size, "n_params": n, "shape": shape, "n_tensors": len(shapes),
              "tensor_numel_range": [min(math.prod(s) for s in shapes), max(math.prod(s) for s in shapes)],
              "optimizers": {}}
    adam_ms = quantile(times["adam"], 0.5) * 1e3
    for name, opt in opts.items():
        entry = summary(times[name])
        entry["ratio_to_adam"] = entry["median_ms"] / adam_ms
        if device.type == "cuda":  # how long the host took to queue the step: beside median_ms, is it host-bound?
            entry["host_call_ms"] = quantile(host[name], 0.5) * 1e3
        entry.update(usage_summary(usage[name], args.repeats))
        sb = state_bytes(opt)
        entry["state_bytes"] = sb
        entry["state_bytes_per_param"] = sb / n
        rule = "dm" if base_name(name) == "dm_bf16" else base_name(name)
        if name in floor_of:
            traffic = traffic_bytes(opt)
            floor = summary(times[floor_of[name]])
            floor["bytes_read"], floor["bytes_written"] = traffic["read"], traffic["write"]
            floor["bytes_per_param"] = (traffic["read"] + traffic["write"]) / n
            floor["gb_per_s"] = (traffic["read"] + traffic["write"]) / (floor["median_ms"] * 1e-3) / 1e9
            entry["bandwidth_floor"] = floor
            entry["step_over_bandwidth_floor"] = entry["median_ms"] / floor["median_ms"]
        entry["backend"] = getattr(opt, "backend", None)
        if rule in FLOPS_PER_COORD:
            flops = FLOPS_PER_COORD[rule] * n + FLOPS_PER_TENSOR[rule] * len(shapes)
            entry["rule_gflop"] = flops / 1e9
            entry["gflops_per_s"] = flops / (entry["median_ms"] * 1e-3) / 1e9
            if f"gemm:{rule}" in times and not args.no_gemm_floor:
                floor = summary(times[f"gemm:{rule}"])
                floor.update(usage_summary(usage[f"gemm:{rule}"], args.repeats))
                floor["gflops_per_s"] = flops / (floor["median_ms"] * 1e-3) / 1e9
                entry["gemm_floor"] = floor
                entry["step_over_gemm_floor"] = entry["median_ms"] / floor["median_ms"]
        if not args.no_memory:
            if name not in memory:  # fewer than 2 warm-up rounds: probe after the timing
                probe(name)
            entry.update(memory[name])
        result["optimizers"][name] = entry
    del opts, fns
    gc.collect()
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10k,100k,1M,10M", help="comma list of 10k,100k,1M,10M,100M (default: up to 10M)")
    ap.add_argument("--shapes", default="matrix,many", help="comma list of matrix,many")
    ap.add_argument("--models", default="dm,rnnprop,scale", help="learned optimizers to time next to Adam")
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per optimizer (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="the learned optimizers' chunk_size (default: the optimizer's own default)")
    ap.add_argument("--bf16-size", default="1M", help="size at which L2ODM(state_dtype=bfloat16) is also timed "
                                                      "('' to skip)")
    ap.add_argument("--grad-std", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--backends", default="auto",
                    help="comma list of auto,torch,triton,compile: L2O-DM and RNNprop once per backend (default "
                         "auto; compile: torch.compile of the rule, compiled in the warm-up steps)")
    ap.add_argument("--torch-max-size", default=None,
                    help="largest size at which the torch backend of L2O-DM / RNNprop is timed (e.g. 10M)")
    ap.add_argument("--triton-configs", default="",
                    help="extra fused-kernel launch configurations to time, comma list of "
                         "BLOCKxWARPS[:PRECISION[:MAXNREG]] (e.g. 128x8,64x4:tf32,64x4:tf32x3:128)")
    ap.add_argument("--bandwidth-floor", default="auto", choices=["auto", "on", "off"],
                    help="time a device copy of each step's bytes (auto: on CUDA only)")
    ap.add_argument("--no-memory", action="store_true", help="skip the profiler memory measurement")
    ap.add_argument("--no-gemm-floor", action="store_true")
    ap.add_argument("--force", action="store_true", help="run a case even if it looks too big for MemAvailable")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.chunk_size is None:
        import inspect

        args.chunk_size = inspect.signature(learned_optim.LearnedOptimizer).parameters["chunk_size"].default
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.warmup < 0 or args.repeats < 1:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.triton_configs = [c.strip() for c in args.triton_configs.split(",") if c.strip()]
    for b in args.backends:
        if b not in ("auto", "torch", "triton", "compile"):
            raise SystemExit(f"unknown backend {b!r}; choose from auto,torch,triton,compile")
    if args.torch_max_size is not None and args.torch_max_size not in SIZES:
        raise SystemExit(f"unknown --torch-max-size {args.torch_max_size!r}")
    for m in args.models:
        if m not in LEARNED:
            raise SystemExit(f"unknown model {m!r}; choose from {','.join(LEARNED)}")
    shapes = [s.strip() for s in args.shapes.split(",")]
    for s in shapes:
        if s not in ("matrix", "many"):
            raise SystemExit(f"unknown shape {s!r}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    args.floor = args.bandwidth_floor == "on" or (args.bandwidth_floor == "auto" and device.type == "cuda")
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    out = {"benchmark": "step", "schema_version": 1, "env": env_info(device),
           "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
           "config": {"sizes": parse_sizes(args.sizes), "shapes": shapes, "models": args.models,
                      "repeats": args.repeats, "warmup": args.warmup, "chunk_size": args.chunk_size,
                      "bf16_size": args.bf16_size or None, "grad_std": args.grad_std, "seed": args.seed,
                      "backends": args.backends, "torch_max_size": args.torch_max_size,
                      "triton_configs": args.triton_configs,
                      "triton_launch": _triton_launch(device),
                      "bandwidth_floor": ("a device copy (tensor.copy_ in pieces of 1 GiB) of half the bytes one step "
                                          "must read plus write, so that it reads and writes that many in all: "
                                          "parameters + gradients + optimizer state read, parameters + state "
                                          "written (sizes from the optimizer after its first step); timed in the "
                                          "same rounds") if args.floor else None,
                      "matrix_layout": "one (n/1000, 1000) tensor",
                      "many_layout": f"tensors of {SMALL_SIZES} elements cycled (each (k, 64)), last one "
                                     "truncated so they add up to n",
                      "timing": ("CUDA: torch.cuda.Event pair around opt.step() (device time, host gaps inside the "
                                 "step included), synchronized; CPU: " if device.type == "cuda" else "") +
                                "perf_counter around opt.step() only; every round steps each optimizer and "
                                "GEMM floor once, order rotated between rounds; each optimizer owns its own copy "
                                "of the parameters and fixed random gradients",
                      "gemm_floor": "torch.mm of the rule's weight matrices with random feature-major inputs "
                                    "into preallocated outputs; DM: (80,22)x(22,c), (80,40)x(40,c), (1,20)x(20,c); "
                                    "RNNprop: (20,2)x(2,c), 2x (80,40)x(40,c), (1,20)x(20,c); c = chunk_size "
                                    "chunks (and the remainder). Scale (whole group, no chunks): (30,12)x(12,N), "
                                    "(30,10)x(10,N), 4x (1,10)x(10,N), (1,4)x(4,N) + per tensor (30,20), (60,22), "
                                    "(60,20) x (.,T); N in pieces of 2^20 beyond 2^20 (bounded buffers)",
                      "flops_per_coordinate": FLOPS_PER_COORD, "flops_per_tensor": FLOPS_PER_TENSOR,
                      "cpu_usage": "cpu_user_ms / cpu_sys_ms / minor_faults: getrusage(RUSAGE_SELF) deltas around "
                                   "each timed call, mean per call; a high sys_fraction means time spent in the "
                                   "kernel, mostly page faults on freshly mmapped temporaries",
                      "flops_note": "2 x multiply-adds of the rule's matrix products only (element-wise maths not "
                                    "counted); gflops_per_s = those flops / median step time",
                      "memory_method": MEMORY_METHOD_CUDA if device.type == "cuda" else MEMORY_METHOD_CPU},
           "results": []}
    for size in out["config"]["sizes"]:
        for shape in shapes:
            t0 = time.perf_counter()
            case = run_case(size, shape, args, device)
            case["wall_s"] = time.perf_counter() - t0
            out["results"].append(case)
            if args.out:  # partial results survive an interrupted run
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
            if "skipped" in case:
                continue
            print(f"# {size} {shape}: " + ", ".join(f"{k} {v['median_ms']:.3g} ms"
                                                    for k, v in case["optimizers"].items())
                  + f" ({case['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    out["env"]["load_avg_end"] = list(os.getloadavg())
    out["env"]["wall_s"] = time.perf_counter() - t_start
    return emit(out, args.out)


if __name__ == "__main__":
    main()
