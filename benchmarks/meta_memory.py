"""Memory of a meta-training truncation: the eager rule against ``meta_train --compile``, for populations of K.

For each model (dm, rnnprop), each population size K (``--population 1,8``) and each of eager / compiled, a fresh
process runs what ``meta_train`` runs on MLP-orig: a 2-step truncation first (compilation, allocator warm-up), then
``--truncations`` truncations of ``--unroll`` steps, each with its backward (``population_meta_unroll``, or
``meta_unroll`` for K = 1). Reported per case: the process's peak resident memory (``ru_maxrss``; on the CPU, with
freed memory kept for reuse as ``meta_train`` does for a population), the same after the warm-up, and the bytes of
the tensors the truncation's graph saves for its backward (unique storages seen by
``torch.autograd.graph.saved_tensors_hooks``). With ``--device cuda``: ``torch.cuda.max_memory_allocated`` too.
``compiled_over_eager`` gives the ratios, compiled over eager, of the same model and K.

    python benchmarks/meta_memory.py --population 1,8 --out benchmarks/results/meta_memory.json
    python benchmarks/meta_memory.py --device cuda --population 1,64 --out benchmarks/results/gpu/meta_memory.json

Prints the JSON; ``--out`` also writes it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import emit  # noqa: E402

MODELS = ("dm", "rnnprop")


def worker(model: str, mode: str, k: int, unroll: int, truncations: int, device: str, data_root) -> dict:
    from meta_step import load_task  # noqa: E402  (the benchmark's MLP-orig: MNIST or a synthetic stand-in)

    from learned_optim.rules import build_rule
    from meta_train.trainer import member_seed
    from meta_train.unroll import (CompiledRule, keep_freed_memory, meta_unroll, population_meta_unroll, start,
                                   start_population)

    torch.set_num_threads(1)
    dev = torch.device(device)
    if dev.type == "cpu" and k > 1:
        keep_freed_memory()
    task, data = load_task("mlp-orig", data_root, dev)
    torch.manual_seed(0)
    rule = build_rule(model).to(dev)
    step_rule = CompiledRule(rule) if mode == "compile" else rule
    gens = [torch.Generator().manual_seed(0)] + [torch.Generator().manual_seed(member_seed(0, 0, j))
                                                 for j in range(1, k)]

    def truncation(traj, steps: int):
        if k == 1:
            loss, traj, _ = meta_unroll(step_rule, task, traj, steps, gens[0])
            return loss, traj
        losses, traj, _ = population_meta_unroll(step_rule, task, traj, steps, gens)
        return losses.mean(), traj

    traj = start(rule, task, gens[0]) if k == 1 else start_population(rule, task, gens)[0]
    loss, traj = truncation(traj, 2)
    loss.backward()
    warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    t0 = time.perf_counter()
    for i in range(truncations):
        if i == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss, traj = truncation(traj, unroll)
        else:
            loss, traj = truncation(traj, unroll)
        rule.zero_grad(set_to_none=True)
        loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "peak_rss_after_warmup_bytes": warm, "graph_saved_bytes": sum(saved.values()),
           "seconds": time.perf_counter() - t0, "data": data}
    if dev.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of dm,rnnprop")
    ap.add_argument("--population", default="1,8", help="comma list of population sizes K (default 1,8)")
    ap.add_argument("--unroll", type=int, default=20)
    ap.add_argument("--truncations", type=int, default=2, help="measured truncations after the warm-up one")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--data-root", default=None, help="default: $LEARNED_OPTIM_DATA")
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "MODE", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        model, mode, k = args.worker
        print(json.dumps(worker(model, mode, int(k), args.unroll, args.truncations, args.device, args.data_root)))
        return {}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in MODELS for m in models):
        raise SystemExit(f"--models: choose from {','.join(MODELS)} (L2O-Scale has no --compile)")
    try:
        populations = sorted({int(k) for k in args.population.split(",") if k.strip()})
    except ValueError:
        raise SystemExit(f"--population: expected comma-separated integers, got {args.population!r}") from None
    if not populations or populations[0] < 1 or args.unroll < 1 or args.truncations < 1:
        raise SystemExit("--population sizes, --unroll and --truncations must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    started = time.perf_counter()
    results: dict = {}
    for k in populations:
        for model in models:
            for mode in ("eager", "compile"):
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", model, mode, str(k),
                       "--unroll", str(args.unroll), "--truncations", str(args.truncations), "--device", args.device]
                if args.data_root:
                    cmd += ["--data-root", args.data_root]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"worker {model} {mode} K={k} failed:\n{proc.stderr[-3000:]}")
                entry = json.loads(proc.stdout.strip().splitlines()[-1])
                results.setdefault(str(k), {}).setdefault(model, {})[mode] = entry
                print(f"# K={k} {model} {mode}: peak RSS {entry['peak_rss_bytes'] / 2**30:.2f} GiB, graph saves "
                      f"{entry['graph_saved_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
            pair = results[str(k)][model]
            keys = ["peak_rss_bytes", "graph_saved_bytes"] + (["cuda_max_allocated_bytes"]
                                                             if "cuda_max_allocated_bytes" in pair["eager"] else [])
            pair["compiled_over_eager"] = {key: pair["compile"][key] / pair["eager"][key] for key in keys}
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
           "device": args.device, "wall_s": time.perf_counter() - started}
    out = {"benchmark": "meta_memory", "schema_version": 1, "env": env,
           "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
           "config": {"task": "mlp-orig", "unroll": args.unroll, "truncations": args.truncations,
                      "populations": populations, "threads": 1},
           "results": results}
    return emit(out, args.out)


if __name__ == "__main__":
    main()
