"""The README's main job: examples/train_mnist.py trains an MLP with a learned optimizer beside Adam."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import learned_optim
from helpers import write_synthetic_mnist

REPO = Path(__file__).resolve().parent.parent


def test_train_mnist_example_writes_the_plot(tmp_path):
    root = write_synthetic_mnist(tmp_path / "data")
    weights = learned_optim.save_weights(learned_optim.build_rule("rnnprop"), tmp_path / "w.safetensors")
    out = tmp_path / "curves.png"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "train_mnist.py"), "--weights", str(weights),
                           "--steps", "30", "--data-root", str(root), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 1000
    assert "final ln loss" in proc.stdout and "Adam" in proc.stdout
