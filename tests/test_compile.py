"""The rule under ``torch.compile``, in both shells. ``meta_train --compile``: the unrolls compute what the eager rule
computes, compile once per shape (not per step), and the run resumes bit-identical with the flag. The optimizer's
``backend="compile"``: the same updates and state layout as the torch backend. A failed compilation is one clear
error that changes nothing. The default suite uses torch.compile's ``aot_eager`` backend (the same graph capture
and autograd split, no code generation); the inductor backend, which generates the fused code, is checked in
``slow`` tests."""
from __future__ import annotations

import functools

import pytest
import torch

import learned_optim
from meta_train import trainer as trainer_module
from meta_train import unroll
from meta_train.imitation import Teacher, imitation_unroll, population_imitation_unroll
from meta_train.tasks import Task
from meta_train.unroll import (CompiledRule, meta_unroll, population_meta_unroll, population_rollout, rollout, start,
                               start_population)
from test_population import (gens, resumed_run_matches_straight, run_main, small_root,  # noqa: F401
                             tensors)  # (small_root: a fixture)


@pytest.fixture(scope="module")
def mlp():
    return Task("mlp-orig", train=True, data=tensors(256, 8, 0))


def rule_of(model: str):
    torch.manual_seed(0)
    return learned_optim.build_rule(model)


