"""Shared helpers for the tests: synthetic datasets on disk in torchvision's formats, small rules trained in
seconds (so "goes the right direction" tests need no bundled weights), and expensive fixtures built once per
test run."""
from __future__ import annotations

import functools
import os
import pickle
import shutil
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file (the MNIST on-disk format) for uint8 arrays of rank 1 or 3."""
    path.parent.mkdir(parents=True, exist_ok=True)
    magic = {1: 0x00000801, 3: 0x00000803}[array.ndim]
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", magic))
        for dim in array.shape:
            fh.write(struct.pack(">I", dim))
        fh.write(array.astype(np.uint8).tobytes())


def synthetic_images(n: int, channels: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable synthetic images: each class is a noisy prototype."""
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, size=(10, channels, size, size))
    labels = rng.integers(0, 10, size=n)
    noise = rng.normal(0, 40, size=(n, channels, size, size))
    images = np.clip(protos[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.uint8)


def write_synthetic_mnist(root: Path, folder: str = "MNIST", n_train: int = 512, n_test: int = 256,
                          size: int = 28) -> Path:
    """A tiny dataset in torchvision's MNIST layout: ROOT/MNIST/raw/*-ubyte. ``size`` < 28 gives smaller images
    (an MLP-orig of 20 hidden units then has size² · 20 + 410 parameters: fast meta-training tests)."""
    raw = root / folder / "raw"
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = synthetic_images(n, 1, size, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def write_synthetic_cifar10(root: Path, per_batch: int = 20) -> Path:
    """A tiny dataset in CIFAR-10's python on-disk format: ROOT/cifar-10-batches-py/."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for seed, name in enumerate(names):
        images, labels = synthetic_images(per_batch, 3, 32, seed)
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": images.reshape(per_batch, -1), "labels": labels.astype(int).tolist()}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, fh)
    return root


@functools.lru_cache(maxsize=None)
def imitation_trained_rule(name: str, meta_steps: int = 150, seed: int = 0):
    """A rule taught to imitate Adam(lr=0.01) on random quadratics (a few seconds): a rule that
    reliably goes downhill, for the optimizer conformance tests. Trained once per machine: the weights are kept
    in the temporary folder, keyed on this file, the rule's source and the torch version (pytest-xdist workers
    and later runs load them instead of training again)."""
    import hashlib
    import os
    import tempfile

    import learned_optim
    from learned_optim import rules

    sources = [Path(__file__), Path(rules.__file__).parent / f"{name}.py", Path(rules.__file__).parent / "base.py"]
    key = hashlib.sha256("|".join([name, str(meta_steps), str(seed), torch.__version__,
                                   *(p.read_text() for p in sources if p.exists())]).encode()).hexdigest()[:20]
    cache = Path(tempfile.gettempdir()) / "learned_optim_tests" / f"{name}-{key}.safetensors"
    if cache.is_file():
        try:
            return learned_optim.load_rule(cache).eval().requires_grad_(False)
        except Exception:  # a damaged cache file: train again
            pass
    rule = _train_imitation_rule(name, meta_steps, seed)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    learned_optim.save_weights(rule, tmp)
    os.replace(tmp, cache)
    return rule


def _train_imitation_rule(name: str, meta_steps: int, seed: int):
    from learned_optim import build_rule

    torch.manual_seed(seed)
    rule = build_rule(name)
    opt = torch.optim.Adam(rule.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    n = 64
    for it in range(meta_steps):
        scale = torch.exp(torch.randn(n, generator=gen))
        theta = torch.randn(n, generator=gen)
        teacher_param = theta.clone().requires_grad_(True)
        teacher = torch.optim.Adam([teacher_param], lr=0.01)
        state = rule.init_state([(n,)], generator=gen)
        loss = 0.0
        for step in range(1, 11):
            grad = (scale * teacher_param.detach()).clone()
            before = teacher_param.detach().clone()
            teacher_param.grad = grad
            teacher.step()
            target = teacher_param.detach() - before
            update, state = rule(grad, state, step)
            loss = loss + ((update - target) ** 2).sum() / n
        opt.zero_grad()
        loss.backward()
        opt.step()
    return rule.eval().requires_grad_(False)


# Tiny tensors gain nothing from intra-op threads, and spinning threads are very slow when the
# cores are shared (e.g. with a meta-training run): the test suite runs single-threaded.
torch.set_num_threads(1)


def once_per_run(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that ``build(folder)`` fills once per test run, however pytest-xdist spreads the tests that need
    it over its worker processes: the first worker to get here builds it under a file lock, in a folder shared
    by the run's workers; the others wait for that and reuse it. A failed build leaves no mark, so the next
    worker tries again (and reports the failure the same way)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # one per run, shared by its workers
    folder = base / f"once-{name}"
    with FileLock(str(folder) + ".lock"):
        done = folder / ".built"
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            done.touch()
    return folder
