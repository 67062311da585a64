"""meta_train.evaluate / meta_train.report: the evaluation protocol on a tiny synthetic MNIST-shaped
dataset (injected as tensors, or written to disk in torchvision's layout), no real data needed."""
from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

import learned_optim
import meta_train.data
from helpers import synthetic_images, write_synthetic_mnist
from meta_train import evaluate as ev
from meta_train import report

STEPS, SEEDS = 50, 2


@pytest.fixture(scope="module")
def data():
    images, labels = synthetic_images(256, 1, 28, seed=3)
    return torch.from_numpy(images).float().div(255), torch.from_numpy(labels).long()


@pytest.fixture(scope="module")
def dm_weights(tmp_path_factory):
    torch.manual_seed(0)
    return learned_optim.save_weights(learned_optim.build_rule("dm"), tmp_path_factory.mktemp("w") / "dm.safetensors")


def run(optimizer, out, data, **kw):
    kw = {"steps": STEPS, "seeds": SEEDS, "workers": 1, "progress": False, **kw}
    return ev.evaluate(optimizer, "mlp-orig", out=out, data=data, **kw)


def recomputed_final(curve, steps):
    window = curve[-min(100, steps):]
    return math.log(sum(window) / len(window))


def check_result_file(path, optimizer):
    result = json.loads(path.read_text())
    for key in ("optimizer", "label", "task", "lr", "steps", "seeds", "losses", "final_ln_loss", "final_ln_loss_mean",
                "final_ln_loss_std", "diverged", "nonfinite", "seconds", "wall_seconds", "torch_version", "command"):
        assert key in result, key
    assert result["optimizer"] == optimizer and result["steps"] == STEPS and result["seeds"] == list(range(SEEDS))
    assert [len(c) for c in result["losses"]] == [STEPS] * SEEDS
    finals = [recomputed_final(c, STEPS) for c in result["losses"]]
    assert result["final_ln_loss"] == pytest.approx(finals)
    assert result["final_ln_loss_mean"] == pytest.approx(statistics.fmean(finals))
    assert result["final_ln_loss_std"] == pytest.approx(statistics.pstdev(finals))
    assert result["diverged"] == sum(sum(c[-100:]) / len(c[-100:]) > c[0] for c in result["losses"])
    return result


# ------------------------------------------------------------------------------------ protocol
def test_weights_replaced_during_an_evaluation_are_refused(tmp_path, data):
    path = learned_optim.save_weights(learned_optim.build_rule("dm"), tmp_path / "w.safetensors")
    spec = ev.make_spec(str(path), "mlp-orig", steps=2, seeds=1)
    model = torch.nn.Linear(3, 2)
    ev.build_optimizer(spec, model.parameters())  # unchanged file: fine
    torch.manual_seed(1)
    learned_optim.save_weights(learned_optim.build_rule("dm"), path)  # e.g. re-exported under the same name
    with pytest.raises(ev.EvaluationError, match="changed after this evaluation resolved it"):
        ev.build_optimizer(spec, model.parameters())


def test_card_refreshed_during_an_evaluation_is_accepted(tmp_path, data):
    torch.manual_seed(0)
    rule = learned_optim.build_rule("dm")
    path = learned_optim.save_weights(rule, tmp_path / "w.safetensors")
    spec = ev.make_spec(str(path), "mlp-orig", steps=2, seeds=1)
    learned_optim.save_weights(rule, path, evaluation={"mlp-orig": {"seeds": 1}})  # new card, same weights
    assert learned_optim.weights_digest(path) == spec.weights_digest
    ev.build_optimizer(spec, torch.nn.Linear(3, 2).parameters())


def test_re_exported_weights_keep_their_evaluation(tmp_path, data, monkeypatch):
    # Bundling embeds the evaluation in the file's metadata, which changes its sha256: the seeds stay reusable.
    torch.manual_seed(0)
    rule, path = learned_optim.build_rule("dm"), tmp_path / "dm.safetensors"
    first = run(str(learned_optim.save_weights(rule, path)), tmp_path, data, plot=False)
    learned_optim.save_weights(rule, path, evaluation={"mlp-orig": {"seeds": 2}})
    monkeypatch.setattr(ev, "run_seed", lambda *a, **k: pytest.fail("re-exported weights were evaluated again"))
    again = run(str(path), tmp_path, data, plot=False)
    assert again["losses"] == first["losses"] and again["weights_digest"] == first["weights_digest"]


