"""The README's main job: examples/train_mnist.py trains an MLP with a learned optimizer beside Adam."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import learned_optim
from helpers import write_synthetic_mnist

REPO = Path(__file__).resolve().parent.parent


def test_train_mnist_example_writes_the_plot(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_mnist", REPO / "examples" / "train_mnist.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    root = write_synthetic_mnist(tmp_path / "data")
    weights = learned_optim.save_weights(learned_optim.build_rule("rnnprop"), tmp_path / "w.safetensors")
    out = tmp_path / "curves.png"
    example.main(["--weights", str(weights), "--steps", "30", "--data-root", str(root), "--out", str(out)])
    assert out.stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "final ln loss" in printed and "Adam(lr=0.01)" in printed and "RNNprop(weights=" in printed
    assert "step 30/30" in printed  # progress while it trains


def test_readme_quick_start_runs_as_written(capsys):
    import re

    readme = (REPO / "README.md").read_text()
    code = re.search(r"## Quick start\n\n```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(code, "README.md quick start", "exec"), {})
    loss = float(re.search(r"loss ([0-9.]+)", capsys.readouterr().out).group(1))
    assert loss < 1.0  # it trains (from ln 10 = 2.303)
