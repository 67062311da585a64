"""Markdown tables from benchmarks/results/step.json, meta_step.json and meta_traffic.json.

    python benchmarks/table.py                                  # print the tables
    python benchmarks/table.py --readme benchmarks/README.md    # also put them between the markers

With ``--readme`` the text between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` is replaced;
if either marker is missing the file is left untouched and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _ms(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _ms_iqr(entry: dict) -> str:
    lo, hi = entry["iqr_ms"]
    return f"{_ms(entry['median_ms'])} ({_ms(lo)}–{_ms(hi)})"


def _env_line(data: dict) -> str:
    env = data.get("env", {})
    la0, la1 = env.get("load_avg_start"), env.get("load_avg_end")
    load = f"load avg {la0[0]:.2f} → {la1[0]:.2f}" if la0 and la1 else "load avg unknown"
    return (f"torch {env.get('torch')}, {env.get('threads')} thread(s), {env.get('cpu_model')} "
            f"({env.get('cpu_count')} CPUs), device {env.get('device')}, {load}, {env.get('started', '')}; "
            f"`{data.get('command', '')}`")


def step_table(data: dict) -> str:
    lines = ["### `optimizer.step()` (benchmarks/step.py)", "", _env_line(data), "",
             "| size | shape | tensors | optimizer | step ms, median (IQR) | × Adam | rule GFLOP/s | GEMM floor ms "
             "| step / floor | sys time | state B/param | peak temp MB |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case in data.get("results", []):
        head = f"| {case['size']} | {case['shape']} | {case.get('n_tensors', '')} "
        if "skipped" in case:
            lines.append(head + f"| — | {case['skipped']} | | | | | | | |")
            continue
        for name, e in case["optimizers"].items():
            floor = e.get("gemm_floor")
            peak = e.get("peak_temp_bytes")
            cells = [name, _ms_iqr(e), f"{e['ratio_to_adam']:.1f}",
                     f"{e['gflops_per_s']:.1f}" if "gflops_per_s" in e else "",
                     _ms(floor["median_ms"]) if floor else "",
                     f"{e['step_over_gemm_floor']:.1f}" if "step_over_gemm_floor" in e else "",
                     f"{100 * e['sys_fraction']:.0f}%" if "sys_fraction" in e else "",
                     f"{e['state_bytes_per_param']:.0f}",
                     f"{peak / 1e6:.1f}" if isinstance(peak, (int, float)) else "n/a"]
            lines.append(head + "| " + " | ".join(cells) + " |")
    cfg = data.get("config", {})
    lines += ["", f"Rule GFLOP/s counts only the rule's matrix products ({cfg.get('flops_per_coordinate')} flops "
                  "per coordinate); the GEMM floor is those products alone; sys time = share of the step's CPU time "
                  "spent in the kernel (page faults); peak temp = allocations of one step beyond the existing state."]
    return "\n".join(lines)


def meta_table(data: dict) -> str:
    cfg = data.get("config", {})
    src = cfg.get("data", {}).get("source", "?")
    lines = ["### Meta-training step (benchmarks/meta_step.py)", "", _env_line(data), "",
             f"Task {cfg.get('task')} ({cfg.get('optimizee_params')} parameters, batch {cfg.get('batch_size')}, "
             f"{src} data), unroll {cfg.get('unroll')}, {cfg.get('meta_optimizer')}; ms per unrolled step.", "",
             "| model | meta-train ms/step (IQR) | optimizee fwd+bwd ms/step (IQR) | meta / fwd+bwd "
             "| no-grad rollout ms/step | rollout / fwd+bwd |",
             "|---|---:|---:|---:|---:|---:|"]
    for model, r in data.get("results", {}).items():
        lines.append(f"| {model} | {_ms_iqr(r['meta_ms_per_step'])} | {_ms_iqr(r['plain_fwd_bwd_ms_per_step'])} "
                     f"| {r['ratio_meta_to_plain']:.1f} | {_ms_iqr(r['rollout_ms_per_step'])} "
                     f"| {r['ratio_rollout_to_plain']:.1f} |")
    return "\n".join(lines)


def traffic_table(data: dict) -> str:
    """meta_traffic.json: kernels and bytes per unrolled step, the LSTM cell as torch ops and fused."""
    cfg = data.get("config", {})
    lines = ["### Meta-training step's memory traffic on a GPU (benchmarks/meta_traffic.py)", "",
             f"Counted on the CPU (`{data.get('command', '')}`), task {cfg.get('task')}; per unrolled step of the "
             f"whole population; floor = bytes / {cfg.get('bandwidth_bytes_per_s', 0) / 1e12:.1f} TB/s.", "",
             "| model | K | kernels, cell as torch ops | GB (floor ms) | kernels, fused cell | GB (floor ms) "
             "| fused / torch bytes |", "|---|---:|---:|---:|---:|---:|---:|"]
    for model, by_k in data.get("results", {}).items():
        for k, row in sorted(by_k.items(), key=lambda kv: int(kv[0])):
            cells = []
            for cell in ("torch", "fused"):
                r = row.get(cell)
                cells += ([f"{r['kernels_per_step']:.0f}", f"{r['bytes_per_step'] / 1e9:.3g} ({r['floor_ms']:.3g})"]
                          if r else ["–", "–"])
            ratio = row.get("fused_over_torch", {}).get("bytes")
            lines.append(f"| {model} | {k} | " + " | ".join(cells) + f" | {f'{ratio:.2f}' if ratio else '–'} |")
    return "\n".join(lines)


def render(step_path: Path, meta_path: Path) -> str:
    parts = []
    for path, fn in ((step_path, step_table), (meta_path, meta_table)):
        if path.exists():
            parts.append(fn(json.loads(path.read_text())))
        else:
            parts.append(f"_(no {path.name} yet)_")
    traffic = step_path.parent / "meta_traffic.json"
    if traffic.exists():
        parts.append(traffic_table(json.loads(traffic.read_text())))
    return "\n\n".join(parts)


def _case(step: dict, size: str, shape: str) -> dict | None:
    return next((c for c in step.get("results", []) if c["size"] == size and c["shape"] == shape and
                 "optimizers" in c), None)


def summary_table(step: dict, meta: dict | None, evaluate: dict | None, size: str = "1M",
                  compiled: dict | None = None, host: dict | None = None, gpu: str | None = None) -> str:
    """The README's one speed table: step() at ``size`` parameters (one matrix, many tensors), the meta-training
    step (one optimizee, a population of 8; eager, and the speed-up of ``--compile`` from ``compiled``, a
    meta_step.json with ``+compile`` models) and the batched evaluation, each next to its torch reference."""
    models = [("dm", "L2ODM"), ("rnnprop", "RNNprop"), ("scale", "L2OScale")]
    env = step.get("env", {})
    lines = [f"CPU ({env.get('cpu_model', '?')}), {env.get('threads', '?')} thread, torch {env.get('torch', '?')}; "
             "each row measured side by side in one run (`benchmarks/`, JSON in `benchmarks/results/`).", "",
             "| measurement | " + " | ".join(f"`{n}`" for _, n in models) + " | reference |",
             "|---|" + "---:|" * len(models) + "---|"]
    for shape in ("matrix", "many"):
        case = _case(step, size, shape)
        if case is None:
            continue
        opts = case["optimizers"]
        cells = [f"{_ms(opts[m]['median_ms'])} ms ({opts[m]['ratio_to_adam']:.0f}× Adam)" if m in opts else "–"
                 for m, _ in models]
        what = "one matrix" if shape == "matrix" else f"{case['n_tensors']} tensors"
        lines.append(f"| `step()`, {size} parameters in {what} | " + " | ".join(cells)
                     + f" | Adam {_ms(opts['adam']['median_ms'])} ms |")
    if meta:
        by_k = meta.get("results_by_population") or {"1": meta.get("results", {})}
        one = by_k.get("1", {})
        if one:
            cells = [f"{_ms(one[m]['meta_ms_per_step']['median_ms'])} ms" if m in one else "–" for m, _ in models]
            plain = next(iter(one.values()))["plain_fwd_bwd_ms_per_step"]["median_ms"]
            lines.append("| meta-training, per unrolled optimizee step (MLP-orig, unroll 20) | " + " | ".join(cells)
                         + f" | optimizee forward+backward {_ms(plain)} ms |")
        for k in sorted((k for k in by_k if k != "1"), key=int):
            r = by_k[k]
            cells = [f"{_ms(r[m]['meta_ms_per_step']['median_ms'] / int(k))} ms" if m in r else "–" for m, _ in models]
            lines.append(f"| meta-training with a population of {k}, per optimizee step | " + " | ".join(cells)
                         + " | the row above (one optimizee) |")
    if compiled:
        by_k = compiled.get("results_by_population", {})
        ks = sorted(by_k, key=int)

        def speedups(m: str) -> str:
            got = [f"{by_k[k][m + '+compile']['speedup_over_eager']:.2f}×" for k in ks
                   if "speedup_over_eager" in by_k[k].get(m + "+compile", {})]
            return " / ".join(got) if got else "–"
        if ks:
            which = " / ".join("one optimizee" if k == "1" else f"population of {k}" for k in ks)
            lines.append(f"| meta-training with `--compile` ({which}): speed-up per step | "
                         + " | ".join(speedups(m) for m, _ in models) + " | the eager rule, same run |")
    if evaluate:
        rows = {r["optimizer"]: r for r in evaluate.get("results", []) if r.get("task") == "mlp-orig"}
        if rows:
            cells = [f"{rows[m]['speedup_batched']:.2f}×" if m in rows else "–" for m, _ in models]
            ref = f"Adam {rows['adam']['speedup_batched']:.2f}×" if "adam" in rows else ""
            lines.append("| evaluation, 10 seeds as one population: speed-up over one seed at a time (MLP-orig) | "
                         + " | ".join(cells) + f" | {ref} |")
    host_note = ""
    cases = {c["shape"]: c for c in (host or {}).get("cases", []) if c["size"] == size}
    if "matrix" in cases and "many" in cases:
        dm = [cases[k]["results"]["dm"]["median_ms"] for k in ("matrix", "many")]
        host_note = (f"; the host side of a fused step, timed here with its launches stubbed "
                     f"(`benchmarks/step_host.py`), is {_ms(dm[0])} ms for {size} parameters in one matrix and "
                     f"{_ms(dm[1])} ms in {cases['many']['num_tensors']} tensors (L2O-DM)")
    if gpu is not None:
        return "\n".join(lines + ["", gpu])
    lines += ["", "On a GPU, L2O-DM and RNNprop step with a fused Triton kernel (one per param group, between a "
              "NaN/Inf check and a step-counter launch: no host sync) and meta-training and evaluation run "
              "populations; these are built and tested (through Triton's interpreter on the CPU; the kernel also "
              "compiled for an H200, `benchmarks/results/kernel_resources_sm90.json`) but not yet timed on a GPU: "
              f"`scripts/gpu_check.sh` measures them on one{host_note}."]
    return "\n".join(lines)


_SIZE_ORDER = {"10k": 0, "100k": 1, "1M": 2, "10M": 3, "100M": 4}


def _fused_entry(opts: dict, model: str) -> tuple[str, dict] | None:
    """The entry to show for ``model``: its fused kernel when timed, else its only (torch) path."""
    for name in (f"{model}[triton]", model, f"{model}[torch]"):
        if name in opts:
            return name, opts[name]
    return None


def gpu_table(folder: Path) -> str | None:
    """The README's GPU table from a ``scripts/gpu_check.sh`` folder: every step() case of its step_*.json
    (fused kernel where timed, with its bandwidth-floor ratio and host time), the meta-training step per
    optimizee with populations, and the batched evaluation's 10 x 10,000-step protocol; None without results."""
    models = [("dm", "L2ODM"), ("rnnprop", "RNNprop"), ("scale", "L2OScale")]
    steps = sorted(folder.glob("step_*.json"))
    load = lambda name: json.loads((folder / name).read_text()) if (folder / name).exists() else None  # noqa
    meta, evaluate = load("meta_step.json"), load("evaluate_speed.json")
    if not steps and meta is None and evaluate is None:
        return None
    env = (json.loads(steps[0].read_text()) if steps else meta or evaluate).get("env", {})
    lines = [f"GPU ({env.get('gpu', env.get('device', '?'))}), torch {env.get('torch', '?')}; `scripts/gpu_check.sh`, "
             "each row measured side by side in one run (JSON in the folder it writes). Step times are device "
             "time; \"floor\" is a device copy of the bytes the step must read and write, timed in the same rounds.",
             "", "| measurement | " + " | ".join(f"`{n}`" for _, n in models) + " | reference |",
             "|---|" + "---:|" * len(models) + "---|"]
    cases = [c for path in steps if path.name != "step_host.json" for c in json.loads(path.read_text())["results"]
             if "optimizers" in c]
    for case in sorted(cases, key=lambda c: (_SIZE_ORDER.get(c["size"], 9), c["shape"] != "matrix")):
        opts, cells = case["optimizers"], []
        for model, _ in models:
            found = _fused_entry(opts, model)
            if found is None:
                cells.append("–")
                continue
            name, e = found
            text = f"{_ms(e['median_ms'])} ms"
            if e.get("step_over_bandwidth_floor") is not None:
                text += f" ({e['step_over_bandwidth_floor']:.1f}× floor)"
            if e.get("host_call_ms") is not None:
                text += f", host {_ms(e['host_call_ms'])} ms"
            cells.append(text)
        what = "one matrix" if case["shape"] == "matrix" else f"{case['n_tensors']} tensors"
        ref = f"Adam {_ms(opts['adam']['median_ms'])} ms" if "adam" in opts else ""
        lines.append(f"| `step()`, {case['size']} parameters in {what} | " + " | ".join(cells) + f" | {ref} |")
    by_k = (meta or {}).get("results_by_population", {})
    one = by_k.get("1", {})
    for k in sorted(by_k, key=int):
        r = by_k[k]
        cells = []
        for model, _ in models:
            if model not in r:
                cells.append("–")
                continue
            meta_ms = r[model]["meta_ms_per_step"]["median_ms"]
            text = f"{_ms(meta_ms / int(k))} ms"
            if k != "1" and model in one:
                text += f" ({meta_ms / one[model]['meta_ms_per_step']['median_ms']:.1f}× K = 1)"
            cells.append(text)
        what = "one optimizee" if k == "1" else f"a population of {k}, per optimizee step"
        plain = next(iter(r.values()))["plain_fwd_bwd_ms_per_step"]["median_ms"] if r else None
        ref = f"optimizee forward+backward {_ms(plain)} ms" if k == "1" and plain is not None else "meta-step vs K = 1"
        lines.append(f"| meta-training (MLP-orig, unroll 20), {what} | " + " | ".join(cells) + f" | {ref} |")
    speedups = {m: [(k, by_k[k][m]["fused_cell_speedup"]) for k in sorted(by_k, key=int)
                    if "fused_cell_speedup" in by_k[k].get(m, {})] for m, _ in models}
    if any(speedups.values()):  # the same run's +torchcell models: the rule's LSTM cell as torch ops
        cells = [" / ".join(f"{x:.2f}×" for _, x in speedups[m]) or "–" for m, _ in models]
        ks = sorted({k for v in speedups.values() for k, _ in v}, key=int)
        lines.append(f"| meta-training: fused LSTM cell kernels, speed-up over torch's ops (K = {' / '.join(ks)}) | "
                     + " | ".join(cells) + " | the same step, cell as torch ops |")
    rows = {r["optimizer"]: r for r in (evaluate or {}).get("results", []) if r.get("task") == "mlp-orig"}
    if rows:
        cells = [f"{rows[m]['batched']['protocol_10x10000_s']:.0f} s" if m in rows else "–" for m, _ in models]
        ref = f"Adam {rows['adam']['batched']['protocol_10x10000_s']:.0f} s" if "adam" in rows else ""
        lines.append("| evaluation, 10 seeds × 10,000 steps as one population (MLP-orig, extrapolated) | "
                     + " | ".join(cells) + f" | {ref} |")
    return "\n".join(lines)