def test_adam_and_learned_optimizer_follow_the_protocol(tmp_path, data, dm_weights):
    adam = run("adam", tmp_path, data, lr=1e-2)
    check_result_file(tmp_path / "adam__mlp-orig.json", "adam")
    dm = run(str(dm_weights), tmp_path, data)
    check_result_file(tmp_path / "dm__mlp-orig.json", str(dm_weights))
    assert dm["rule"] == "dm" and dm["lr"] == 1.0 and dm["weights_sha256"]
    # same seed -> same initialisation and same first batch for every optimizer
    assert [c[0] for c in adam["losses"]] == [c[0] for c in dm["losses"]]
    assert adam["losses"][0][0] != adam["losses"][1][0]
    assert adam["final_ln_loss_mean"] < math.log(adam["losses"][0][0])  # adam at lr 1e-2 learns something
    assert (tmp_path / "mlp-orig.png").stat().st_size > 0
    assert not (tmp_path / ".partial").exists()  # complete runs keep everything in their JSON


def test_result_names_weights_relative_to_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    inside = tmp_path / "runs" / "w.safetensors"
    monkeypatch.chdir(tmp_path)
    assert ev.portable_path(str(inside)) == "runs/w.safetensors"
    assert ev.portable_path("/elsewhere/w.safetensors") == "/elsewhere/w.safetensors"
    assert ev.portable_path(None) is None


def test_learned_optimizer_runs_as_a_user_runs_it(tmp_path, data, dm_weights):
    """The recorded curve equals a hand-written user loop with learned_optim.L2ODM(weights=path)."""
    result = run(str(dm_weights), tmp_path, data, steps=10, seeds=[7], plot=False)
    from meta_train.tasks import Task

    task = Task("mlp-orig", train=False, data=data)
    gen = torch.Generator().manual_seed(7)
    model = task.module
    torch.nn.utils.vector_to_parameters(task.init_params(gen), model.parameters())
    opt = learned_optim.L2ODM(model.parameters(), weights=str(dm_weights))
    losses = []
    for _ in range(10):
        batch = task.sample_batch(gen)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(batch.x), batch.y)
        loss.backward()
        opt.step()
        losses.append(float(f"{loss.item():.6g}"))
    assert result["losses"] == [losses]


def test_divergence_is_counted(tmp_path, data):
    result = run("sgd", tmp_path, data, lr=1e6, plot=False)
    assert result["diverged"] == SEEDS and result["diverged_seeds"] == list(range(SEEDS))


def test_nonfinite_runs_are_plus_infinity():
    curves = [[2.0, 1.0, 0.5], [2.0, None]]  # the second seed hit NaN at step 1 and stopped
    summary = ev.summarize(curves, steps=3)
    assert summary["final_ln_loss"] == [pytest.approx(math.log(3.5 / 3)), None]
    assert summary["final_ln_loss_mean"] == pytest.approx(math.log(3.5 / 3)) and summary["final_ln_loss_std"] == 0
    assert summary["nonfinite"] == 1 and summary["diverged"] == 1
    assert ev.summarize([[2.0, None]], steps=3)["final_ln_loss_mean"] is None
    assert ev.summarize([[1.0, 3.0, 3.0]], steps=3)["diverged"] == 1  # finite, above the initial loss


def test_best_point_prefers_points_without_divergence():
    points = [{"lr": 1, "final_ln_loss_mean": -5.0, "diverged": 1, "nonfinite": 0},
              {"lr": 2, "final_ln_loss_mean": -1.0, "diverged": 0, "nonfinite": 0},
              {"lr": 3, "final_ln_loss_mean": -2.0, "diverged": 0, "nonfinite": 0}]
    assert ev.best_point(points)["lr"] == 3
    all_diverged = [{"lr": 1, "final_ln_loss_mean": -9.0, "diverged": 2, "nonfinite": 1},
                    {"lr": 2, "final_ln_loss_mean": 0.5, "diverged": 2, "nonfinite": 0},
                    {"lr": 3, "final_ln_loss_mean": None, "diverged": 2, "nonfinite": 2}]
    assert ev.best_point(all_diverged)["lr"] == 2


def test_default_lr_grid_is_half_decades():
    grid = ev.parse_lr_grid("default")
    assert len(grid) == 9 and grid[0] == 1e-4 and grid[-1] == 1.0
    assert all(b / a == pytest.approx(10 ** 0.5, rel=1e-5) for a, b in zip(grid, grid[1:]))
    assert ev.parse_lr_grid("0.1,1") == (0.1, 1.0)


