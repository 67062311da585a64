"""meta_train: curriculum state machine, unroll, imitation, tasks, the CLI end to end, resume
(bit-identical, SIGKILL, SIGTERM) and two processes with torchrun. Synthetic data only."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import learned_optim
from helpers import write_synthetic_cifar10, write_synthetic_mnist
from meta_train.curriculum import ADVANCE, CONTINUE, IMPROVED, STOP, Curriculum
from meta_train.imitation import SelfImproving, Teacher, imitation_unroll
from meta_train.tasks import TASKS, Task, init_scheme
from meta_train.trainer import Config, Trainer
from meta_train.unroll import draw_scale, meta_unroll, rollout, start, start_scaled

REPO = Path(__file__).resolve().parent.parent
TINY = ["--horizons", "20,40", "--epochs", "6", "--eval-every", "2", "--eval-runs", "2", "--no-progress",
        "--threads", "1"]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_synthetic_mnist(root, "MNIST")
    write_synthetic_mnist(root, "FashionMNIST")
    write_synthetic_cifar10(root)
    return root


@pytest.fixture(scope="session")
def small_root(tmp_path_factory):
    """MNIST-format data of 8x8 images: MLP-orig has 1,690 parameters, so meta-training runs take a second."""
    return write_synthetic_mnist(tmp_path_factory.mktemp("small"), "MNIST", n_train=256, n_test=128, size=8)


def run_main(args, data_root, capsys=None):
    """``python -m meta_train ARGS`` in this process (no interpreter start-up): (exit status, stderr if captured)."""
    from meta_train.__main__ import main

    try:
        main([*args, "--data-root", str(data_root)])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, (capsys.readouterr().err if capsys is not None else "")


def _env(data_root):
    env = dict(os.environ, LEARNED_OPTIM_DATA=str(data_root), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


# ------------------------------------------------------------------------------ curriculum
def test_curriculum_improve_then_advance_with_fresh_baseline():
    cl = Curriculum([100, 200, 500], min_evals=3)
    assert (cl.train_horizon, cl.valid_horizon) == (100, 200)
    assert cl.observe(5.0) == IMPROVED
    assert cl.observe(4.0) == IMPROVED
    assert cl.observe(3.0) == IMPROVED  # improving evaluations keep the stage going past N_period
    assert cl.observe(4.2) == ADVANCE  # >= 3 evaluations, improved, this one did not: next stage
    assert (cl.stage, cl.train_horizon, cl.valid_horizon) == (1, 200, 500)
    with pytest.raises(RuntimeError, match="set_baseline"):
        cl.observe(1.0)
    cl.set_baseline(3.0)  # the restored best model validated at the new horizon
    assert cl.best == 3.0
    assert cl.observe(3.5) == CONTINUE
    assert cl.observe(2.5) == IMPROVED
    assert cl.observe(2.7) == ADVANCE
    assert cl.last_stage and cl.valid_horizon == 500  # the last stage validates at its own horizon


def test_curriculum_stops_when_a_stage_brings_no_improvement():
    cl = Curriculum([100, 200], min_evals=3)
    for v in (3.0, 2.0, 2.5):
        cl.observe(v)
    cl.set_baseline(1.0)
    assert [cl.observe(v) for v in (1.5, 1.2, 1.1)] == [CONTINUE, CONTINUE, STOP]
    assert cl.done
    with pytest.raises(RuntimeError, match="finished"):
        cl.observe(0.1)


def test_curriculum_keeps_training_while_improving_and_stops_at_last_stage():
    cl = Curriculum([100], min_evals=2)
    assert [cl.observe(v) for v in (5, 4, 3, 2)] == [IMPROVED] * 4
    assert cl.observe(2.5) == STOP and cl.done  # last stage finished
    cl2 = Curriculum.from_dict(Curriculum([100, 200]).to_dict())
    assert cl2.horizons == [100, 200]
    with pytest.raises(ValueError, match="Invalid curriculum"):
        Curriculum([])


def test_curriculum_extend_after_the_last_stage_finished_advances():
    cl = Curriculum([100, 200], min_evals=2)
    for v in (3.0, 2.0, 2.5):
        cl.observe(v)
    cl.set_baseline(2.0)
    assert [cl.observe(v) for v in (1.5, 1.6)] == [IMPROVED, STOP] and cl.done
    assert cl.extend([100, 200, 500]) == "advance"
    assert not cl.done and (cl.stage, cl.train_horizon, cl.valid_horizon) == (2, 500, 500)
    with pytest.raises(RuntimeError, match="set_baseline"):
        cl.observe(1.0)
    cl.set_baseline(1.4)
    assert cl.observe(1.45) == CONTINUE


def test_curriculum_extend_mid_last_stage_rebaselines_and_keeps_the_count():
    cl = Curriculum([100, 200], min_evals=3)
    for v in (3.0, 2.0, 2.5):
        cl.observe(v)
    cl.set_baseline(2.0)
    assert cl.observe(1.5) == IMPROVED and cl.valid_horizon == 200
    assert cl.extend([100, 200, 500]) == "rebaseline"
    assert (cl.stage, cl.valid_horizon, cl.num_evals, cl.improved) == (1, 500, 1, True)
    cl.set_baseline(1.7)  # the stage's best re-measured at the new, longer validation horizon
    assert cl.observe(1.8) == CONTINUE and cl.observe(1.9) == ADVANCE and cl.stage == 2


def test_curriculum_extend_refuses_a_changed_prefix_and_keeps_a_failed_run_stopped():
    cl = Curriculum([100, 200], min_evals=1)
    with pytest.raises(ValueError, match="append"):
        cl.extend([100, 300, 500])
    with pytest.raises(ValueError, match="append"):
        cl.extend([100, 200])
    assert cl.extend([100, 200, 500]) == "none" and cl.valid_horizon == 200  # stage 0 is untouched
    assert cl.observe(3.0) == IMPROVED and cl.observe(3.5) == ADVANCE
    cl2 = Curriculum([100, 200], min_evals=1, stage=1, done=True, improved=False)
    assert cl2.extend([100, 200, 500]) == "stopped" and cl2.done


# ------------------------------------------------------------------------------ tasks
@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_gives_finite_loss_and_gradient(name, data_root):
    task = Task(name, train=True, data_root=data_root)
    gen = torch.Generator().manual_seed(0)
    theta = task.init_params(gen)
    plain = torch.randn(task.num_params, generator=torch.Generator().manual_seed(0)) * 0.01
    norm = torch.zeros(task.num_params, dtype=torch.bool)
    for start, stop, value in task.identity_init:  # batch norm starts as the identity, as tf.layers' does
        assert (theta[start:stop] == value).all()
        norm[start:stop] = True
    assert torch.equal(theta[~norm], plain[~norm])  # everything else is the N(0, 0.01) draw, unchanged
    modules = dict(task.module.named_modules())
    bn = [n for n in task.names if isinstance(modules[n.rsplit(".", 1)[0]], torch.nn.BatchNorm2d)]
    assert int(norm.sum()) == sum(task.numels[task.names.index(n)] for n in bn)
    assert (task.init_scheme == "normal(0.01)") == (not bn) and task.init_scheme == init_scheme(name)
    batch = task.sample_batch(gen)
    assert batch.x.shape[0] == 128
    loss, grad = task.loss_and_grad(theta, batch)
    assert math.isfinite(float(loss)) and grad.shape == theta.shape and torch.isfinite(grad).all()
    assert abs(float(loss) - math.log(10)) < 0.5  # near-uniform predictions at init


@settings(max_examples=20, deadline=None)
@given(channels=st.integers(1, 4), height=st.integers(1, 9), width=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_nas_cell_pool_is_avg_pool_without_padding_counts(channels, height, width, seed):
    from meta_train.tasks.models import AvgPool3x3

    x = torch.randn(2, channels, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = AvgPool3x3()(x1)
    ref = torch.nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)(x2)
    upstream = torch.randn_like(ref)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(x1.grad, x2.grad)
    assert list(AvgPool3x3().parameters()) == [] and list(AvgPool3x3().buffers()) == []


def test_cifar10_loader_reads_the_on_disk_format(data_root):
    from meta_train.data import load_dataset

    x, y = load_dataset("cifar10", train=True, root=data_root)
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32 and 0 <= float(x.min()) <= float(x.max()) <= 1
    xt, _ = load_dataset("cifar10", train=False, root=data_root)
    assert xt.shape == (20, 3, 32, 32) and y.dtype == torch.long


def test_missing_dataset_says_where_to_put_it(tmp_path):
    from meta_train.data import load_dataset

    with pytest.raises(FileNotFoundError, match="LEARNED_OPTIM_DATA"):
        load_dataset("fashion-mnist", train=True, root=tmp_path / "empty")


# ------------------------------------------------------------------------------ unroll & imitation
@pytest.fixture(scope="module")
def mlp(data_root):
    return Task("mlp-orig", train=True, data_root=data_root)


def test_meta_unroll_sums_unroll_plus_one_losses_and_reaches_every_weight(mlp):
    rule = learned_optim.build_rule("dm")
    gen = torch.Generator().manual_seed(0)
    traj = start(rule, mlp, gen)
    loss, nxt, values = meta_unroll(rule, mlp, traj, 5, gen)
    assert len(values) == 6 and nxt.step == 5 and not nxt.theta.requires_grad
    torch.testing.assert_close(loss.detach(), torch.tensor(sum(values)), rtol=1e-5, atol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in rule.parameters())


def test_log_ratio_objective_for_scale(mlp):
    rule = learned_optim.build_rule("scale")
    gen = torch.Generator().manual_seed(0)
    traj = start(rule, mlp, gen)
    loss, nxt, values = meta_unroll(rule, mlp, traj, 4, gen, objective="log_ratio")
    expected = sum(math.log(v / (values[0] + 1e-6) + 1e-6) for v in values) / len(values)
    assert abs(float(loss.detach()) - expected) < 1e-5 and nxt.f0 == values[0]
    loss.backward()


def test_teacher_matches_torch_adam():
    theta = torch.randn(7)
    teacher = Teacher("adam", theta)
    ref = theta.clone().requires_grad_(True)
    ref_opt = torch.optim.Adam([ref], lr=0.01)
    for _ in range(3):
        grad = torch.randn(7)
        update = teacher.step(theta, grad)
        ref.grad = grad
        ref_opt.step()
        theta = theta + update
        torch.testing.assert_close(theta, ref.detach())
    with pytest.raises(ValueError, match="Unknown teacher"):
        Teacher("lion", theta)


def test_imitation_reduces_the_imitation_loss(small_root):
    mlp = Task("mlp-orig", train=True, data_root=small_root)
    torch.manual_seed(0)
    rule = learned_optim.build_rule("rnnprop")
    opt = torch.optim.Adam(rule.parameters(), lr=3e-3)
    losses = []
    for epoch in range(15):
        gen = torch.Generator().manual_seed(0)  # the same teacher trajectory every time
        traj = start(rule, mlp, gen)
        loss, _ = imitation_unroll(rule, mlp, traj, Teacher("adam", traj.theta), 5, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0]


def test_self_improving_anneals_to_the_rule():
    si = SelfImproving(["adam", "sgd", "adagrad"], anneal_epochs=100)
    assert si.p_aux(0) == pytest.approx(0.75) and si.p_aux(50) == pytest.approx(0.375) and si.p_aux(100) == 0


def test_rollout_records_every_step(mlp):
    losses = rollout(learned_optim.build_rule("dm"), mlp, 7, torch.Generator().manual_seed(0))
    assert len(losses) == 7 and all(math.isfinite(v) for v in losses)


# ------------------------------------------------------------------------------ random scaling
def test_random_scaling_shows_the_rule_r_times_the_gradient(mlp):
    gen = torch.Generator().manual_seed(0)
    theta = mlp.init_params(gen)
    r = draw_scale(mlp.num_params, 3.0, torch.Generator().manual_seed(1))
    assert math.exp(-3) <= float(r.min()) and float(r.max()) <= math.exp(3) and float(r.log().std()) > 1.5
    scaled = mlp.scaled(r)
    assert mlp.scale is None and scaled.x is mlp.x  # a view of the same task, the original untouched
    batch = mlp.sample_batch(gen)
    loss_scaled, grad_scaled = scaled.loss_and_grad(theta / r, batch)  # the scaled optimizee starts at theta0 / r
    loss, grad = mlp.loss_and_grad(theta, batch)
    torch.testing.assert_close(loss_scaled, loss)
    torch.testing.assert_close(grad_scaled, r * grad)
    with pytest.raises(ValueError, match="shape"):
        mlp.scaled(r[:-1])


def test_random_scale_zero_draws_nothing_and_keeps_the_task(mlp):
    rule = learned_optim.build_rule("rnnprop")
    gen, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    traj, task = start_scaled(rule, mlp, gen, 0.0)
    plain = start(rule, mlp, ref)
    assert task is mlp and torch.equal(traj.theta, plain.theta)
    assert torch.equal(gen.get_state(), ref.get_state())  # B = 0: the random streams of a run without the option
    traj, task = start_scaled(rule, mlp, gen, 2.0)
    assert task.scale is not None and not torch.equal(gen.get_state(), ref.get_state())
    torch.testing.assert_close(traj.theta * task.scale, start(rule, mlp, ref).theta)  # same function, same point


def _tiny_trainer(tmp_path, data_root, **kwargs) -> Trainer:  # data_root: small_root
    cfg = Config(model="rnnprop", out=str(tmp_path), data_root=str(data_root),
                 **{"horizons": [20], "unroll": 10, "eval_runs": 2, "progress": False, **kwargs})
    return Trainer(cfg)


def test_random_scaling_reaches_both_kinds_of_epoch_and_never_validation(tmp_path, small_root, monkeypatch):
    import meta_train.trainer as trainer_module

    seen = []

    def spy(real):
        def wrapped(rule, task, *args, **kwargs):
            seen.append((real.__name__, task.scale))
            return real(rule, task, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(trainer_module, "meta_unroll", spy(trainer_module.meta_unroll))
    monkeypatch.setattr(trainer_module, "imitation_unroll", spy(trainer_module.imitation_unroll))
    plain = _tiny_trainer(tmp_path / "plain", small_root)
    scaled = _tiny_trainer(tmp_path / "scaled", small_root, random_scale=3.0, imitation=True,
                           imitation_ratio=[0.5])
    assert plain.validate(40) == scaled.validate(40)  # same initial rule: validation is never scaled
    for _ in range(4):
        scaled.run_epoch()
    assert {name for name, _ in seen} == {"meta_unroll", "imitation_unroll"}
    assert all(scale is not None and float(scale.log().abs().max()) <= 3.0 for _, scale in seen)
    # one draw per epoch, shared by all its truncations
    assert len({id(scale) for _, scale in seen}) == 4
    assert scaled.task.scale is None
    assert scaled.recipe()["random_scale"] == 3.0 and plain.recipe()["random_scale"] == 0.0


# ------------------------------------------------------------------------------ CLI end to end
@pytest.mark.parametrize("model", ["dm", "rnnprop", "scale"])
def test_tiny_end_to_end_run_produces_loadable_weights(model, tmp_path, small_root):
    out = tmp_path / model
    code, _ = run_main(["--model", model, "--curriculum", "--imitation", "--out", str(out), *TINY], small_root)
    assert code == 0
    for name in ("weights.safetensors", "log.jsonl", "checkpoint.pt", "training.png"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum(r["type"] == "epoch" for r in records) == 6
    assert any(r["type"] == "eval" for r in records)
    meta = learned_optim.read_metadata(out / "weights.safetensors")
    assert meta["rule"] == model and meta["recipe"]["curriculum"] and meta["recipe"]["horizons"] == [20, 40]
    assert meta["recipe"]["epochs_run"] == 6
    cls = {"dm": learned_optim.L2ODM, "rnnprop": learned_optim.RNNprop, "scale": learned_optim.L2OScale}[model]
    p = torch.zeros(4, requires_grad=True)
    opt = cls([p], weights=str(out / "weights.safetensors"))
    p.grad = torch.ones(4)
    opt.step()


def test_self_improving_and_aug_options_run(tmp_path, small_root):
    code, _ = run_main(["--model", "dm", "--self-improving", "--out", str(tmp_path / "si"), *TINY], small_root)
    assert code == 0
    assert learned_optim.read_metadata(tmp_path / "si" / "weights.safetensors")["recipe"]["self_improving"]


def test_help_explains_the_knobs(data_root, capsys):
    assert run_main(["--help"], data_root)[0] == 0
    help_text = capsys.readouterr().out
    for flag in ("--curriculum", "--imitation", "--self-improving", "--aug", "--horizons", "--eval-every",
                 "--eval-runs", "--imitation-ratio", "--resume", "--device", "--data-root", "--random-scale",
                 "--overwrite"):
        assert flag in help_text


def test_resume_is_bit_identical(tmp_path, small_root):
    # random scaling on: its factors come from the run's stored generator, so a resumed run draws the same ones
    base = ["--model", "rnnprop", "--curriculum", "--imitation", "--horizons", "20,40", "--eval-every", "2",
            "--eval-runs", "2", "--no-progress", "--threads", "1", "--imitation-ratio", "0.5", "--random-scale", "3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main([*base, "--epochs", "6", "--out", str(straight)], small_root)[0] == 0
    assert run_main([*base, "--epochs", "3", "--out", str(split)], small_root)[0] == 0
    assert run_main([*base, "--epochs", "6", "--resume", "--out", str(split)], small_root)[0] == 0
    assert (straight / "weights.safetensors").read_bytes() == (split / "weights.safetensors").read_bytes()
    assert learned_optim.read_metadata(split / "weights.safetensors")["recipe"]["random_scale"] == 3.0

    def strip(path):
        return [{k: v for k, v in json.loads(l).items() if k != "elapsed"} for l in path.read_text().splitlines()]

    assert strip(straight / "log.jsonl") == strip(split / "log.jsonl")


def test_resume_keeps_the_rule_config_of_the_checkpoint(tmp_path, small_root):
    out = tmp_path / "s"
    args = ["--model", "scale", "--out", str(out), *TINY[:2], "--eval-every", "1", "--eval-runs", "1",
            "--no-progress", "--threads", "1"]
    assert run_main([*args, "--epochs", "1"], small_root)[0] == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["rule_config"]["lr_offset"] == "tensor"  # a fresh run draws as the original
    del ckpt["rule_config"]  # a checkpoint written before rule configs were stored
    torch.save(ckpt, out / "checkpoint.pt")
    assert run_main([*args, "--epochs", "2", "--resume"], small_root)[0] == 0
    assert learned_optim.read_metadata(out / "weights.safetensors")["config"]["lr_offset"] == "shared"
    assert torch.load(out / "checkpoint.pt", weights_only=False)["rule_config"]["lr_offset"] == "shared"


def test_resume_with_appended_horizons_continues_the_curriculum(tmp_path, small_root, capsys):
    out = tmp_path / "ext"
    base = ["--model", "dm", "--curriculum", "--eval-every", "1", "--eval-runs", "1", "--no-progress",
            "--threads", "1", "--min-evals", "1", "--out", str(out)]
    assert run_main([*base, "--horizons", "20", "--epochs", "30"], small_root)[0] == 0
    before = learned_optim.read_metadata(out / "weights.safetensors")["recipe"]
    assert before["stage_reached"] == 0
    finished = "curriculum finished" in before["stop_reason"]  # else it hit the epoch cap mid-stage
    assert run_main([*base, "--horizons", "20,40", "--epochs", "60", "--resume"], small_root)[0] == 0
    records = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    ext = [r for r in records if r["type"] == "extend"]
    assert len(ext) == 1 and ext[0]["from"] == [20] and ext[0]["horizons"] == [20, 40]
    assert ext[0]["action"] == ("advance" if finished else "rebaseline")
    follow = records[records.index(ext[0]) + 1]  # the stage's best, validated at the new N_valid
    assert follow["action"] == "baseline" and follow["horizon"] == 40
    after = learned_optim.read_metadata(out / "weights.safetensors")["recipe"]
    assert after["horizons"] == [20, 40] and after["stage_reached"] == 1
    assert any(r["type"] == "epoch" and r["horizon"] == 40 for r in records)
    capsys.readouterr()
    code, err = run_main([*base, "--horizons", "40,80", "--epochs", "60", "--resume"], small_root, capsys)
    assert code == 2 and "different recipe" in err


def _start_long_run(out, data_root):
    args = ["--model", "dm", "--horizons", "40", "--epochs", "400", "--eval-every", "1", "--eval-runs", "1",
            "--no-progress", "--threads", "1", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "meta_train", *args], env=_env(data_root), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    return proc, args


def test_killed_run_resumes(tmp_path, small_root):
    out = tmp_path / "killed"
    proc, args = _start_long_run(out, small_root)
    time.sleep(0.5)  # a few more epochs, checkpoints written after every validation
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    # a crash in the middle of a checkpoint write leaves only a partial temp file behind
    (out / "checkpoint.pt.tmp").write_bytes(b"partial garbage")
    done = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    ckpt_epoch = torch.load(out / "checkpoint.pt", weights_only=False)["epoch"]
    code, _ = run_main([*args[:args.index("--epochs") + 1], str(ckpt_epoch + 3), *args[args.index("--epochs") + 2:],
                        "--resume"], small_root)
    assert code == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in records if r["type"] == "epoch"]
    assert epochs == list(range(1, ckpt_epoch + 4))  # nothing lost, nothing duplicated
    assert done["epoch"] >= ckpt_epoch
    learned_optim.load_rule(out / "weights.safetensors")


def test_sigterm_checkpoints_and_exits(tmp_path, small_root):
    """In this process: a helper thread sends SIGTERM once the first checkpoint exists (the trainer's handler is
    installed by then); the run checkpoints and exits with 128 + SIGTERM."""
    import threading

    out = tmp_path / "term"
    args = ["--model", "dm", "--horizons", "40", "--epochs", "400", "--eval-every", "1", "--eval-runs", "1",
            "--no-progress", "--threads", "1", "--out", str(out)]

    def terminate():
        deadline = time.time() + 120
        while not (out / "checkpoint.pt").exists() and time.time() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate, daemon=True)
    killer.start()
    code, _ = run_main(args, small_root)
    killer.join()
    assert code == 128 + signal.SIGTERM
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    epochs = [json.loads(l)["epoch"] for l in (out / "log.jsonl").read_text().splitlines()
              if json.loads(l)["type"] == "epoch"]
    assert ckpt["epoch"] == epochs[-1] < 400  # stopped early, and the checkpoint holds every logged epoch
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the trainer put the previous handler back


def test_two_processes_with_torchrun(tmp_path, small_root):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "meta_train", "--model", "dm", "--imitation", "--out", str(out), "--horizons", "20",
           "--epochs", "4", "--eval-every", "2", "--eval-runs", "2", "--no-progress", "--threads", "1"]
    proc = subprocess.run(cmd, env=_env(small_root), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    meta = learned_optim.read_metadata(out / "weights.safetensors")
    assert meta["recipe"]["world_size"] == 2
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert len(ckpt["generators"]) == 2 and ckpt["epoch"] == 4
    # rank 0 alone writes: one line per epoch
    assert sum(json.loads(l)["type"] == "epoch" for l in (out / "log.jsonl").read_text().splitlines()) == 4


def test_bundle_pins_sha_writes_card_and_resolves(tmp_path, monkeypatch):
    from learned_optim import weights as W
    from meta_train.export import bundle, summarize_evaluations

    run = tmp_path / "run"
    run.mkdir()
    learned_optim.save_weights(learned_optim.build_rule("dm"), run / "weights.safetensors", recipe={"epochs_run": 3})
    (run / "log.jsonl").write_text(json.dumps({"type": "epoch", "epoch": 3, "elapsed": 12.5}) + "\n")
    result = tmp_path / "dm__mlp-orig.json"
    result.write_text(json.dumps({"task": "mlp-orig", "steps": 10, "lr": 1.0, "final_ln_loss_mean": -1.0,
                                  "final_ln_loss_std": 0.1, "diverged": 0, "seeds": [0, 1], "losses": [[1.0]]}))
    pretrained = tmp_path / "pretrained"
    dst = bundle(run, "my-dm", pretrained, summarize_evaluations([result]), notes="shortened")
    registry = json.loads((pretrained / "registry.json").read_text())
    assert registry["my-dm"]["sha256"] == W.sha256_file(dst) and registry["my-dm"]["rule"] == "dm"
    meta = learned_optim.read_metadata(dst)
    assert meta["recipe"]["wall_clock_s"] == 12.5 and meta["recipe"]["notes"] == "shortened"
    assert meta["evaluation"]["mlp-orig"]["seeds"] == 2 and "losses" not in meta["evaluation"]["mlp-orig"]
    assert (pretrained / "my-dm.md").read_text().startswith("---\nlicense:")
    monkeypatch.setattr(W, "pretrained_dir", lambda: pretrained)
    assert learned_optim.available_weights() == ["my-dm"]
    learned_optim.L2ODM([torch.zeros(2, requires_grad=True)], weights="my-dm")


def test_bundle_records_which_model_of_the_run_it_exports(tmp_path):
    from meta_train.export import bundle

    run = tmp_path / "run"
    run.mkdir()
    recipe = {"model": "rnnprop", "task": "mlp-orig", "curriculum": True, "horizons": [100, 200],
              "horizon_reached": 200, "epochs_run": 6}
    learned_optim.save_weights(learned_optim.build_rule("rnnprop"), run / "weights.safetensors", recipe=recipe)
    records = [{"type": "epoch", "epoch": e, "horizon": 100 if e <= 4 else 200, "elapsed": float(e)}
               for e in range(1, 7)]
    records[1:1] = [{"type": "eval", "epoch": 2, "action": "improved"}]
    records[4:4] = [{"type": "eval", "epoch": 4, "action": "improved"}, {"type": "eval", "epoch": 4, "action": "advance"},
                    {"type": "eval", "epoch": 4, "action": "baseline"}]
    records += [{"type": "eval", "epoch": 6, "action": "stop"}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    dst = bundle(run, "my-rnnprop", tmp_path / "pretrained")
    got = learned_optim.read_metadata(dst)["recipe"]
    assert (got["best_epoch"], got["best_horizon"]) == (4, 100)
    assert "from a run of 6 epochs (the model of epoch 4, trained at N = 100)" in learned_optim.weights.recipe_summary(got)
    # an --init run that never improved exports its starting weights; a log without validations says nothing
    from meta_train.export import exported_model
    assert exported_model(records[:1], {"init": {"weights": "x"}}) == {"best_epoch": 0}
    assert exported_model(records[:1], {}) == {}
    assert "(the model" not in learned_optim.weights.recipe_summary({**got, "best_epoch": 6})


def test_refresh_records_which_model_of_its_run_an_older_file_holds(tmp_path):
    from meta_train.export import bundle, main as export_main

    run, pretrained, results = tmp_path / "run", tmp_path / "pretrained", tmp_path / "results"
    run.mkdir()
    results.mkdir()
    # a file written before export recorded its model: the run's best (epoch 2, N = 100) re-validated as stage 2's
    # baseline (0.3); the run went on after the export and improved again at epoch 6 (0.2)
    recipe = {"model": "dm", "epochs_run": 4, "best_val_loss": 0.3}
    learned_optim.save_weights(learned_optim.build_rule("dm"), run / "weights.safetensors", recipe=recipe)
    dst = bundle(run, "my-dm", pretrained)
    assert "best_epoch" not in learned_optim.read_metadata(dst)["recipe"]  # no log yet: nothing to say
    digest = learned_optim.weights_digest(dst)
    records = [{"type": "epoch", "epoch": e, "horizon": 100 if e <= 3 else 200} for e in range(1, 7)]
    records[1:1] = [{"type": "eval", "epoch": 2, "action": "improved", "val_loss": 0.4}]
    records[4:4] = [{"type": "eval", "epoch": 3, "action": "advance", "val_loss": 0.5},
                    {"type": "eval", "epoch": 3, "action": "baseline", "val_loss": 0.3}]
    records += [{"type": "eval", "epoch": 6, "action": "improved", "val_loss": 0.2}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    before = (pretrained / "my-dm.safetensors").read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    (other / "log.jsonl").write_text(json.dumps({"type": "eval", "epoch": 1, "action": "improved", "val_loss": 0.9}))
    for bad in (["--run", str(other)], ["--run", str(tmp_path / "missing")]):  # not its run: refused, file untouched
        assert export_main(["--refresh", "my-dm", *bad, "--pretrained-dir", str(pretrained)]) == 2
    assert (pretrained / "my-dm.safetensors").read_bytes() == before
    assert export_main(["--refresh", "my-dm", "--run", str(run), "--pretrained-dir", str(pretrained),
                        "--results", str(results)]) == 0
    got = learned_optim.read_metadata(dst)["recipe"]
    assert (got["best_epoch"], got["best_horizon"]) == (2, 100) and got["epochs_run"] == 4
    assert learned_optim.weights_digest(dst) == digest
    assert "(the model of epoch 2, trained at N = 100)" in (pretrained / "my-dm.md").read_text()
    with pytest.raises(SystemExit):  # --run names one file's run
        export_main(["--refresh", "my-dm", "other", "--run", str(run), "--pretrained-dir", str(pretrained)])


def test_refresh_embeds_only_the_evaluations_of_these_weights(tmp_path):
    from learned_optim import weights as W
    from meta_train.export import bundle, main as export_main

    run, pretrained, results = tmp_path / "run", tmp_path / "pretrained", tmp_path / "results"
    run.mkdir()
    results.mkdir()
    torch.manual_seed(0)
    learned_optim.save_weights(learned_optim.build_rule("dm"), run / "weights.safetensors", recipe={"epochs_run": 3})
    dst = bundle(run, "my-dm", pretrained)
    digest = learned_optim.weights_digest(dst)

    def result(name, task, seeds, value, weights):
        (results / name).write_text(json.dumps({"type": "evaluation", "task": task, "steps": 10, "lr": 1.0,
                                                "final_ln_loss_mean": value, "final_ln_loss_std": 0.1, "diverged": 0,
                                                "seeds": list(range(seeds)), "weights_digest": weights}))

    result("my-dm__mlp-orig.json", "mlp-orig", 10, -5.0, digest)
    result("my-dm-2seeds__mlp-orig.json", "mlp-orig", 2, -9.0, digest)  # fewer seeds: not the one embedded
    result("my-dm__lenet.json", "lenet", 2, -1.0, digest)
    result("old__mlp-relu.json", "mlp-relu", 10, -7.0, "0" * 64)  # other weights under the same name
    export_main(["--refresh", "my-dm", "--pretrained-dir", str(pretrained), "--results", str(results)])
    meta = learned_optim.read_metadata(dst)
    assert sorted(meta["evaluation"]) == ["lenet", "mlp-orig"]
    assert meta["evaluation"]["mlp-orig"]["final_ln_loss_mean"] == -5.0 and meta["recipe"]["epochs_run"] == 3
    assert learned_optim.weights_digest(dst) == digest  # the same weights: their evaluations stay valid
    registry = json.loads((pretrained / "registry.json").read_text())
    assert registry["my-dm"]["sha256"] == W.sha256_file(dst)
    assert "-5.0" in (pretrained / "my-dm.md").read_text()
    assert export_main(["--refresh", "nope", "--pretrained-dir", str(pretrained), "--results", str(results)]) == 2


def test_fixed_validation_reuses_the_optimizees_and_fresh_validation_does_not(tmp_path, small_root):
    fresh = _tiny_trainer(tmp_path / "fresh", small_root)
    fixed = _tiny_trainer(tmp_path / "fixed", small_root, fixed_validation=True)
    # the same rule validated twice: fresh optimizees move the number, fixed ones do not
    assert fresh.validate(30) != fresh.validate(30)
    first = fixed.validate(30)
    assert fixed.validate(30) == first
    fixed.run_epoch()
    assert fixed.validate(30) != first  # the rule changed, the optimizees did not
    assert fixed.recipe()["fixed_validation"] is True and fresh.recipe()["fixed_validation"] is False
    assert "fixed validation optimizees" in learned_optim.weights.recipe_summary(fixed.recipe())


def test_fixed_validation_is_part_of_the_recipe_on_resume(tmp_path, small_root, capsys):
    out = tmp_path / "run"
    code, _ = run_main(["--model", "rnnprop", "--out", str(out), *TINY, "--epochs", "2", "--fixed-validation"],
                       small_root, capsys)
    assert code == 0
    assert learned_optim.read_metadata(out / "weights.safetensors")["recipe"]["fixed_validation"] is True
    code, err = run_main(["--model", "rnnprop", "--out", str(out), *TINY, "--resume"], small_root, capsys)
    assert code == 2 and "fixed_validation: True in the checkpoint, False now" in err


def test_valid_horizon_overrides_n_valid_in_every_stage_and_is_part_of_the_recipe(tmp_path, small_root, capsys):
    out = tmp_path / "run"
    args = ["--model", "rnnprop", "--out", str(out), "--curriculum", "--horizons", "10,20", "--unroll", "10",
            "--eval-every", "1", "--eval-runs", "2", "--min-evals", "1", "--epochs", "4", "--fixed-validation",
            "--no-progress", "--threads", "1"]
    code, _ = run_main([*args, "--valid-horizon", "35"], small_root, capsys)
    assert code == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {rec["horizon"] for rec in log if rec["type"] == "eval"} == {35}  # not the next stage's N_train (20)
    recipe = learned_optim.read_metadata(out / "weights.safetensors")["recipe"]
    assert recipe["valid_horizon"] == 35
    assert "validated at N = 35" in learned_optim.weights.recipe_summary(recipe)
    code, err = run_main([*args, "--resume", "--epochs", "5"], small_root, capsys)
    assert code == 2 and "valid_horizon: 35 in the checkpoint, None now" in err
    code, err = run_main([*args, "--valid-horizon", "0", "--out", str(tmp_path / "bad")], small_root, capsys)
    assert code == 2 and "--valid-horizon must be >= 1" in err and not (tmp_path / "bad").exists()
    # without the option nothing changes: Algorithm 1's N_valid, and no key in the recipe
    plain = _tiny_trainer(tmp_path / "plain", small_root, curriculum=True, horizons=[10, 20, 30])
    assert plain.valid_horizon == 20 and "valid_horizon" not in plain.recipe()
    fixed = _tiny_trainer(tmp_path / "fixed", small_root, curriculum=True, horizons=[10, 20, 30], valid_horizon=35)
    for trainer in (plain, fixed):
        trainer.curriculum.stage = 1  # a later stage: Algorithm 1 moves N_valid on, the option keeps it
    assert (plain.valid_horizon, fixed.valid_horizon) == (30, 35)


def test_an_advance_reuses_the_best_value_only_when_its_validation_would_repeat(tmp_path, small_root, monkeypatch):
    def advance(trainer):  # one improvement, then no improvement: Algorithm 1 advances with the stage's best
        trainer.out.mkdir(parents=True)
        seen = []
        monkeypatch.setattr(trainer, "validate", lambda horizon: seen.append(horizon) or 0.4)
        trainer._after_validation(0.5)
        trainer._after_validation(0.6)
        assert trainer.stage == 1 and trainer.history[-1]["action"] == "baseline"
        return seen

    common = dict(curriculum=True, horizons=[10, 20, 30], min_evals=1)
    same = _tiny_trainer(tmp_path / "same", small_root, valid_horizon=35, fixed_validation=True, **common)
    assert advance(same) == [] and same.best_val == same.curriculum.best == 0.5
    assert same.history[-1]["reused"] is True
    same.curriculum.stage = 2  # the last stage; --resume with more --horizons keeps N_valid, so no re-measure
    same._extend_curriculum([10, 20, 30, 40])
    assert same.curriculum.best == 0.5 and same.history[-1]["reused"] is True and not same.curriculum.awaiting_baseline
    # fresh optimizees, or an N_valid that moves on with the stage: the restored best is validated again
    for name, kwargs in (("fresh", {"valid_horizon": 35}), ("moves", {"fixed_validation": True})):
        other = _tiny_trainer(tmp_path / name, small_root, **kwargs, **common)
        assert advance(other) == [other.valid_horizon] and other.best_val == other.curriculum.best == 0.4
        assert "reused" not in other.history[-1]


def test_valid_examples_validates_on_a_fixed_subset_of_the_training_split(tmp_path, small_root, capsys):
    whole = _tiny_trainer(tmp_path / "whole", small_root, fixed_validation=True)
    subset = _tiny_trainer(tmp_path / "subset", small_root, fixed_validation=True, valid_examples=50)
    again = _tiny_trainer(tmp_path / "again", small_root, fixed_validation=True, valid_examples=50, seed=3)
    assert whole.valid_task is whole.task and len(subset.valid_task.x) == 50
    assert len(subset.task.x) == len(whole.task.x)  # training still draws from the whole split
    # the same 50 examples in every run, each one of the training split's
    assert torch.equal(subset.valid_task.x, again.valid_task.x) and torch.equal(subset.valid_task.y, again.valid_task.y)
    rows = {tuple(r.flatten().tolist()) for r in whole.task.x}
    assert all(tuple(r.flatten().tolist()) in rows for r in subset.valid_task.x)
    assert subset.validate(30) != whole.validate(30)
    assert subset.recipe()["valid_examples"] == 50 and "valid_examples" not in whole.recipe()
    assert "on 50 training examples" in learned_optim.weights.recipe_summary(subset.recipe())
    # more examples than the split holds: one line, exit 2, and an --overwrite run's files left alone
    out = tmp_path / "run"
    assert run_main(["--model", "rnnprop", "--out", str(out), *TINY, "--epochs", "2"], small_root, capsys)[0] == 0
    before = (out / "weights.safetensors").read_bytes()
    code, err = run_main(["--model", "rnnprop", "--out", str(out), *TINY, "--overwrite", "--valid-examples",
                          str(len(whole.task.x) + 1)], small_root, capsys)
    assert code == 2 and "--valid-examples" in err and len(err.strip().splitlines()) == 1
    assert (out / "weights.safetensors").read_bytes() == before


# ------------------------------------------------------------------------------ --init (fine-tuning)
@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_root):
    """A tiny trained RNNprop run whose weights the --init tests start from."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert run_main(["--model", "rnnprop", "--out", str(out), *TINY, "--epochs", "2"], small_root)[0] == 0
    return out / "weights.safetensors"


