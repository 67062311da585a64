"""Populations: K optimizees per meta-training unroll and all seeds of an evaluation at once. Every member must
compute what one optimizee computes on its generator (to float rounding), K = 1 must stay the one-optimizee path
bit for bit, and the batched evaluation must reproduce the sequential curves. Synthetic 8x8 images only."""
from __future__ import annotations

import json
import math

import pytest
import torch

import learned_optim
from helpers import synthetic_images, write_synthetic_mnist
from meta_train import evaluate as ev
from meta_train.imitation import Teacher, imitation_unroll, population_imitation_unroll
from meta_train.tasks import Task
from meta_train.trainer import Config, Trainer, member_seed, members_per_rank
from meta_train import unroll
from meta_train.unroll import (meta_unroll, population_meta_unroll, population_rollout, population_step, rollout,
                               select_members, start, start_population, start_scaled)

CLOSE = dict(rtol=1e-4, atol=1e-6)


def tensors(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = synthetic_images(n, 1, size, seed)
    return torch.from_numpy(images).float().div(255), torch.from_numpy(labels).long()


def gens(k: int, base: int = 10) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + i) for i in range(k)]


@pytest.fixture(scope="module")
def small():
    return tensors(256, 8, 0)


@pytest.fixture(scope="module")
def mlp(small):
    return Task("mlp-orig", train=True, data=small)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return write_synthetic_mnist(tmp_path_factory.mktemp("small"), "MNIST", n_train=256, n_test=128, size=8)


def rule_of(model: str, **config):
    torch.manual_seed(0)
    return learned_optim.build_rule(model, config or None)


# ------------------------------------------------------------------------------ the vectorized optimizee
@pytest.mark.parametrize("name", ["mlp-orig", "nas-cell"])  # the NAS cell has batch norm: statistics per member
def test_population_forward_backward_is_each_members_own(name, small):
    task = Task(name, train=True, data=small)
    pop, ref = gens(3), gens(3)
    theta = torch.stack([task.init_params(g) for g in pop])
    batch = task.sample_batches(pop)
    losses, grad = task.population_loss_and_grad(theta, batch)
    assert losses.shape == (3,) and grad.shape == theta.shape
    for k, g in enumerate(ref):
        flat, one = task.init_params(g), task.sample_batch(g)
        assert torch.equal(flat, theta[k]) and torch.equal(one.x, batch.x[k]) and torch.equal(one.y, batch.y[k])
        loss, member_grad = task.loss_and_grad(flat, one)
        torch.testing.assert_close(losses[k], loss, **CLOSE)
        torch.testing.assert_close(grad[k], member_grad, **CLOSE)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(pop, ref))  # the same draws
    with pytest.raises(ValueError, match="shape"):
        task.population_loss(theta[0], batch)


@pytest.mark.parametrize("model,objective", [("dm", "sum"), ("rnnprop", "sum"), ("scale", "log_ratio")])
def test_population_unroll_is_the_mean_of_its_members(model, objective, mlp):
    rule = rule_of(model)
    pop = gens(3)
    traj, task = start_population(rule, mlp, pop, 2.0)  # random scaling: each member its own factors
    assert task.scale.shape == (3, mlp.num_params)
    _, traj, _ = population_meta_unroll(rule, task, traj, 3, pop, objective=objective)
    member_losses, nxt, values = population_meta_unroll(rule, task, traj, 3, pop, objective=objective)
    assert member_losses.shape == (3,) and values.shape == (4 if objective == "sum" else 3, 3) and nxt.step == 6
    rule.zero_grad()
    member_losses.mean().backward()
    population_grads = [None if p.grad is None else p.grad.clone() for p in rule.parameters()]
    rule.zero_grad()
    for k, g in enumerate(gens(3)):
        one, member_task = start_scaled(rule, mlp, g, 2.0)
        torch.testing.assert_close(member_task.scale, task.scale[k])
        _, one, _ = meta_unroll(rule, member_task, one, 3, g, objective=objective)
        loss, one, member_values = meta_unroll(rule, member_task, one, 3, g, objective=objective)
        (loss / 3).backward()
        torch.testing.assert_close(member_losses[k].detach(), loss.detach(), **CLOSE)
        torch.testing.assert_close(values[:, k], torch.tensor(member_values), **CLOSE)
        torch.testing.assert_close(nxt.theta[k], one.theta, **CLOSE)
        if objective == "log_ratio":
            assert float(nxt.f0[k]) == pytest.approx(one.f0, rel=1e-5)
    for got, expected in zip(population_grads, (p.grad for p in rule.parameters())):
        assert (got is None) == (expected is None)
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-7)  # the meta-loss is the members' mean