# ------------------------------------------------------------------------------------ resume
def test_resume_recomputes_only_missing_seeds(tmp_path, data, monkeypatch):
    real_run_seed, calls = ev.run_seed, []

    def crash_on_seed_1(spec, seed, data=None):
        if seed == 1:
            raise KeyboardInterrupt
        return real_run_seed(spec, seed, data)

    monkeypatch.setattr(ev, "run_seed", crash_on_seed_1)
    with pytest.raises(KeyboardInterrupt):
        run("adam", tmp_path, data, lr=1e-2, plot=False)
    seed0 = tmp_path / ".partial" / "adam__mlp-orig" / "seed0.json"
    assert seed0.exists() and not (tmp_path / "adam__mlp-orig.json").exists()
    stored, mtime = json.loads(seed0.read_text()), seed0.stat().st_mtime_ns

    def counting(spec, seed, data=None):
        calls.append(seed)
        if len(calls) == 1:
            assert seed0.stat().st_mtime_ns == mtime  # the finished seed is not rewritten
        return real_run_seed(spec, seed, data)

    monkeypatch.setattr(ev, "run_seed", counting)
    result = run("adam", tmp_path, data, lr=1e-2, plot=False)
    assert calls == [1] and result["losses"][0] == stored["losses"]
    run("adam", tmp_path, data, lr=1e-2, plot=False)  # complete: nothing to do
    assert calls == [1]
    more = run("adam", tmp_path, data, lr=1e-2, seeds=3, plot=False)  # more seeds: only the new one runs
    assert calls == [1, 2] and more["losses"][:2] == result["losses"]
    run("adam", tmp_path, data, lr=1e-2, steps=20, seeds=1, plot=False)  # other settings: recomputed
    assert calls == [1, 2, 0]


def test_seeds_of_another_init_scheme_are_not_reused(tmp_path, data, monkeypatch):
    # Conv-MNIST once drew batch norm's scale N(0, 0.01) like every other parameter; results of that scheme lack
    # the "init" key and must be recomputed, while the MLPs' fingerprints (plain N(0, 0.01)) stay as they were.
    assert "init" not in ev.make_spec("adam", "mlp-orig", lr=1e-2).fingerprint()
    spec = ev.make_spec("adam", "conv-mnist", lr=1e-2, steps=3, seeds=1, injected_data=True)
    assert spec.fingerprint()["init"] == "normal(0.01)+norm-identity"
    old = {k: v for k, v in spec.fingerprint().items() if k != "init"}
    ev.write_json_atomic(ev.partial_path(tmp_path, spec, 0), {"seed": 0, "losses": [1.0] * 3, "seconds": 0.0,
                                                              "fingerprint": old})
    calls = []
    monkeypatch.setattr(ev, "run_seed", lambda spec, seed, data=None: calls.append(seed) or
                        {"seed": seed, "losses": [2.0] * 3, "seconds": 0.0})
    (result,) = ev.run_specs([spec], tmp_path, workers=1, data=data, progress=False)
    assert calls == [0] and result["losses"] == [[2.0] * 3] and result["fingerprint"]["init"] == spec.init


def test_grid_point_reuses_the_single_run_at_its_lr(tmp_path, data, monkeypatch):
    single = run("adam", tmp_path, data, lr=1e-2, plot=False)  # e.g. the coarse grid's best at the full budget
    real_run_seed, calls = ev.run_seed, []
    monkeypatch.setattr(ev, "run_seed", lambda spec, seed, data=None: calls.append(spec.lr) or
                        real_run_seed(spec, seed, data))
    ev.evaluate_grid("adam", "mlp-orig", [1e-3, 1e-2], out=tmp_path, data=data, steps=STEPS, seeds=SEEDS,
                     workers=1, progress=False)  # the fine grid around it
    assert calls == [1e-3] * SEEDS
    point = json.loads((tmp_path / "adam__mlp-orig__lr0.01.json").read_text())
    assert point["losses"] == single["losses"] and point["grid_point"]