def test_init_starts_from_the_weights_and_keeps_them_until_training_beats_them(tmp_path, small_root, trained):
    from safetensors.torch import load_file

    trainer = _tiny_trainer(tmp_path / "ft", small_root, init=str(trained), curriculum=True, horizons=[20, 40])
    start = load_file(str(trained))
    assert all(torch.equal(trainer.rule.state_dict()[k], start[k]) for k in start)
    with pytest.raises(RuntimeError, match="set_baseline"):  # the first stage waits for the start's validation
        trainer.curriculum.observe(1.0)
    trainer.out.mkdir()
    trainer._baseline()  # what train() does first in a fresh --init run
    assert trainer.curriculum.best == trainer.best_val and math.isfinite(trainer.best_val)
    assert trainer.history[-1]["action"] == "baseline" and trainer.history[-1]["epoch"] == 0
    trainer.run_epoch()  # the rule moves; until a validation beats the baseline the export is the start
    assert not all(torch.equal(trainer.rule.state_dict()[k], start[k]) for k in start)
    exported = trainer.export()
    assert all(torch.equal(load_file(str(exported))[k], start[k]) for k in start)
    recipe = learned_optim.read_metadata(exported)["recipe"]
    assert recipe["init"]["weights"] == str(trained)
    assert recipe["init"]["weights_digest"] == learned_optim.weights_digest(trained)
    assert "fine-tuned from" in learned_optim.weights.recipe_summary(recipe)
    assert "init" not in _tiny_trainer(tmp_path / "fresh", small_root).recipe()  # fresh runs: recipe unchanged


