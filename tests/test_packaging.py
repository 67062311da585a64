"""Packaging: the wheel ships the code, the bundled weights and their cards; the library needs no torchvision."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from helpers import once_per_run

from learned_optim import weights as W

REPO_ROOT = Path(__file__).resolve().parent.parent
# what a build reads (pyproject's packages, package-dir and readme): copied alone, so that whatever else lies in a
# checkout -- a virtualenv (CI creates .ci-venv in it), data, run outputs -- is neither copied nor packaged
_BUILD_INPUTS = ("pyproject.toml", "LICENSE", "docs/pypi.md", "learned_optim", "pretrained", "meta_train")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.tmp")


def _can_build_wheels() -> bool:
    if importlib.util.find_spec("setuptools") is None:
        return False
    if importlib.util.find_spec("wheel") is not None:
        return True
    import setuptools  # setuptools >= 70.1 has bdist_wheel built in (pyproject needs >= 77 for the SPDX license)

    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (77, 0)


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


PROBE = "packaging-probe"  # an extra registered weight file added to the copy that is built


def _add_probe(pretrained: Path) -> None:
    """Register one more (tiny, fresh) weight file + card, the way meta_train.export does, so the package-data
    globs are exercised even while the checkout bundles no weights yet."""
    import learned_optim

    path = learned_optim.save_weights(learned_optim.build_rule("dm"), pretrained / f"{PROBE}.safetensors")
    (pretrained / f"{PROBE}.md").write_text(learned_optim.model_card(path, name=PROBE))
    reg_path = pretrained / "registry.json"
    registry = json.loads(reg_path.read_text())
    assert PROBE not in registry
    registry[PROBE] = {"file": path.name, "sha256": W.sha256_file(path), "rule": "dm"}
    reg_path.write_text(json.dumps(registry, indent=2) + "\n")


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> Path:
    """Build the wheel from a copy of the checkout (an in-tree build would write build/ and *.egg-info into it),
    with one probe weight file registered on top of the checkout's bundled weights."""
    if not _can_build_wheels():
        pytest.skip("setuptools/wheel are not importable: cannot build the wheel without build isolation")

    def build(tmp: Path) -> None:  # once per test run, whichever xdist worker gets here first
        src = tmp / "src"
        for name in _BUILD_INPUTS:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            if (REPO_ROOT / name).is_dir():
                shutil.copytree(REPO_ROOT / name, src / name, ignore=_IGNORE, symlinks=True)
            else:
                shutil.copy2(REPO_ROOT / name, src / name)
        _add_probe(src / "pretrained")
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
               "--disable-pip-version-check", "-q", "-w", str(tmp / "dist"), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_subprocess_env())
        assert proc.returncode == 0, f"wheel build failed:\n{proc.stdout}\n{proc.stderr}"

    out = once_per_run(tmp_path_factory, "wheel", build) / "dist"
    wheels = list(out.glob("learned_optim-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contents(built_wheel):
    names = set(zipfile.ZipFile(built_wheel).namelist())
    expected = {"learned_optim/__init__.py", "learned_optim/optimizer.py", "learned_optim/weights.py",
                "learned_optim/pretrained/__init__.py", "learned_optim/pretrained/registry.json",
                "meta_train/__init__.py", "meta_train/__main__.py"}
    rules = sorted(p.name for p in (REPO_ROOT / "learned_optim" / "rules").glob("*.py"))
    assert "__init__.py" in rules
    expected |= {f"learned_optim/rules/{name}" for name in rules}
    registry = json.loads((REPO_ROOT / "pretrained" / "registry.json").read_text())
    with zipfile.ZipFile(built_wheel) as zf:
        packaged = json.loads(zf.read("learned_optim/pretrained/registry.json"))
    assert packaged == {**registry, PROBE: packaged[PROBE]}  # the checkout's registry (+ the probe)
    for name, entry in packaged.items():
        expected.add(f"learned_optim/pretrained/{entry['file']}")
        expected.add(f"learned_optim/pretrained/{name}.md")
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing}"
    assert not [n for n in names if n.startswith(("tests/", "runs/", "results/", "pretrained/"))]


def test_installed_wheel_finds_its_bundled_weights(built_wheel, tmp_path):
    """Installed (not a checkout): pretrained_dir() is the package data and every bundled file verifies."""
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                           "--disable-pip-version-check", "--target", str(target), str(built_wheel)],
                          capture_output=True, text=True, timeout=300, env=_subprocess_env())
    assert proc.returncode == 0, proc.stderr
    code = textwrap.dedent("""
        import json, learned_optim
        from learned_optim import weights
        folder = weights.pretrained_dir()
        out = {"module": learned_optim.__file__, "folder": str(folder),
               "registry": (folder / "registry.json").is_file(), "names": learned_optim.available_weights()}
        for name in out["names"]:
            learned_optim.load_rule(learned_optim.resolve_weights(name))
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=_subprocess_env(PYTHONPATH=str(target), LEARNED_OPTIM_HOME=str(tmp_path / "home")))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["module"]).resolve().is_relative_to(target.resolve())
    assert Path(out["folder"]).resolve() == (target / "learned_optim" / "pretrained").resolve()
    assert out["registry"]
    assert out["names"] == sorted([*json.loads((REPO_ROOT / "pretrained" / "registry.json").read_text()), PROBE])


def test_import_and_step_without_torchvision(tmp_path):
    code = textwrap.dedent("""
        import sys

        class BlockTorchvision:
            def find_spec(self, name, path=None, target=None):
                if name == "torchvision" or name.startswith("torchvision."):
                    raise ImportError("torchvision is blocked for this test")
                return None

        sys.meta_path.insert(0, BlockTorchvision())
        import torch
        import learned_optim

        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = learned_optim.L2ODM(model.parameters())
        before = model.weight.detach().clone()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
        assert not torch.equal(before, model.weight), "no update"
        assert "torchvision" not in sys.modules
        assert "meta_train" not in sys.modules, "the library must not import the trainer"
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=_subprocess_env(PYTHONPATH=str(REPO_ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_pretrained_dir_in_checkout():
    folder = W.pretrained_dir()
    assert folder.resolve() == (REPO_ROOT / "pretrained").resolve()
    assert (folder / "registry.json").is_file()
    registry = json.loads((folder / "registry.json").read_text())
    assert isinstance(registry, dict)
    for name, entry in registry.items():
        assert set(entry) >= {"file", "sha256", "rule"}, name
        assert (folder / entry["file"]).is_file(), f"{name}: {entry['file']} is registered but missing"
        assert (folder / f"{name}.md").is_file(), f"{name}: model card {name}.md is missing"
        assert W.sha256_file(folder / entry["file"]) == entry["sha256"], f"{name}: sha256 does not match"
