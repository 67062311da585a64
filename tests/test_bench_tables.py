"""benchmarks/table.py's README speed table, and its GPU table from a scripts/gpu_check.sh folder (built here
from the committed CPU results, which have the same schema)."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def _table():
    spec = importlib.util.spec_from_file_location("bench_table", REPO / "benchmarks" / "table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_table_from_a_gpu_check_folder(tmp_path):
    table = _table()
    assert table.gpu_table(tmp_path) is None  # nothing measured: no table
    shutil.copy(RESULTS / "step.json", tmp_path / "step_1M.json")
    shutil.copy(RESULTS / "meta_step_population.json", tmp_path / "meta_step.json")
    shutil.copy(RESULTS / "evaluate_speed.json", tmp_path / "evaluate_speed.json")
    shutil.copy(RESULTS / "step_host.json", tmp_path / "step_host.json")  # not a step() case: left out
    text = table.gpu_table(tmp_path)
    step = json.loads((RESULTS / "step.json").read_text())
    cases = [c for c in step["results"] if "optimizers" in c]
    rows = [line for line in text.splitlines() if line.startswith("| `step()`")]
    assert len(rows) == len(cases)
    one = next(c for c in cases if c["size"] == "1M" and c["shape"] == "matrix")
    row = next(r for r in rows if "1M parameters in one matrix" in r)
    assert f"{table._ms(one['optimizers']['dm']['median_ms'])} ms" in row
    assert f"Adam {table._ms(one['optimizers']['adam']['median_ms'])} ms" in row
    meta = json.loads((RESULTS / "meta_step_population.json").read_text())["results_by_population"]
    ratio = meta["8"]["dm"]["meta_ms_per_step"]["median_ms"] / meta["1"]["dm"]["meta_ms_per_step"]["median_ms"]
    assert f"({ratio:.1f}× K = 1)" in text
    evaluate = {r["optimizer"]: r for r in json.loads((RESULTS / "evaluate_speed.json").read_text())["results"]
                if r["task"] == "mlp-orig"}
    assert f"{evaluate['dm']['batched']['protocol_10x10000_s']:.0f} s" in text

    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- bench:start -->\nold\n<!-- bench:end -->\n")
    assert table.main(["--summary", "--gpu", str(tmp_path), "--readme", str(readme)]) == 0
    body = readme.read_text()
    assert text in body and "not yet timed on a GPU" not in body and "\nold\n" not in body


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_table_from_fresh_benchmark_runs(tmp_path):
    """The benchmarks scripts/gpu_check.sh runs, run here at toy sizes on the CPU (each its own main, as the
    script calls it minus --device cuda), write what the GPU table reads: a run's own output, not a committed one."""
    from helpers import write_synthetic_mnist

    root = write_synthetic_mnist(tmp_path / "data", "MNIST", n_train=256, n_test=64)
    out = tmp_path / "gpu"
    out.mkdir()
    _bench("step").main(["--models", "dm", "--sizes", "10k", "--repeats", "1", "--warmup", "1", "--bf16-size", "",
                         "--no-memory", "--out", str(out / "step_1M.json")])
    _bench("meta_step").main(["--models", "dm,dm+torchcell", "--population", "1,2", "--unroll", "2", "--repeats", "1",
                              "--warmup", "1", "--data-root", str(root), "--out", str(out / "meta_step.json")])
    _bench("evaluate_speed").main(["--optimizers", "adam,dm", "--seeds", "2", "--steps", "2", "--warmup-steps", "1",
                                   "--data-root", str(root), "--out", str(out / "evaluate_speed.json")])
    text = _table().gpu_table(out)
    assert "| `step()`, 10k parameters in one matrix" in text and "Adam" in text
    assert "× K = 1)" in text and " s |" in text
    assert "fused LSTM cell kernels, speed-up over torch's ops (K = 1 / 2)" in text


def test_meta_traffic_counts_and_restores(tmp_path):
    """benchmarks/meta_traffic.py at toy size (cell as torch ops: no interpreter needed): counts grow with the
    population, the table renders, and what it patches for the count (tanh as on a GPU, one rule call over the
    population) is restored after it."""
    import learned_optim.rules.base as rules_base
    import meta_train.unroll as unroll
    from helpers import write_synthetic_mnist

    before = rules_base.fast_tanh, unroll.POPULATION_BLOCK
    root = write_synthetic_mnist(tmp_path / "data", "MNIST", n_train=256, n_test=64, size=8)
    out = _bench("meta_traffic").main(["--models", "dm", "--population", "1,2", "--unroll", "1", "--cells", "torch",
                                       "--data-root", str(root), "--out", str(tmp_path / "traffic.json")])
    assert (rules_base.fast_tanh, unroll.POPULATION_BLOCK) == before
    one, two = (out["results"]["dm"][k]["torch"] for k in ("1", "2"))
    assert one["kernels_per_step"] > 50 and 1.5 < two["bytes_per_step"] / one["bytes_per_step"] < 2.5
    assert "| dm | 2 |" in _table().traffic_table(out)


def test_gpu_bar_checks_every_bar(tmp_path):
    """summary.json of a gpu_check.sh folder (benchmarks/table.py --bar): each bar of the two GPU issues checked
    from the benchmarks' own fields, pass and fail."""
    def case(size, shape, n, ms, floor):
        return {"size": size, "shape": shape, "n_tensors": n, "optimizers": {
            "dm[triton]": {"median_ms": ms, "step_over_bandwidth_floor": floor, "bandwidth_floor": {"median_ms": 1.0}},
            "adam": {"median_ms": 0.5}}}

    (tmp_path / "step_1M.json").write_text(json.dumps({"results": [case("1M", "matrix", 1, 0.4, 2.5),
                                                                   case("1M", "many", 864, 0.7, 4.0)]}))
    (tmp_path / "step_10M.json").write_text(json.dumps({"results": [case("10M", "matrix", 1, 3.5, 2.3)]}))
    (tmp_path / "meta_step.json").write_text(json.dumps({"results_by_population": {"64": {
        "dm": {"cost_vs_population_1": 1.6}, "dm+torchcell": {"cost_vs_population_1": 2.4},
        "scale": {"cost_vs_population_1": 2.2}}}}))
    (tmp_path / "evaluate_speed.json").write_text(json.dumps({"results": [
        {"optimizer": "adam", "task": "mlp-orig", "batched": {"protocol_10x10000_s": 5.0}},
        {"optimizer": "dm", "task": "mlp-orig", "batched": {"protocol_10x10000_s": 12.0}}]}))
    out = _table().gpu_bar(tmp_path)
    checks = {b["check"]: b["pass"] for b in out["bar"]}
    assert checks == {"dm[triton] 10M matrix step / bandwidth floor <= 2.0": False,
                      "dm[triton] 1M matrix step / bandwidth floor <= 3.0": True,
                      "dm[triton] 1M: 864 tensors / one matrix <= 1.5": False,
                      "dm meta-step K = 64 / K = 1 <= 2": True,
                      "scale meta-step K = 64 / K = 1 <= 2": False,
                      "dm on mlp-orig: 10 seeds x 10,000 steps < 60 s (extrapolated)": True}
    assert len(out["steps"]) == 6
