"""L2O-Scale in bounded chunks: the optimizer runs the rule's stages (per-coordinate stage chunk by chunk,
then the per-tensor and global RNNs on the accumulated sums) and gets what the whole-group forward gets."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import helpers  # noqa: F401  (single-threaded tests)
import learned_optim

REPO = Path(__file__).resolve().parent.parent
SHAPES = [(7, 13), (13,), (1,), (50, 3), (257,), (3, 5, 7), (1000,)]  # odd sizes, one single coordinate


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return [torch.randn(s, generator=gen) * 0.1 * (i + 1) for i, s in enumerate(SHAPES)]


def _optimizer_run(rule, chunk_size: int, steps: int):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = learned_optim.L2OScale(params, rule, chunk_size=chunk_size)
    for step in range(1, steps + 1):
        for p, g in zip(params, _grads(step)):
            p.grad = g
        opt.step()
    return params, opt


@pytest.fixture(scope="module")
def rule():
    return learned_optim.load_rule(learned_optim.resolve_weights("scale"))


def test_one_chunk_is_the_rules_forward_bit_for_bit(rule):
    """chunk_size >= the group: one evaluation of the stages, exactly what ``rule(grad, state, step)`` gives
    (the meta-trainer's entry point)."""
    params, opt = _optimizer_run(rule, 1 << 20, 20)
    torch.manual_seed(0)
    theta = [torch.randn(s) for s in SHAPES]
    state = rule.init_state(SHAPES, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for step in range(1, 21):
            update, state = rule(torch.cat([g.flatten() for g in _grads(step)]), state, step)
            for t, u in zip(theta, update.split([math.prod(s) for s in SHAPES])):
                t.add_(u.view(t.shape))
    for p, t in zip(params, theta):
        assert torch.equal(p.detach(), t)
    coord = torch.cat([opt.state[p]["coord"] for p in params], dim=1)
    assert torch.equal(coord, state["coord"])
    assert torch.equal(opt.state[params[0]]["group_glob"], state["glob"])


@pytest.mark.parametrize("chunk_size, steps", [(1, 3), (7, 40), (64, 40), (300, 40)])
def test_chunked_step_equals_the_whole_group_over_many_steps(rule, chunk_size, steps):
    whole, whole_opt = _optimizer_run(rule, 1 << 20, steps)
    chunked, chunked_opt = _optimizer_run(rule, chunk_size, steps)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-7)
    for a, b in zip(whole, chunked):
        for key, value in whole_opt.state[a].items():
            torch.testing.assert_close(chunked_opt.state[b][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_init_state_select_keeps_the_whole_layouts_draw():
    rule = learned_optim.build_rule("scale")
    layout = [(4, 3), (5,), (2, 2)]
    full = rule.init_state(layout, generator=torch.Generator().manual_seed(3))
    keep = [torch.tensor([1, 5, 11]), None, torch.tensor([], dtype=torch.long)]
    part = rule.init_state(layout, generator=torch.Generator().manual_seed(3), select=keep)
    index = torch.cat([keep[0], torch.arange(12, 17)])
    assert torch.equal(part["coord"], full["coord"][:, index])
    assert torch.equal(part["tensor"], full["tensor"]) and torch.equal(part["glob"], full["glob"])
    with pytest.raises(ValueError, match="select has 2 entries for a layout of 3 tensors"):
        rule.init_state(layout, select=keep[:2])


def test_step_temporaries_are_bounded():
    """Beyond the state: one float per coordinate (the update awaiting its normaliser) plus one chunk's
    temporaries, far below the 16 bytes per parameter budget for a 300k-parameter group."""
    spec = importlib.util.spec_from_file_location("bench_step", REPO / "benchmarks" / "step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(600, 500), (501,), (7, 13)]]
    for p in params:
        p.grad = torch.randn_like(p) * 0.01
    opt = learned_optim.L2OScale(params, learned_optim.build_rule("scale"), chunk_size=2048)
    opt.step()  # the state exists before the measured step
    try:
        peak = bench.peak_temp_bytes(opt.step, torch.device("cpu"))
    except Exception as exc:  # the profiler's allocation events are a private API
        pytest.skip(f"allocation profile unavailable: {type(exc).__name__}: {exc}")
    n = sum(p.numel() for p in params)
    assert 4 * n < peak < 16 * n