def gpu_bar(folder: Path) -> dict:
    """``summary.json`` of a ``scripts/gpu_check.sh`` folder: every step() time with its bandwidth-floor ratio
    (``steps``) and the checks of the issues' bars (``bar``, each with its value and pass/fail): the fused L2O-DM /
    RNNprop step within 2x the bandwidth floor at 10M and 3x at 1M, 864 tensors within 1.5x one matrix; a K = 64
    meta-step within 2x K = 1 (the default models, not their ``+`` variants); one learned optimizer's 10 seeds x
    10,000 evaluation steps in under a minute (extrapolated from the run's steps)."""
    rows, bar = [], []
    for name in ("step_1M.json", "step_10M.json", "step_100M.json", "sweep_10M.json"):
        path = folder / name
        if not path.exists():
            continue
        for case in json.loads(path.read_text())["results"]:
            for opt, e in case.get("optimizers", {}).items():
                rows.append({"file": name, "size": case["size"], "shape": case["shape"],
                             "n_tensors": case["n_tensors"], "optimizer": opt, "median_ms": e["median_ms"],
                             "host_call_ms": e.get("host_call_ms"), "ratio_to_adam": e.get("ratio_to_adam"),
                             "floor_ms": e.get("bandwidth_floor", {}).get("median_ms"),
                             "step_over_floor": e.get("step_over_bandwidth_floor")})
    step = {(r["file"], r["size"], r["shape"], r["optimizer"]): r for r in rows}
    for rule in ("dm[triton]", "rnnprop[triton]"):
        for size, limit in (("10M", 2.0), ("1M", 3.0)):
            r = step.get((f"step_{size}.json", size, "matrix", rule))
            if r and r["step_over_floor"] is not None:
                bar.append({"check": f"{rule} {size} matrix step / bandwidth floor <= {limit}",
                            "value": r["step_over_floor"], "pass": r["step_over_floor"] <= limit})
        one, many = step.get(("step_1M.json", "1M", "matrix", rule)), step.get(("step_1M.json", "1M", "many", rule))
        if one and many:
            ratio = many["median_ms"] / one["median_ms"]
            bar.append({"check": f"{rule} 1M: {many['n_tensors']} tensors / one matrix <= 1.5", "value": ratio,
                        "pass": ratio <= 1.5})
    meta_path, eval_path = folder / "meta_step.json", folder / "evaluate_speed.json"
    if meta_path.exists():
        by_k = json.loads(meta_path.read_text()).get("results_by_population", {})
        for model, e in sorted(by_k.get("64", {}).items()):
            if "+" not in model and e.get("cost_vs_population_1") is not None:
                bar.append({"check": f"{model} meta-step K = 64 / K = 1 <= 2", "value": e["cost_vs_population_1"],
                            "pass": e["cost_vs_population_1"] <= 2.0})
    if eval_path.exists():
        for r in json.loads(eval_path.read_text()).get("results", []):
            if r.get("optimizer") not in ("adam", "rmsprop", "sgd"):
                seconds = r["batched"]["protocol_10x10000_s"]
                bar.append({"check": f"{r['optimizer']} on {r['task']}: 10 seeds x 10,000 steps < 60 s "
                                     "(extrapolated)", "value": seconds, "pass": seconds < 60})
    return {"bar": bar, "steps": rows}


