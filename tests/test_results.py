"""Result files that fit in a repository: thinned curves keep every number the summaries, tables, claims and
figures use; ``meta_train.report`` regenerates the README and docs from ``results/`` (and the committed ones are
what it writes)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from helpers import synthetic_images
from meta_train import curves
from meta_train import evaluate as ev
from meta_train import report

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data():
    images, labels = synthetic_images(128, 1, 8, seed=4)  # 8x8 images: a 1,690-parameter MLP-orig
    return torch.from_numpy(images).float().div(255), torch.from_numpy(labels).long()


def test_kept_steps_are_the_head_every_20th_and_the_whole_tail():
    assert curves.kept_steps(250, 20, 100) == [0, 20, 40, 60, 80, 100, 120, 140, *range(150, 250)]
    assert curves.kept_steps(60, 20, 100) == list(range(60))  # shorter than the tail: everything
    curve = [float(i) for i in range(250)]
    assert curves.thin(curve, 20, 100)[-100:] == curve[-100:]


def test_a_stored_result_keeps_its_summary_exactly(tmp_path, data):
    steps = 310
    full = [ev.run_seed(ev.make_spec("adam", "mlp-orig", lr=0.01, steps=steps, seeds=[s], injected_data=True), s,
                        data)["losses"] for s in (0, 1)]
    result = ev.evaluate("adam", "mlp-orig", lr=0.01, steps=steps, seeds=2, out=tmp_path, data=data, workers=1,
                         progress=False, plot=True)
    stored = json.loads((tmp_path / "adam__mlp-orig.json").read_text())
    assert stored["curves"] == {"every": curves.EVERY, "tail": curves.TAIL, "lengths": [steps, steps]}
    assert [len(c) for c in stored["losses"]] == [len(curves.kept_steps(steps))] * 2
    expected = ev.summarize(full, steps)
    for key in ("final_ln_loss", "final_ln_loss_mean", "final_ln_loss_std", "diverged", "nonfinite"):
        assert stored[key] == expected[key] == result[key], key
    for i in range(2):
        steps_i, values = curves.points(stored, i)
        assert values == [full[i][t] for t in steps_i]
    assert (tmp_path / "mlp-orig.png").stat().st_size > 1000  # the plot reads thinned curves
    # a rerun with more seeds reuses the stored (thinned) seeds and keeps their numbers
    more = ev.evaluate("adam", "mlp-orig", lr=0.01, steps=steps, seeds=3, out=tmp_path, data=data, workers=1,
                       progress=False, plot=False)
    assert more["final_ln_loss"][:2] == expected["final_ln_loss"]


def test_a_diverged_curve_stays_diverged_when_thinned():
    curve = [2.3] * 300 + [None]
    thinned = curves.thin(curve)
    assert thinned[-1] is None
    assert ev.seed_final(thinned, 1000, length=len(curve)) == ev.seed_final(curve, 1000) == (None, True)
    rising = [1.0] * 150 + [3.0] * 150  # ends above its start: diverged but finite
    assert ev.seed_final(curves.thin(rising), 300, length=300) == ev.seed_final(rising, 300)


def test_thinning_a_results_folder_changes_no_number(tmp_path, data):
    ev.evaluate("sgd", "mlp-orig", lr=0.1, steps=250, seeds=2, out=tmp_path, data=data, workers=1, progress=False,
                plot=False)
    path = tmp_path / "sgd__mlp-orig.json"
    stored = json.loads(path.read_text())
    full = {k: v for k, v in stored.items() if k != "curves"}  # as files were written before thinning
    full["losses"] = [[float(i % 7) + 1 for i in range(250)] for _ in range(2)]
    full.update(ev.summarize(full["losses"], 250))
    path.write_text(json.dumps(full))
    before = report.results_markdown(tmp_path, digests={})
    assert report.thin_results(tmp_path) == 1 and report.thin_results(tmp_path) == 0
    assert report.results_markdown(tmp_path, digests={}) == before
    assert curves.is_thinned(json.loads(path.read_text()))


def test_report_writes_readme_block_docs_and_figure(tmp_path, data):
    results = tmp_path / "results"
    for optimizer, lr in (("adam", 0.01), ("sgd", 0.1)):
        ev.evaluate(optimizer, "mlp-orig", lr=lr, steps=120, seeds=2, out=results, data=data, workers=1,
                    progress=False, plot=False)
    readme = tmp_path / "README.md"
    readme.write_text("# T\n\n<!-- results:start -->\nold\n<!-- results:end -->\n")
    assert report.main([str(results), "--readme", str(readme), "--docs", str(tmp_path / "docs")]) == 0
    text = readme.read_text()
    assert "![" in text and "docs/figures/results.png" in text and "| mlp-orig |" in text and "old" not in text
    assert (tmp_path / "docs" / "figures" / "results.png").stat().st_size > 1000
    repro = (tmp_path / "docs" / "reproduction.md").read_text()
    assert repro.startswith("# Reproduction") and "| task |" in repro and "Commands:" in repro
    assert "# Bundled weights" in (tmp_path / "docs" / "weights.md").read_text()
    assert report.main([str(results), "--readme", str(readme), "--docs", str(tmp_path / "docs")]) == 0
    assert readme.read_text() == text  # idempotent


def test_committed_results_fit_in_the_repository():
    files = [p for p in (REPO / "results").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    # every stored curve outside a resumable .partial folder is thinned (meta_train/curves.py), results and seeds alike
    unthinned = [p.name for p in files if p.suffix == ".json" and ".partial" not in p.parts
                 and '"losses":' in p.read_text() and '"curves":' not in p.read_text()]
    assert not unthinned


def test_committed_readme_and_docs_are_what_the_report_writes(tmp_path):
    """README's results block, docs/reproduction.md and docs/weights.md come from results/ (regenerate them with
    ``python -m meta_train.report results --readme README.md --docs docs``)."""
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    docs = tmp_path / "docs"
    assert report.main([str(REPO / "results"), "--readme", str(readme), "--docs", str(docs)]) == 0
    assert readme.read_text().replace("../", "") == (REPO / "README.md").read_text().replace("../", "")
    for name in ("reproduction.md", "weights.md"):
        assert (docs / name).read_text() == (REPO / "docs" / name).read_text(), name


def test_the_readme_says_which_bundled_files_had_random_scaling(monkeypatch):
    import learned_optim.weights as weights

    real = weights.read_metadata

    def fake(path):
        meta = real(path)
        scaled = str(path).endswith("rnnprop.safetensors")
        return {**meta, "recipe": {**meta["recipe"], "random_scale": 3.0 if scaled else 0}}

    monkeypatch.setattr(weights, "read_metadata", fake)
    text = report.recipes_sentence()
    assert "was on in the recipe of `rnnprop` (B = 3) and off for the other bundled files" in text
    monkeypatch.setattr(weights, "read_metadata",
                        lambda path: {**real(path), "recipe": {**real(path)["recipe"], "random_scale": (
                            2.0 if str(path).endswith("dm-il.safetensors") else fake(path)["recipe"]["random_scale"])}})
    assert ("was on in the recipe of `dm-il` (B = 2) and `rnnprop` (B = 3), and off for the other bundled files"
            in report.recipes_sentence())
    monkeypatch.setattr(weights, "read_metadata",
                        lambda path: {**real(path), "recipe": {**real(path)["recipe"], "random_scale": 0}})
    assert "was off in the recipe of every bundled file" in report.recipes_sentence()


def test_claim_d_says_when_a_pair_differs_in_random_scaling(monkeypatch):
    bounds = {"rnnprop": 3.0, "rnnprop-cl-il": 0.0, "scale": 0.0, "scale-cl-il": 0.0}
    monkeypatch.setattr(report, "_random_scale", bounds.get)
    pairs = [("rnnprop", "rnnprop-cl-il"), ("scale", "scale-cl-il")]
    text = report._scaling_caveat(pairs)
    assert "`rnnprop` with random scaling B = 3, `rnnprop-cl-il` without" in text and "scale" not in text
    bounds["rnnprop"] = 0.0
    assert report._scaling_caveat(pairs) == ""
    bounds["dm-il"], bounds["dm"] = 3.0, 0.0
    text = report._scaling_caveat([("dm", "dm-il"), ("dm", "dm")], technique="CL or IL")
    assert text == (" (meta-trained `dm` without, `dm-il` with random scaling B = 3: this pair differs in random "
                    "scaling too, so it does not isolate CL or IL)")