# ------------------------------------------------------------------------------------ grid, CLI, report
def test_lr_grid_writes_summary_and_picks_the_best(tmp_path, data):
    lrs = [1e-3, 1e-2, 1e6]
    summary = ev.evaluate_grid("rmsprop", "mlp-orig", lrs, out=tmp_path, data=data, steps=STEPS, seeds=SEEDS,
                               workers=1, progress=False)
    on_disk = json.loads((tmp_path / "rmsprop__mlp-orig__grid.json").read_text())
    assert on_disk["best_lr"] == summary["best_lr"]
    assert [p["lr"] for p in on_disk["points"]] == lrs
    for point in on_disk["points"]:
        result = check_result_file(tmp_path / point["file"], "rmsprop")
        assert result["grid_point"] and point["final_ln_loss_mean"] == result["final_ln_loss_mean"]
    assert on_disk["points"][2]["diverged"] == SEEDS
    clean = [p for p in on_disk["points"] if p["diverged"] == 0]
    expected = min(clean or on_disk["points"][:2], key=lambda p: p["final_ln_loss_mean"])
    assert on_disk["best_lr"] == expected["lr"]
    assert [r["lr"] for r in ev.runs_to_plot(tmp_path, "mlp-orig")] == [on_disk["best_lr"]]


def test_cli_with_dataset_loader_patched(tmp_path, data, monkeypatch):
    asked = []

    def fake_load_dataset(name, *, train, root=None, device="cpu"):
        asked.append((name, train))
        return data

    monkeypatch.setattr(meta_train.data, "load_dataset", fake_load_dataset)
    argv = ["--optimizer", "adam", "--lr-grid", "0.001,0.01", "--task", "mlp-orig", "--steps", "20", "--seeds", "2",
            "--out", str(tmp_path), "--workers", "1", "--no-progress"]
    assert ev.main(argv) == 0
    assert set(asked) == {("mnist", False)}  # the paper's protocol: the test split
    grid = json.loads((tmp_path / "adam__mlp-orig__grid.json").read_text())
    assert grid["command"].startswith("python -m meta_train.evaluate --optimizer adam")
    assert json.loads((tmp_path / "adam__mlp-orig__lr0.01.json").read_text())["dataset"] == "mnist"
    assert ev.main(["--optimizer", "no-such-weights", "--task", "mlp-orig", "--out", str(tmp_path)]) == 2


def test_worker_processes_read_torchvision_files_and_match_in_process_runs(tmp_path):
    root = write_synthetic_mnist(tmp_path / "data", n_train=16, n_test=64)
    out = tmp_path / "out"
    argv = ["--optimizer", "sgd", "--lr", "0.1", "--task", "mlp-orig", "--steps", "5", "--seeds", "2",
            "--out", str(out), "--data-root", str(root), "--workers", "2", "--no-progress", "--label", "sgd-0.1"]
    assert ev.main(argv) == 0
    result = json.loads((out / "sgd-0.1__mlp-orig.json").read_text())
    assert result["seeds"] == [0, 1] and all(len(c) == 5 for c in result["losses"])
    one = ev.evaluate("sgd", "mlp-orig", lr=0.1, steps=5, seeds=2, out=tmp_path / "one", data_root=str(root),
                      workers=1, progress=False, plot=False)
    assert one["losses"] == result["losses"]  # a seed computes the same in a worker process as in this one


