"""Registers, spills and shared memory of the fused L2O-DM / RNNprop kernel, compiled for a GPU that is not here.

Every variant (rule x state dtype x parameter dtype x vector width) and every launch configuration of
``--configs`` (BLOCKxWARPS[:tl.dot precision[:register cap per thread]], the syntax of ``step.py
--triton-configs``) is compiled with Triton's compiler for ``--arch`` (default 90: H100 / H200) down to the
cubin, with no GPU needed (``learned_optim.kernels.lstm.compile_for``); ptxas of Triton's wheel, run again with
``-v`` on the same PTX, reports registers per thread, spill stores / loads and the stack frame; for sm_90 the
programs (and warps) one SM can hold follow from those, as the CUDA occupancy calculator counts. Spills go to
local memory (L1/L2-cached device memory): they add traffic beyond the step's own. This says which
configurations compile and what they cost in registers; only a GPU says how fast they run.

    python benchmarks/kernel_resources.py --out benchmarks/results/kernel_resources_sm90.json
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402  (benchmarks/common.py)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RULES, DTYPES = ("dm", "rnnprop"), ("float32", "bfloat16", "float16")
DEFAULT_CONFIGS = "default,32x2,32x4,64x8,128x8,64x4:tf32,64x4:ieee,64x4:tf32x3:168,64x4:tf32x3:128"
_USAGE = {
    "registers": r"Used (\d+) registers",
    "spill_stores_bytes": r"(\d+) bytes spill stores",
    "spill_loads_bytes": r"(\d+) bytes spill loads",
    "stack_frame_bytes": r"(\d+) bytes stack frame",
}


def parse_configs(text: str, base: dict) -> list[dict]:
    """``default`` or BLOCKxWARPS[:PRECISION[:MAXNREG]] entries, as launch settings over ``base``."""
    from learned_optim.kernels.lstm import _PRECISIONS as PRECISIONS

    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if item == "default":
            out.append({"name": "default", "block": base["block"], "warps": base["warps"],
                        "precision": base["precision"], "maxnreg": base["maxnreg"]})
            continue
        m = re.fullmatch(r"(\d+)x(\d+)(?::(\w*))?(?::(\d+))?", item)
        if not m:
            raise SystemExit(f"error: --configs entry {item!r} is not BLOCKxWARPS[:PRECISION[:MAXNREG]], e.g. 64x4:tf32x3:168")
        block, warps = int(m[1]), int(m[2])
        if block < 16 or block & (block - 1) or warps < 1 or warps & (warps - 1):
            raise SystemExit(f"error: --configs entry {item!r}: BLOCK must be a power of two >= 16 and WARPS a power of two")
        if m[3] and m[3] not in PRECISIONS:
            raise SystemExit(f"error: --configs entry {item!r}: the precision must be one of {', '.join(PRECISIONS)}")
        out.append({"name": item, "block": block, "warps": warps, "precision": m[3] or base["precision"],
                    "maxnreg": int(m[4] or 0)})
    return out


def ptxas_usage(ptx: str, arch: int) -> dict:
    """ptxas -v on ``ptx``: registers per thread, spill stores / loads and stack frame in bytes."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        run = subprocess.run([str(ptxas), f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v",
                              str(src), "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"ptxas failed: {run.stderr.strip()}")
    text = run.stdout + run.stderr
    return {key: int(m[1]) if (m := re.search(pattern, text)) else None for key, pattern in _USAGE.items()}


# per-SM limits of compute capability 9.0 (H100 / H200): registers, shared memory, threads, resident blocks
SM90 = {"registers": 65536, "shared_bytes": 228 * 1024, "block_reserved_shared": 1024, "threads": 2048, "blocks": 32}