def test_init_resume_is_bit_identical_and_the_init_is_part_of_the_recipe(tmp_path, small_root, trained, capsys):
    base = ["--model", "rnnprop", "--curriculum", "--init", str(trained), *TINY[:2], "--eval-every", "2",
            "--eval-runs", "2", "--no-progress", "--threads", "1", "--min-evals", "5"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main([*base, "--epochs", "4", "--out", str(straight)], small_root)[0] == 0
    assert run_main([*base, "--epochs", "2", "--out", str(split)], small_root)[0] == 0
    assert run_main([*base, "--epochs", "4", "--resume", "--out", str(split)], small_root)[0] == 0
    assert (straight / "weights.safetensors").read_bytes() == (split / "weights.safetensors").read_bytes()
    first = json.loads((split / "log.jsonl").read_text().splitlines()[0])
    assert (first["epoch"], first["action"]) == (0, "baseline")
    other = tmp_path / "other.safetensors"
    other.write_bytes(trained.read_bytes())
    code, err = run_main([*[str(other) if a == str(trained) else a for a in base], "--epochs", "6", "--resume",
                          "--out", str(split)], small_root, capsys)
    assert code == 2 and "init:" in err and "in the checkpoint" in err


def test_init_refuses_other_rules_and_the_runs_own_files(tmp_path, small_root, trained, capsys):
    code, err = run_main(["--model", "dm", "--init", str(trained), "--out", str(tmp_path / "dm"), *TINY], small_root,
                         capsys)
    assert code == 2 and "'rnnprop' weights but a 'dm' rule" in err and "\n" not in err.strip()
    code, err = run_main(["--model", "rnnprop", "--init", "no-such-weights", "--out", str(tmp_path / "x"), *TINY],
                         small_root, capsys)
    assert code == 2 and "Unknown weights 'no-such-weights'" in err
    # fine-tuning a run's own exported weights in that run's folder would delete or overwrite them
    run = trained.parent
    before = trained.read_bytes()
    for flag in ("--overwrite", "--resume"):
        code, err = run_main(["--model", "rnnprop", "--init", str(trained), "--out", str(run), flag, *TINY],
                             small_root, capsys)
        assert code == 2 and "copy it out of --out" in err
    assert trained.read_bytes() == before
