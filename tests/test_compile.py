"""``meta_train --compile``: the unrolls with the rule's forward through ``torch.compile`` compute what the eager rule
computes, compile once per shape (not per step), and the run resumes bit-identical with the flag. The default
suite uses torch.compile's ``aot_eager`` backend (the same graph capture and autograd split, no code generation);
the inductor backend, which generates the fused code, is checked in a ``slow`` test."""
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
from test_population import gens, run_main, small_root, tensors  # noqa: F401  (small_root: a fixture)


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
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main([*base, "--epochs", "3", "--out", str(straight)], small_root) == 0
    assert run_main([*base, "--epochs", "1", "--out", str(split)], small_root) == 0
    assert run_main([*base, "--epochs", "3", "--resume", "--out", str(split)], small_root) == 0
    assert (straight / "weights.safetensors").read_bytes() == (split / "weights.safetensors").read_bytes()
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