def counting_backend():
    """A torch.compile backend that runs the captured graph as it is and counts the graphs it is given."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend, graphs


def grads_of(rule, loss) -> list[torch.Tensor]:
    rule.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in rule.parameters()]


@pytest.mark.parametrize("model", ["dm", "rnnprop"])
def test_compiled_rule_compiles_once_per_shape_not_per_step(model, mlp):
    torch._dynamo.reset()
    rule = rule_of(model)
    backend, graphs = counting_backend()
    compiled = CompiledRule(rule, backend=backend)
    traj = start(rule, mlp, torch.Generator().manual_seed(0))
    loss, traj, _ = meta_unroll(compiled, mlp, traj, 6, torch.Generator().manual_seed(1))
    loss, _, _ = meta_unroll(compiled, mlp, traj, 6, torch.Generator().manual_seed(2))
    loss.backward()
    # twelve step numbers, two graphs: a truncation's first step (its state without grad) and the later ones
    assert len(graphs) == 2
    assert compiled.coordinatewise and compiled.state_kinds() == rule.state_kinds()  # the rule's attributes
    assert compiled.rule is rule and list(compiled.parameters()) == list(rule.parameters())  # its own tensors


@pytest.mark.parametrize("model", ["dm", "rnnprop"])
def test_compiled_unrolls_compute_what_the_eager_rule_computes(model, mlp, monkeypatch):
    torch._dynamo.reset()
    rule = rule_of(model)
    compiled = CompiledRule(rule, backend="aot_eager")
    one = start(rule, mlp, torch.Generator().manual_seed(0))
    eager_loss, eager_next, _ = meta_unroll(rule, mlp, one, 5, torch.Generator().manual_seed(1))
    loss, nxt, _ = meta_unroll(compiled, mlp, one, 5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(nxt.theta, eager_next.theta)
    torch.testing.assert_close(grads_of(rule, loss), grads_of(rule, eager_loss))
    # a population in blocks of coordinates (two block sizes: 1000 and the remainder)
    monkeypatch.setattr(unroll, "POPULATION_BLOCK", 1000)
    traj = start_population(rule, mlp, gens(3))[0]
    eager_losses, eager_pop, _ = population_meta_unroll(rule, mlp, traj, 4, gens(3))
    losses, pop, _ = population_meta_unroll(compiled, mlp, traj, 4, gens(3))
    torch.testing.assert_close(losses, eager_losses)
    torch.testing.assert_close(pop.state, eager_pop.state)
    torch.testing.assert_close(grads_of(rule, losses.mean()), grads_of(rule, eager_losses.mean()))
    teacher = functools.partial(Teacher, "adam")
    il, _ = imitation_unroll(compiled, mlp, one, teacher(one.theta), 3, torch.Generator().manual_seed(3))
    eager_il, _ = imitation_unroll(rule, mlp, one, teacher(one.theta), 3, torch.Generator().manual_seed(3))
    torch.testing.assert_close(il, eager_il)
    pil, _ = population_imitation_unroll(compiled, mlp, traj, teacher(traj.theta), 3, gens(3))
    eager_pil, _ = population_imitation_unroll(rule, mlp, traj, teacher(traj.theta), 3, gens(3))
    torch.testing.assert_close(pil, eager_pil)
    with torch.no_grad():  # validation's rollouts (an inference graph)
        assert rollout(compiled, mlp, 8, torch.Generator().manual_seed(4)) == pytest.approx(
            rollout(rule, mlp, 8, torch.Generator().manual_seed(4)), rel=1e-5)
        torch.testing.assert_close(torch.tensor(population_rollout(compiled, mlp, 8, gens(3))),
                                   torch.tensor(population_rollout(rule, mlp, 8, gens(3))), rtol=1e-5, atol=0.0)


def test_compile_takes_the_coordinatewise_rules_only(tmp_path, small_root):  # noqa: F811
    with pytest.raises(ValueError, match="coordinate-wise"):
        CompiledRule(rule_of("scale"))
    assert run_main(["--model", "scale", "--compile", "--out", str(tmp_path / "s")], small_root) == 2
    assert not (tmp_path / "s").exists()


def test_compiled_run_resumes_bit_identical(tmp_path, small_root, monkeypatch):  # noqa: F811
    backend, graphs = counting_backend()
    monkeypatch.setattr(trainer_module, "CompiledRule", functools.partial(CompiledRule, backend=backend))
    base = ["--model", "rnnprop", "--compile", "--imitation", "--imitation-ratio", "0.5", "--horizons", "20",
            "--unroll", "10", "--eval-every", "2", "--eval-runs", "2", "--no-progress", "--threads", "1",
            "--population", "2"]
    split = resumed_run_matches_straight(base, tmp_path, small_root)
    assert torch.load(split / "checkpoint.pt", weights_only=False)["config"]["compile"] is True
    assert graphs  # the runs stepped through the compiled rule


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dm", "rnnprop"])
def test_inductor_compiled_unroll_matches_the_eager_rule(model, mlp, monkeypatch):
    """The generated code (inductor: C++ on the CPU, Triton on a GPU) against the eager rule: a truncation's
    losses and meta-gradient, one optimizee and a blocked population. About a minute of compilation per model."""
    torch._dynamo.reset()
    rule = rule_of(model)
    compiled = CompiledRule(rule)
    one = start(rule, mlp, torch.Generator().manual_seed(0))
    eager_loss, _, _ = meta_unroll(rule, mlp, one, 5, torch.Generator().manual_seed(1))
    loss, _, _ = meta_unroll(compiled, mlp, one, 5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads_of(rule, loss), grads_of(rule, eager_loss), rtol=1e-4, atol=1e-7)
    monkeypatch.setattr(unroll, "POPULATION_BLOCK", 1000)
    traj = start_population(rule, mlp, gens(3))[0]
    eager_losses, _, _ = population_meta_unroll(rule, mlp, traj, 4, gens(3))
    losses, _, _ = population_meta_unroll(compiled, mlp, traj, 4, gens(3))
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads_of(rule, losses.mean()), grads_of(rule, eager_losses.mean()), rtol=1e-4,
                               atol=1e-7)


# ------------------------------------------------------------------------------ the optimizer's backend="compile"
def optimizer_pair(cls, name: str, shapes, **kwargs):
    torch.manual_seed(1)
    params = [torch.randn(*s) for s in shapes]
    made = []
    for backend in ("torch", "compile"):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        made.append((ps, cls(ps, rule=rule_of(name), backend=backend, **kwargs)))
    return made


def step_both(pairs, steps: int, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen) * 1e-2 for p in pairs[0][0]]
        for ps, opt in pairs:
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()


@pytest.mark.parametrize("cls,name", [(learned_optim.L2ODM, "dm"), (learned_optim.RNNprop, "rnnprop")])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_compile_backend_steps_like_the_torch_backend(cls, name, state_dtype, monkeypatch):
    """Odd sizes, several tensors packed into chunks and tensors cut across chunks (chunk_size 64), bf16 state; the
    state layout is the torch path's, so a state_dict moves between the two backends."""
    torch._dynamo.reset()
    monkeypatch.setattr(learned_optim.optimizer, "COMPILE_BACKEND", "aot_eager")
    shapes = [(37, 11), (5,), (300,), (1,)]
    pairs = optimizer_pair(cls, name, shapes, chunk_size=64, state_dtype=state_dtype)
    step_both(pairs, 12)
    (ref, ref_opt), (got, opt) = pairs
    tol = dict(rtol=1e-5, atol=1e-7) if state_dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, **tol)
    for a, b in zip(ref, got):
        for key, value in ref_opt.state[a].items():
            assert opt.state[b][key].dtype == value.dtype and opt.state[b][key].shape == value.shape
    # the compile backend's state resumes on the torch backend and the other way round
    swapped = [(got, cls(got, rule=rule_of(name), backend="torch", chunk_size=64, state_dtype=state_dtype)),
               (ref, cls(ref, rule=rule_of(name), backend="compile", chunk_size=64, state_dtype=state_dtype))]
    swapped[0][1].load_state_dict(opt.state_dict())
    swapped[1][1].load_state_dict(ref_opt.state_dict())
    step_both(swapped, 3, seed=3)
    for a, b in zip(swapped[1][0], swapped[0][0]):
        torch.testing.assert_close(b, a, **tol)