def replace_between_markers(text: str, body: str) -> str | None:
    i, j = text.find(START), text.find(END)
    if i < 0 or j < 0 or j < i:
        return None
    return text[: i + len(START)] + "\n" + body + "\n" + text[j:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--step", type=Path, default=HERE / "results" / "step.json")
    ap.add_argument("--meta", type=Path, default=HERE / "results" / "meta_step.json")
    ap.add_argument("--readme", type=Path, default=None, help="replace the text between the bench markers")
    ap.add_argument("--gpu", type=Path, default=None,
                    help="with --summary: add the GPU table from a scripts/gpu_check.sh folder (its step_*.json, "
                         "meta_step.json and evaluate_speed.json)")
    ap.add_argument("--bar", type=Path, default=None,
                    help="print the summary.json of a scripts/gpu_check.sh folder: its step times and the bars' checks")
    ap.add_argument("--summary", action="store_true",
                    help="one compact table (the project README's) from step.json, meta_step_population.json, "
                         "meta_step_compile.json and evaluate_speed.json instead of the detailed tables")
    args = ap.parse_args(argv)
    if args.bar is not None:
        print(json.dumps(gpu_bar(args.bar), indent=1))
        return 0
    if args.summary:
        results = HERE / "results"
        load = lambda name: json.loads((results / name).read_text()) if (results / name).exists() else None  # noqa
        body = summary_table(json.loads(args.step.read_text()), load("meta_step_population.json"),
                             load("evaluate_speed.json"), compiled=load("meta_step_compile.json"),
                             host=load("step_host.json"),
                             gpu=gpu_table(args.gpu) if args.gpu is not None else None)
    else:
        body = render(args.step, args.meta)
    print(body)
    if args.readme is not None:
        text = args.readme.read_text()
        new = replace_between_markers(text, body)
        if new is None:
            print(f"{args.readme}: markers {START} ... {END} not found; file left untouched", file=sys.stderr)
            return 1
        if new != text:
            args.readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