@pytest.mark.parametrize("model", ["dm", "scale"])
def test_population_rollout_matches_each_rollout(model, mlp):
    rule = rule_of(model)
    curves = population_rollout(rule, mlp, 12, gens(3))
    for k, g in enumerate(gens(3)):
        assert curves[k] == pytest.approx(rollout(rule, mlp, 12, g), rel=1e-4)


@pytest.mark.parametrize("model", ["dm", "rnnprop"])
def test_blocked_population_computes_what_one_call_computes(model, mlp, monkeypatch):
    """On the CPU a coordinate-wise rule runs in blocks of coordinates (unaligned with the members here: 1000 of
    3 x 1510): the unroll, its meta-gradient, the rollout and imitation are those of one call over all."""
    rule, pop = rule_of(model), gens(3)
    traj = start_population(rule, mlp, pop)[0]
    _, traj, _ = population_meta_unroll(rule, mlp, traj, 2, pop)  # a state that is not all zeros

    def everything(block):
        monkeypatch.setattr(unroll, "POPULATION_BLOCK", block)
        blocks = unroll.population_blocks(rule, traj.theta)
        rule.zero_grad()
        losses, nxt, values = population_meta_unroll(rule, mlp, traj, 3, gens(3))
        losses.mean().backward()
        imitation, along = population_imitation_unroll(rule, mlp, traj, Teacher("adam", traj.theta), 2, gens(3))
        return (blocks, losses.detach(), nxt.theta, nxt.state, values, [p.grad.clone() for p in rule.parameters()],
                imitation.detach(), along.state, population_rollout(rule, mlp, 5, gens(3)))

    one, blocked = everything(10 ** 9), everything(1000)
    assert one[0] is None and blocked[0] == [1000] * 4 + [530]
    for a, b in zip(one[1:-1], blocked[1:-1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(blocked[-1]), torch.tensor(one[-1]), rtol=1e-5, atol=0.0)
    assert unroll.population_blocks(rule_of("scale"), traj.theta) is None  # per-tensor statistics: one call
    assert unroll.population_blocks(rule, torch.empty(64, 10 ** 5, device="meta")) is None  # not the CPU: one call


def test_population_rollout_ends_each_curve_at_its_first_nan(mlp):
    rule = rule_of("dm", output_scale=1e36)  # steps of ~1e34: the losses overflow after a few dozen steps
    curves = population_rollout(rule, mlp, 200, gens(2), check_every=5)
    for k, g in enumerate(gens(2)):
        single = rollout(rule, mlp, 200, g)
        assert not math.isfinite(single[-1]) and len(single) < 200
        assert not math.isfinite(curves[k][-1]) and all(map(math.isfinite, curves[k][:-1]))
        assert len(curves[k]) == len(single)


def test_population_imitation_is_the_mean_of_its_members(mlp):
    rule = rule_of("rnnprop")
    pop = gens(3)
    traj, task = start_population(rule, mlp, pop)
    loss, nxt = population_imitation_unroll(rule, task, traj, Teacher("adam", traj.theta), 4, pop)
    singles = []
    for k, g in enumerate(gens(3)):
        one = start(rule, mlp, g)
        single, one = imitation_unroll(rule, mlp, one, Teacher("adam", one.theta), 4, g)
        singles.append(float(single.detach()))
        torch.testing.assert_close(nxt.theta[k], one.theta, **CLOSE)
    assert float(loss.detach()) == pytest.approx(sum(singles) / 3, rel=1e-4)


@pytest.mark.parametrize("model", ["dm", "scale"])
def test_selected_members_are_those_members(model, mlp):
    rule = rule_of(model)
    traj, _ = start_population(rule, mlp, gens(3))
    picked = select_members(rule, traj, torch.tensor([0, 2]))
    expected, _ = start_population(rule, mlp, [gens(3)[0], gens(3)[2]])
    assert torch.equal(picked.theta, expected.theta)
    assert all(torch.equal(picked.state[k], expected.state[k]) for k in expected.state)


class Unstaged(torch.nn.Module):
    """L2O-Scale seen only through ``forward``: a rule with per-tensor and global state and no stages."""

    coordinatewise = False

    def __init__(self, rule):
        super().__init__()
        self.inner = rule

    def state_kinds(self):
        return self.inner.state_kinds()

    def init_state(self, layout, **kwargs):
        return self.inner.init_state(layout, **kwargs)

    def forward(self, grad, state, step):
        return self.inner(grad, state, step)


def test_a_rule_without_stages_runs_under_vmap_per_member(mlp):
    rule = rule_of("scale")
    traj, _ = start_population(rule, mlp, gens(3))
    grad = torch.randn(3, mlp.num_params, generator=torch.Generator().manual_seed(0)) * 1e-2
    staged = population_step(rule, grad, traj.state, 2)
    vmapped = population_step(Unstaged(rule), grad, traj.state, 2)
    torch.testing.assert_close(staged[0], vmapped[0], **CLOSE)
    for key in staged[1]:
        torch.testing.assert_close(staged[1][key], vmapped[1][key], **CLOSE)
    assert staged[1]["glob"].shape == (20, 3) and staged[1]["tensor"].shape == (20, 3 * len(mlp.layout))


def test_teacher_keeps_the_state_of_the_selected_members():
    theta = torch.randn(3, 5)
    teacher = Teacher("adam", theta)
    for _ in range(2):
        theta = theta + teacher.step(theta, torch.randn(3, 5))
    twin = Teacher("adam", theta[[0, 2]])  # fresh moments: differs from a teacher that kept them
    teacher.select(torch.tensor([0, 2]))
    grad = torch.randn(2, 5)
    kept = teacher.step(theta[[0, 2]], grad)
    assert not torch.allclose(kept, twin.step(theta[[0, 2]], grad))
    assert teacher.opt.state[teacher.param]["exp_avg"].shape == (2, 5)


# ------------------------------------------------------------------------------ the trainer
def tiny_config(tmp_path, root, **kwargs) -> Config:
    base = dict(model="dm", out=str(tmp_path), data_root=str(root), horizons=[20], unroll=10, eval_runs=2,
                progress=False)
    return Config(**{**base, **kwargs})


def test_population_of_one_is_the_one_optimizee_path_bit_for_bit(tmp_path, small_root):
    trainer = Trainer(tiny_config(tmp_path, small_root, random_scale=1.0))
    assert trainer.members == 1 and trainer.member_gens == [trainer.gen]
    records = [trainer.run_epoch() for _ in range(2)]
    assert all(r["population"] == 1 for r in records)
    # the same two epochs written out with the one-optimizee building blocks
    torch.manual_seed(0)
    rule = learned_optim.build_rule("dm")
    opt = torch.optim.Adam(rule.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    task = Task("mlp-orig", train=True, data_root=small_root)
    for _ in range(2):
        traj, scaled = start_scaled(rule, task, gen, 1.0)
        for _ in range(2):
            loss, traj, _ = meta_unroll(rule, scaled, traj, 10, gen)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(trainer.rule.state_dict().values(), rule.state_dict().values()))
    assert torch.equal(trainer.gen.get_state(), gen.get_state())


@pytest.mark.parametrize("model", ["dm", "scale"])
def test_population_epochs_meta_imitation_and_self_improving(model, tmp_path, small_root):
    trainer = Trainer(tiny_config(tmp_path, small_root, model=model, population=3, random_scale=2.0,
                                  imitation=True, imitation_ratio=[0.5], self_improving=True))
    assert trainer.members == 3 and len({id(g) for g in trainer.member_gens}) == 3
    before = [g.get_state() for g in trainer.member_gens]
    records = []
    while {r["kind"] for r in records} != {"meta", "imitation"}:
        assert len(records) < 12
        records.append(trainer.run_epoch())
    assert all(r["population"] == 3 and math.isfinite(r["meta_loss"]) for r in records)
    assert all(not torch.equal(a, g.get_state()) for a, g in zip(before, trainer.member_gens))  # every member drew
    assert trainer.recipe()["population"] == 3


def test_diverged_members_leave_the_population_without_a_meta_step(tmp_path, small_root, monkeypatch):
    import meta_train.trainer as trainer_module

    real, sizes = trainer_module.population_meta_unroll, []

    def second_member_diverges(rule, task, traj, *args, **kwargs):
        sizes.append(traj.theta.shape[0])
        member_losses, nxt, values = real(rule, task, traj, *args, **kwargs)
        if len(sizes) == 1:
            member_losses = member_losses * torch.tensor([1.0, math.nan, 1.0])
        return member_losses, nxt, values

    monkeypatch.setattr(trainer_module, "population_meta_unroll", second_member_diverges)
    trainer = Trainer(tiny_config(tmp_path, small_root, population=3, random_scale=1.0))
    before = {k: v.clone() for k, v in trainer.rule.state_dict().items()}
    steps = []
    monkeypatch.setattr(trainer, "_meta_step", lambda opt, loss: steps.append(float(loss.detach())))
    trainer.run_epoch()
    assert sizes == [3, 2] and len(steps) == 1  # the first truncation took no meta-step, the second ran on 2
    assert all(torch.equal(v, trainer.rule.state_dict()[k]) for k, v in before.items())


def test_population_validation_matches_the_sequential_one(tmp_path, small_root):
    one = Trainer(tiny_config(tmp_path / "one", small_root, eval_runs=3))
    pop = Trainer(tiny_config(tmp_path / "pop", small_root, eval_runs=3, population=4))
    assert pop.validate(30) == pytest.approx(one.validate(30), rel=1e-4)


def test_population_split_across_processes():
    assert members_per_rank(1, 4) == 1 and members_per_rank(8, 2) == 4 and members_per_rank(2, 2) == 1
    with pytest.raises(ValueError, match="evenly"):
        members_per_rank(6, 4)
    assert len({member_seed(0, r, j) for r in range(4) for j in range(1, 8)}) == 28
    assert member_seed(0, 0, 1) != member_seed(1, 0, 1)


def run_main(args, root):
    from meta_train.__main__ import main

    try:
        main([*args, "--data-root", str(root)])
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def resumed_run_matches_straight(base, tmp_path, root):
    """``base`` run for 3 epochs straight and for 1 epoch then resumed to 3: the two exported files must be the same
    bytes. Returns the resumed run's folder."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main([*base, "--epochs", "3", "--out", str(straight)], root) == 0
    assert run_main([*base, "--epochs", "1", "--out", str(split)], root) == 0
    assert run_main([*base, "--epochs", "3", "--resume", "--out", str(split)], root) == 0
    assert (straight / "weights.safetensors").read_bytes() == (split / "weights.safetensors").read_bytes()
    return split


def test_population_run_resumes_bit_identical_and_logs_k(tmp_path, small_root):
    base = ["--model", "rnnprop", "--imitation", "--horizons", "20", "--unroll", "10", "--eval-every", "2",
            "--eval-runs", "2", "--no-progress", "--threads", "1", "--imitation-ratio", "0.5", "--random-scale", "2",
            "--population", "3"]
    split = resumed_run_matches_straight(base, tmp_path, small_root)
    assert learned_optim.read_metadata(split / "weights.safetensors")["recipe"]["population"] == 3
    records = [json.loads(line) for line in (split / "log.jsonl").read_text().splitlines()]
    assert [r["population"] for r in records if r["type"] == "epoch"] == [3] * 3
    ckpt = torch.load(split / "checkpoint.pt", weights_only=False)
    assert len(ckpt["population_generators"]) == 1 and len(ckpt["population_generators"][0]) == 2
    assert run_main([*base[:-1], "2", "--epochs", "4", "--resume", "--out", str(split)], small_root) != 0


def test_population_flag_is_checked(tmp_path, small_root, monkeypatch):
    assert run_main(["--model", "dm", "--population", "0", "--out", str(tmp_path / "a")], small_root) == 2
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_main(["--model", "dm", "--population", "3", "--out", str(tmp_path / "b")], small_root) == 2


# ------------------------------------------------------------------------------ batched evaluation
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    return {name: str(learned_optim.save_weights(rule_of(name), folder / f"{name}.safetensors"))
            for name in ("dm", "rnnprop", "scale")}


@pytest.mark.parametrize("optimizer,lr", [("adam", 1e-2), ("sgd", 0.5), ("rmsprop", 1e-3), ("dm", None),
                                          ("rnnprop", None), ("scale", None)])
def test_batched_seeds_reproduce_the_sequential_curves(optimizer, lr, weights):
    data = tensors(256, 8, 3)
    spec = ev.make_spec(weights.get(optimizer, optimizer), "mlp-orig", lr=lr, steps=25, seeds=[4, 7, 9],
                        injected_data=True)
    batched = ev.run_seeds(spec, spec.seeds, data)
    assert [r["seed"] for r in batched] == [4, 7, 9]
    for record in batched:
        sequential = ev.run_seed(spec, record["seed"], data)["losses"]
        assert len(record["losses"]) == len(sequential) == 25
        assert record["losses"] == pytest.approx(sequential, rel=1e-4)


def test_batched_seeds_with_batch_norm_and_divergence(tmp_path):
    data = tensors(256, 8, 3)
    spec = ev.make_spec("adam", "nas-cell", lr=1e-2, steps=10, seeds=2, injected_data=True)
    for record in ev.run_seeds(spec, spec.seeds, data):
        assert record["losses"] == pytest.approx(ev.run_seed(spec, record["seed"], data)["losses"], rel=1e-4)
    # a rule that blows up, with seeds that stop at different steps alone (so the first to stop in the batch
    # must not disturb the others); which random rule does that depends on torch's initialisers, which differ
    # between torch versions, so take the first of a few that does
    for rule_seed in range(5):
        torch.manual_seed(rule_seed)
        rule = learned_optim.build_rule("dm", {"output_scale": 1e36})
        blowup = learned_optim.save_weights(rule, tmp_path / f"blowup-{rule_seed}.safetensors")
        spec = ev.make_spec(str(blowup), "mlp-orig", steps=100, seeds=3, injected_data=True)
        sequential = {seed: ev.run_seed(spec, seed, data)["losses"] for seed in spec.seeds}
        if all(c[-1] is None for c in sequential.values()) and len({len(c) for c in sequential.values()}) > 1:
            break
    else:
        pytest.fail("none of 5 random rules with output_scale 1e36 stops its seeds at different steps")
    for record in ev.run_seeds(spec, spec.seeds, data):  # every seed stops at its own first NaN/Inf, as alone
        alone = sequential[record["seed"]]
        assert len(record["losses"]) == len(alone) < 100 and record["losses"][-1] is None
        assert record["losses"][:-1] == pytest.approx(alone[:-1], rel=1e-4)


def test_batched_learned_seed_with_a_nonfinite_gradient_is_rerun_alone(weights, monkeypatch):
    data = tensors(256, 8, 3)
    spec = ev.make_spec(weights["dm"], "mlp-orig", steps=6, seeds=3, injected_data=True)
    real_isfinite, calls = torch.isfinite, []

    def gradient_of_seed_1_turns_nan_at_step_3(x):
        out = real_isfinite(x)
        if x.dim() > 1 and x.shape[0] == 3:  # the per-seed check of a stacked gradient
            calls.append(None)
            if len(calls) > 2 * 4:  # 4 stacked tensors per step: from the third step on
                out = out.clone()
                out[1] = False
        return out

    monkeypatch.setattr(torch, "isfinite", gradient_of_seed_1_turns_nan_at_step_3)
    curves, rerun = ev.train_seeds(spec, spec.seeds, data)
    monkeypatch.setattr(torch, "isfinite", real_isfinite)
    assert rerun == [1] and all(len(c) == 6 for c in curves)
    assert curves[0] == pytest.approx(ev.run_seed(spec, 0, data)["losses"], rel=1e-4)


def test_batch_seeds_cli_stores_results_like_the_sequential_path(tmp_path, monkeypatch):
    import meta_train.data

    data = tensors(256, 8, 3)
    monkeypatch.setattr(meta_train.data, "load_dataset", lambda *a, **k: data)
    common = ["--optimizer", "adam", "--lr", "0.01", "--task", "mlp-orig", "--steps", "20", "--seeds", "3",
              "--workers", "1", "--no-progress"]
    assert ev.main([*common, "--out", str(tmp_path / "seq")]) == 0
    assert ev.main([*common, "--out", str(tmp_path / "bat"), "--batch-seeds"]) == 0
    seq = json.loads((tmp_path / "seq" / "adam__mlp-orig.json").read_text())
    bat = json.loads((tmp_path / "bat" / "adam__mlp-orig.json").read_text())
    assert bat["fingerprint"] == seq["fingerprint"] and bat["seeds"] == seq["seeds"] == [0, 1, 2]
    assert set(bat) == set(seq)
    for a, b in zip(bat["losses"], seq["losses"]):
        assert a == pytest.approx(b, rel=1e-4)
    assert bat["final_ln_loss_mean"] == pytest.approx(seq["final_ln_loss_mean"], rel=1e-4)
    # the batched run reuses finished seeds like the sequential one: only seeds 3 and 4 are new
    calls = []
    monkeypatch.setattr(ev, "run_seeds", lambda spec, seeds, data=None: calls.append(tuple(seeds)) or
                        [{"seed": s, "losses": [2.0] * 20, "seconds": 0.0} for s in seeds])
    assert ev.main([*common[:-4], "5", "--workers", "1", "--no-progress", "--out", str(tmp_path / "seq"),
                    "--batch-seeds", "2"]) == 0
    assert calls == [(3, 4)]
    assert ev.main([*common, "--out", str(tmp_path / "x"), "--batch-seeds", "-1"]) == 2


def test_seed_groups_keep_the_workers_busy():
    a, b = ev.make_spec("adam", "mlp-orig", lr=0.1, seeds=10), ev.make_spec("adam", "mlp-orig", lr=0.2, seeds=10)
    missing = {a: list(range(10)), b: [8, 9]}
    assert ev.seed_groups(missing, 1, 2) == [(a, (s,)) for s in range(10)] + [(b, (8,)), (b, (9,))]
    assert ev.seed_groups(missing, 0, 1) == [(a, tuple(range(10))), (b, (8, 9))]
    assert ev.seed_groups({a: list(range(10))}, 0, 2) == [(a, tuple(range(5))), (a, tuple(range(5, 10)))]
    assert ev.seed_groups(missing, 4, 8) == [(a, (0, 1, 2, 3)), (a, (4, 5, 6, 7)), (a, (8, 9)), (b, (8, 9))]
    assert ev.batch_size_for(None, "cuda:0") == 0 and ev.batch_size_for(None, "cpu") == 1



def test_a_member_diverging_on_another_rank_skips_the_meta_step_here_too(tmp_path, small_root, monkeypatch):
    """Ranks must take the same meta-steps (each one all-reduces its meta-gradients): this rank's members are
    finite, another rank reports a diverged one at the first truncation."""
    import meta_train.trainer as trainer_module

    trainer = Trainer(tiny_config(tmp_path, small_root, population=2, horizons=[30]))
    trainer.world = 2  # as a rank of two processes whose collectives are stubbed below
    others = iter([0, 1, 1, 1])  # the other rank: a diverged member at the first truncation, none left empty

    def all_reduce(tensor, op=None):
        if tensor.dtype == torch.long or tensor.dtype == torch.int64:  # the flags of _on_every_rank
            tensor.copy_(torch.minimum(tensor, torch.tensor([next(others)])))
        # meta-gradients: the other rank's equal this one's (their average is this one's)
        else:
            tensor.mul_(2)

    monkeypatch.setattr(trainer_module.dist, "all_reduce", all_reduce)
    steps = []
    real_step = trainer._meta_step
    monkeypatch.setattr(trainer, "_meta_step", lambda opt, loss: steps.append(1) or real_step(opt, loss))
    trainer.run_epoch()
    assert len(steps) == 2  # 3 truncations, the first without a meta-step; both members stay here


def test_a_checkpoint_from_before_populations_resumes_only_as_one_optimizee(tmp_path, small_root):
    out = tmp_path / "old"
    args = ["--model", "dm", "--horizons", "20", "--unroll", "10", "--eval-every", "1", "--eval-runs", "1",
            "--no-progress", "--threads", "1", "--out", str(out)]
    assert run_main([*args, "--epochs", "1"], small_root) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    del ckpt["config"]["population"], ckpt["population_generators"]  # as written before populations existed
    torch.save(ckpt, out / "checkpoint.pt")
    assert run_main([*args, "--epochs", "2", "--resume", "--population", "2"], small_root) != 0
    assert run_main([*args, "--epochs", "2", "--resume"], small_root) == 0