def test_compile_backend_is_checked_and_survives_a_deepcopy(monkeypatch):
    import copy

    monkeypatch.setattr(learned_optim.optimizer, "COMPILE_BACKEND", "aot_eager")
    with pytest.raises(ValueError, match="coordinate-wise"):
        learned_optim.L2OScale([torch.nn.Parameter(torch.zeros(3))], rule=rule_of("scale"), backend="compile")
    p = torch.nn.Parameter(torch.ones(10))
    opt = learned_optim.RNNprop([p], rule=rule_of("rnnprop"), backend="compile")
    p.grad = torch.full_like(p, 0.1)
    opt.step()
    twin = copy.deepcopy(opt)
    assert twin.backend == "compile" and twin._compiled == {}
    twin.step()  # compiles its own copy of the rule


@pytest.mark.slow
@pytest.mark.parametrize("cls,name", [(learned_optim.L2ODM, "dm"), (learned_optim.RNNprop, "rnnprop")])
def test_inductor_compile_backend_steps_like_the_torch_backend(cls, name):
    torch._dynamo.reset()
    pairs = optimizer_pair(cls, name, [(37, 11), (5,), (300,), (1,)], chunk_size=64)
    step_both(pairs, 100)
    for a, b in zip(pairs[0][0], pairs[1][0]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def failing_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler found")


def test_a_failed_compilation_is_one_clear_error_and_changes_nothing(tmp_path, small_root, monkeypatch,  # noqa: F811
                                                                     capsys):
    torch._dynamo.reset()
    monkeypatch.setattr(learned_optim.optimizer, "COMPILE_BACKEND", failing_backend)
    p = torch.nn.Parameter(torch.ones(10))
    opt = learned_optim.L2ODM([p], rule=rule_of("dm"), backend="compile")
    p.grad = torch.full_like(p, 0.1)
    with pytest.raises(RuntimeError, match=r"torch.compile failed \(RuntimeError: no C\+\+ compiler found\); nothing "
                                           r"was updated. Use backend='torch'"):
        opt.step()
    assert torch.equal(p, torch.ones(10)) and int(opt.state[p]["step"]) == 0
    opt.backend = "torch"
    opt.step()  # the same optimizer steps on the torch path from where it was
    assert int(opt.state[p]["step"]) == 1 and not torch.equal(p, torch.ones(10))
    monkeypatch.setattr(trainer_module, "CompiledRule", functools.partial(CompiledRule, backend=failing_backend))
    code = run_main(["--model", "dm", "--compile", "--horizons", "20", "--epochs", "1", "--no-progress",
                     "--out", str(tmp_path / "run")], small_root)
    err = capsys.readouterr().err
    assert code != 0 and "--compile: torch.compile of the 'dm' rule failed" in err and "Traceback" not in err