def test_report_table_and_readme(tmp_path, data, dm_weights, capsys):
    results = tmp_path / "results"
    ev.evaluate_grid("adam", "mlp-orig", [1e-3, 1e-2], out=results, data=data, steps=STEPS, seeds=SEEDS, workers=1,
                     progress=False, plot=False, command="python -m meta_train.evaluate --optimizer adam ...")
    run(str(dm_weights), results, data, plot=False, label="dm-test")
    grid = json.loads((results / "adam__mlp-orig__grid.json").read_text())
    best = json.loads((results / grid["best_file"]).read_text())
    table = report.results_markdown(results)
    assert "| task | dm-test | adam |" in table
    row = next(line for line in table.splitlines() if line.startswith("| mlp-orig |"))
    assert f"{best['final_ln_loss_mean']:.2f} ± {best['final_ln_loss_std']:.2f} (lr {grid['best_lr']:g}" in row
    assert "`python -m meta_train.evaluate --optimizer adam ...`" in table

    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\n<!-- results:start -->\nold table\n<!-- results:end -->\n\nafter\n")
    assert report.main([str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and "| mlp-orig |" in text and text.endswith("<!-- results:end -->\n\nafter\n")
    assert report.main([str(results), "--readme", str(readme)]) == 0 and readme.read_text() == text  # idempotent

    # a bundled name whose file now computes something else: its old result is left out and named
    stale = report.results_markdown(results, digests={"dm-test": "0" * 64})
    assert "| task | adam |" in stale and "dm-test on mlp-orig (`dm-test__mlp-orig.json`)" in stale
    assert "Left out" not in report.results_markdown(results, digests={"dm-test": learned_optim.weights_digest(
        dm_weights)})

    no_markers = tmp_path / "OTHER.md"
    no_markers.write_text("# nothing to replace\n")
    assert report.main([str(results), "--readme", str(no_markers)]) == 1
    assert no_markers.read_text() == "# nothing to replace\n"
    assert "| task |" in capsys.readouterr().out


def test_bf16_recurrent_state_option(tmp_path, data, dm_weights):
    fp32 = run(str(dm_weights), tmp_path, data)
    bf16 = run(str(dm_weights), tmp_path / "bf16", data, state_dtype="bfloat16", label="dm-bf16")
    assert bf16["fingerprint"]["state_dtype"] == "bfloat16" and fp32["fingerprint"]["state_dtype"] == "float32"
    assert [c[0] for c in bf16["losses"]] == [c[0] for c in fp32["losses"]]  # same start, different state dtype


def test_claims_are_computed_from_results():
    from meta_train.report import claims_markdown

    def cell(mean, diverged=0, curve=(2.3, 0.5, 0.1)):  # noqa: E306
        return {"final_ln_loss_mean": mean, "final_ln_loss": [mean], "final_ln_loss_std": 0.1, "diverged": diverged,
                "seeds": [0], "losses": [list(curve)]}

    cells = {("mlp-orig", "dm"): cell(0.5, diverged=1), ("mlp-orig", "dm-cl"): cell(-2.0),
             ("mlp-orig", "dm-il"): cell(-1.0), ("mlp-orig", "dm-cl-il"): cell(-3.0), ("mlp-orig", "adam"): cell(-6.0)}
    text = claims_markdown(cells)
    assert "(a) vanilla L2O-DM" in text and "1/1 seeds diverged" in text and "**held**" in text.split("(b)")[0]
    improving = [2.3 - 0.0002 * t for t in range(1000)]  # keeps going down: does not degrade
    degrading = [2.3 * 0.5 ** (t / 50) if t < 500 else 2.3 * 0.5 ** 10 * 2 ** ((t - 500) / 100) for t in range(1000)]
    for curve, verdict in ((improving, "**did not hold**"), (degrading, "**held**")):
        cells[("mlp-orig", "dm")] = {**cell(0.0), "losses": [curve]}
        line = claims_markdown(cells).split("(b)")[0]
        assert verdict in line, line
    cells[("mlp-orig", "dm")] = cell(0.5, diverged=1)
    assert "dm 0.50, dm-cl -2.00, dm-il -1.00, " \
           "dm-cl-il -3.00: **held**" in text
    assert "(c)" in text and "**not checked**" in text  # conv-mnist missing
    assert "dm-cl-il -3.00 vs released -5.6" in text
    assert "(e)" in text and "not measured: **not checked**" in text
    cells[("mlp-fashion", "dm-cl-il")] = cell(-2.0)
    cells[("mlp-relu", "dm-cl-il")] = cell(1.0, diverged=1)
    cells[("mlp-fashion", "adam")] = cell(-1.0)
    text = claims_markdown(cells)
    assert "dm-cl-il on mlp-relu 1.00 from ln 0.83, 1/1 diverged, 1/1 not 0.1 below their start" in text
    assert "**did not hold**: trains on 1 of 2 measured task/optimizer pairs, beats tuned Adam on 1" in text
    cells[("mlp-relu", "dm-cl-il")] = cell(0.80)  # below its start (ln 2.3 = 0.83), but by less than 0.1: stalled
    text = claims_markdown(cells)
    assert "dm-cl-il on mlp-relu 0.80 from ln 0.83, 0/1 diverged, 1/1 not 0.1 below their start" in text
    assert "**did not hold**: trains on 1 of 2 measured" in text
    cells[("mlp-relu", "dm-cl-il")] = cell(0.70)
    assert "**held**: trains on 2 of 2 measured" in claims_markdown(cells)
    cells[("mlp-relu", "scale-cl-il")] = cell(0.80)  # every CL+IL model counts, L2O-Scale's too
    text = claims_markdown(cells)
    assert "scale-cl-il on mlp-relu 0.80 from ln 0.83" in text and "**did not hold**: trains on 2 of 3 measured" in text
    del cells[("mlp-relu", "scale-cl-il")]
    cells[("mlp-relu", "dm-cl-il")] = {**cell(None, diverged=1), "final_ln_loss_std": None}  # a seed hit NaN
    assert "dm-cl-il on mlp-relu NaN/Inf from ln 0.83, 1/1 diverged" in claims_markdown(cells)