def resident_programs(registers: int, warps: int, shared: int, limits: dict = SM90) -> int:
    """Programs (thread blocks) one SM holds at once, as the CUDA occupancy calculator counts them: registers
    allocated per warp in units of 256, shared memory per block plus 1 KB reserved, 32 threads per warp."""
    per_warp = -(-registers * 32 // 256) * 256
    by_regs = limits["registers"] // (per_warp * warps) if per_warp else limits["blocks"]
    by_shared = limits["shared_bytes"] // (shared + limits["block_reserved_shared"])
    return min(by_regs, by_shared, limits["threads"] // (32 * warps), limits["blocks"])


def measure(v: dict, arch: int) -> dict:
    """Compile one variant for ``arch`` and report its resources (runs in a worker process)."""
    import torch  # noqa: F401  (dtypes in v)
    from learned_optim.kernels import lstm

    kernel = lstm.compile_for(v, arch)
    usage = ptxas_usage(kernel.asm["ptx"], arch)
    out = {**usage, "shared_bytes": kernel.metadata.shared, "cubin_bytes": len(kernel.asm["cubin"])}
    if arch == 90 and usage["registers"]:
        programs = resident_programs(usage["registers"], v["warps"], out["shared_bytes"])
        out["programs_per_sm"], out["warps_per_sm"] = programs, programs * v["warps"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90: H100 / H200)")
    ap.add_argument("--rules", default="dm,rnnprop")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16",
                    help="state and parameter dtypes, all pairs are compiled with the default configuration")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                    help="launch configurations, compiled for fp32 state and parameters with VEC=4")
    ap.add_argument("--processes", type=int, default=None, help="parallel compiles (default: CPU count)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # the compiler, not the interpreter

    import torch
    from learned_optim.kernels import lstm

    rules = tuple(filter(None, args.rules.split(",")))
    names = tuple(filter(None, args.dtypes.split(",")))
    if not rules or set(rules) - set(RULES):
        raise SystemExit(f"error: --rules takes a comma list of {', '.join(RULES)}, got {args.rules!r}")
    if not names or set(names) - set(DTYPES):
        raise SystemExit(f"error: --dtypes takes a comma list of {', '.join(DTYPES)}, got {args.dtypes!r}")
    dtypes = tuple(getattr(torch, d) for d in names)
    base = lstm.variants(rules=rules[:1], dtypes=(torch.float32,), vecs=(4,))[0]
    configs = parse_configs(args.configs, base)
    jobs = []  # (label, variant)
    for v in lstm.variants(rules=rules, dtypes=dtypes, vecs=(1, 4)):
        jobs.append(({"kind": "dtype", "config": "default"}, v))
    for cfg in configs:
        if cfg["name"] == "default":
            continue  # the fp32 / VEC=4 entries of the dtype table are the default configuration
        for v in lstm.variants(rules=rules, dtypes=(torch.float32,), vecs=(4,)):
            jobs.append(({"kind": "config", "config": cfg["name"]},
                         {**v, **{k: cfg[k] for k in ("block", "warps", "precision", "maxnreg")}}))
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.processes or os.cpu_count() or 1, mp_context=ctx) as pool:
        measured = list(pool.map(measure, [v for _, v in jobs], [args.arch] * len(jobs)))
    results = []
    for (label, v), usage in zip(jobs, measured):
        results.append({**label, "rule": v["rule"], "state_dtype": str(v["s"]).removeprefix("torch."),
                        "param_dtype": str(v["p"]).removeprefix("torch."), "vec": v["vec"], "block": v["block"],
                        "warps": v["warps"], "precision": v["precision"], "maxnreg": v["maxnreg"], **usage})
    import triton

    out = {"benchmark": "kernel_resources", "schema_version": 1,
           "env": {"torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0],
                   "wall_s": round(time.perf_counter() - t0, 1)},
           "command": " ".join(["kernel_resources.py", *(argv if argv is not None else sys.argv[1:])]),
           "config": {"arch": args.arch, "default_launch": {k: base[k] for k in ("block", "warps", "precision",
                                                                                  "maxnreg")},
                      "method": "learned_optim.kernels.lstm.compile_for (Triton compiler, no GPU), then ptxas -v "
                                "of Triton's wheel on the same PTX"},
           "results": results}
    return emit(out, args.out)


if __name__ == "__main__":
    main()
