"""The update-rule modules: maths against torch's own layers, differentiability, state layout."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import helpers  # noqa: F401  (single-threaded tests)
from learned_optim.rules import RULES, build_rule, log_and_sign, lstm_cell
from learned_optim.rules.scale import gru_cell


def test_lstm_cell_matches_nn_lstmcell():
    torch.manual_seed(0)
    cell = nn.LSTMCell(7, 5)
    x, h, c = torch.randn(11, 7), torch.randn(11, 5), torch.randn(11, 5)
    h_ref, c_ref = cell(x, (h, c))
    h_ours, c_ours = lstm_cell(x.t().contiguous(), h.t().contiguous(), c.t().contiguous(), cell)
    torch.testing.assert_close(h_ours.t(), h_ref)
    torch.testing.assert_close(c_ours.t(), c_ref)



def _aten_ops(fn) -> list[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record() as record:
        fn()
    return record.names


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_lstm_cell_takes_tanh_off_the_cpu(device):
    """The cell's tanh is the sigmoid form on the CPU (faster there) and torch.tanh elsewhere: on a GPU one
    element-wise kernel instead of four, forward and backward (shapes on the meta device stand for CUDA's)."""
    torch.manual_seed(0)
    cell = nn.LSTMCell(3, 4).to(device)
    x, h, c = (torch.randn(k, 6, device=device, requires_grad=True) for k in (3, 4, 4))

    def run():
        h_new, c_new = lstm_cell(x, h, c, cell)
        (h_new.sum() + c_new.sum()).backward()

    names = _aten_ops(run)
    if device == "cpu":
        assert "tanh" not in names and names.count("sigmoid") == 5
    else:
        assert names.count("tanh") == 2 and names.count("tanh_backward") == 2 and names.count("sigmoid") == 3
        assert "sub" not in names

def test_gru_cell_matches_nn_grucell():
    torch.manual_seed(0)
    cell = nn.GRUCell(6, 4)
    x, h = torch.randn(9, 6), torch.randn(9, 4)
    torch.testing.assert_close(gru_cell(x.t().contiguous(), h.t().contiguous(), cell).t(), cell(x, h))


def test_dm_initialisation_and_structure():
    rule = build_rule("dm")
    assert [type(m) for m in rule.cells] == [nn.LSTMCell, nn.LSTMCell]
    assert (rule.cells[0].input_size, rule.cells[0].hidden_size, rule.cells[1].input_size) == (2, 20, 20)
    for cell in rule.cells:  # forget-gate bias +1 (sonnet's forget_bias), the other biases 0
        torch.testing.assert_close(cell.bias_ih[20:40], torch.ones(20))
        assert cell.bias_ih[:20].abs().sum() == 0 and cell.bias_hh.abs().sum() == 0
    assert rule.output.in_features == 20 and rule.output_scale == 0.01
    assert rule.init_state([(3, 4), (5,)])["rnn"].shape == (80, 17)


def test_log_and_sign():
    g = torch.tensor([1.0, -1e-3, 0.0, 1e-8])
    out = log_and_sign(g, 5.0)
    torch.testing.assert_close(out[0], torch.clamp(torch.log(g.abs() + torch.finfo(torch.float32).eps) / 5, min=-1))
    torch.testing.assert_close(out[1], torch.clamp(g * math.exp(5), -1, 1))


def test_rnnprop_features_are_bias_corrected():
    rule = build_rule("rnnprop")
    g = torch.tensor([0.5, -2.0, 1e-3])
    x, mv = rule.features(g, torch.zeros(2, 3), 1)
    # step 1: m_hat = g, v_hat = g^2 -> both features are sign(g) (up to eps)
    torch.testing.assert_close(x, torch.sign(g).expand(2, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(mv[0], 0.05 * g)
    assert rule.input_projection.in_features == 2 and len(rule.cells) == 2


def test_scale_structure():
    rule = build_rule("scale")
    assert (rule.param_cell.hidden_size, rule.tensor_cell.hidden_size, rule.global_cell.hidden_size) == (10, 20, 20)
    assert rule.param_cell.input_size == 12
    state = rule.init_state([(3, 4), (5,)], generator=torch.Generator().manual_seed(0))
    assert state["coord"].shape == (21, 17) and state["tensor"].shape == (20, 2) and state["glob"].shape == (20, 1)
    log_lr = state["coord"][18]
    assert (log_lr >= math.log(1e-6) - 1e-5).all() and (log_lr <= math.log(1e-2) + 1e-5).all()


def _scale_offsets(lr_offset):
    """(per-coordinate part, offset) of the initial log-lr, recomputed from the generator's draw."""
    layout, n, t = [(3, 4), (5,), (2, 2)], 21, 3
    rule = build_rule("scale", {"lr_offset": lr_offset})
    log_lr = rule.init_state(layout, generator=torch.Generator().manual_seed(7))["coord"][18]
    lo, hi = math.log(1e-6) / 2, math.log(1e-2) / 2
    u = lo + (hi - lo) * torch.rand(n + (t if lr_offset == "tensor" else 1), generator=torch.Generator().manual_seed(7))
    return log_lr, u[:n], u[n:]


def test_scale_initial_log_lr_offset_per_tensor_as_the_original():
    log_lr, coord, offsets = _scale_offsets("tensor")
    assert offsets.shape == (3,) and len(set(offsets.tolist())) == 3
    torch.testing.assert_close(log_lr, coord + offsets.repeat_interleave(torch.tensor([12, 5, 4])), rtol=0, atol=0)
    assert build_rule("scale").lr_offset == "tensor"  # a fresh rule draws as the original does


def test_scale_shared_offset_keeps_the_draw_of_files_written_before_the_key():
    log_lr, coord, offset = _scale_offsets("shared")
    torch.testing.assert_close(log_lr, coord + offset, rtol=0, atol=0)  # one offset, bit-identical to before
    assert RULES["scale"].legacy_config == {"lr_offset": "shared"}
    with pytest.raises(ValueError, match="lr_offset"):
        build_rule("scale", {"lr_offset": "layer"})


@pytest.mark.parametrize("name", sorted(RULES))
def test_forward_is_pure_and_shapes_are_kept(name):
    torch.manual_seed(0)
    rule = build_rule(name)
    layout = [(4, 3), (6,)]
    state = rule.init_state(layout, generator=torch.Generator().manual_seed(0))
    saved = {k: v.clone() for k, v in state.items()}
    grad = torch.randn(18)
    update, new = rule(grad, state, 1)
    assert update.shape == (18,) and torch.isfinite(update).all()
    for key in state:
        assert torch.equal(state[key], saved[key])  # inputs are never mutated
        assert new[key].shape == state[key].shape


@pytest.mark.parametrize("name", sorted(RULES))
def test_forward_is_differentiable_with_respect_to_the_weights(name):
    """The meta-gradient reaches every weight through a short unroll (what meta_train relies on)."""
    torch.manual_seed(0)
    rule = build_rule(name).double()
    target = torch.randn(10, dtype=torch.float64)
    theta = torch.zeros(10, dtype=torch.float64)
    state = {k: (v.double() if v.is_floating_point() else v) for k, v in rule.init_state([(10,)]).items()}
    loss = 0.0
    for step in range(1, 4):
        grad = (theta - target).detach()  # first order, as in meta-training
        update, state = rule(grad, state, step)
        theta = theta + update
        loss = loss + ((theta - target) ** 2).sum()
    loss.backward()
    missing = [n for n, p in rule.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert sum(float(p.grad.abs().sum()) for p in rule.parameters()) > 0


@pytest.mark.parametrize("name", ["dm", "rnnprop"])
def test_gradcheck_of_the_update_with_respect_to_weights(name):
    torch.manual_seed(0)
    rule = build_rule(name).double()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in rule.named_parameters()}
    grad = torch.randn(5, dtype=torch.float64) * 0.1
    state = {k: torch.randn_like(v.double()) * 0.1 for k, v in rule.init_state([(5,)]).items()}
    if name == "rnnprop":
        state["mv"] = state["mv"].abs()
    names = list(params)

    def f(*values):
        update, new = functional_call(rule, dict(zip(names, values)), (grad, state, 2))
        return update, new["rnn"]

    # fast mode checks random directions v^T J u instead of every column: the same test of the backward pass
    assert torch.autograd.gradcheck(f, tuple(params.values()), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("name", ["dm", "rnnprop"])
def test_coordinatewise_rules_are_chunk_invariant(name):
    torch.manual_seed(0)
    rule = build_rule(name)
    state = {k: torch.randn_like(v) for k, v in rule.init_state([(50,)]).items()}
    if name == "rnnprop":
        state["mv"] = state["mv"].abs()
    grad = torch.randn(50)
    with torch.no_grad():
        full, full_state = rule(grad, state, 3)
        part, part_state = rule(grad[10:20], {k: v[:, 10:20] for k, v in state.items()}, 3)
    torch.testing.assert_close(part, full[10:20])
    for key in state:
        torch.testing.assert_close(part_state[key], full_state[key][:, 10:20])


def test_build_rule_errors():
    with pytest.raises(ValueError, match="Unknown rule 'nope'; known rules"):
        build_rule("nope")
    with pytest.raises(ValueError, match="Invalid beta parameter at index 0"):
        build_rule("rnnprop", {"beta1": 1.0})
    for name in RULES:  # config round trip
        rule = build_rule(name)
        assert build_rule(name, rule.config()).config() == rule.config()


def test_a_step_number_becomes_a_tensor_on_the_gradients_device_bit_for_bit():
    from learned_optim.rules.base import as_step

    like = torch.zeros(3, dtype=torch.float32)
    got = as_step(9999, like)
    assert got.shape == () and got.dtype == torch.float32 and float(got) == 9999.0
    assert torch.equal(as_step(torch.tensor([1, 2]), like), torch.tensor([1.0, 2.0]))
    for name in ("rnnprop", "scale"):  # an int step and the same step as a tensor (the optimizer's) agree exactly
        torch.manual_seed(0)
        rule = build_rule(name)
        state, grad = rule.init_state([(50,), (7, 3)]), torch.randn(71)
        for step in (1, 2, 9999):
            (u1, s1), (u2, s2) = rule(grad, state, step), rule(grad, state, torch.tensor(step))
            assert torch.equal(u1, u2) and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_scale_reads_the_layout_sizes_back_once_per_layout():
    rule = build_rule("scale")
    state = rule.init_state([(50,), (7, 3)])
    _, new = rule(torch.randn(71), state, 1)
    assert new["numels"] is state["numels"] and rule.host_sizes(new["numels"]) == [50, 21]
    assert rule.__dict__["_host_sizes"][0] is state["numels"]  # remembered for the tensor the unroll carries
    other = rule.init_state([(4,)])
    assert rule.host_sizes(other["numels"]) == [4]  # another layout: read again
