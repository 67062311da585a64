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
