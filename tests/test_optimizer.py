"""torch.optim conformance for the learned optimizers, adapted from torch's test_optim.py
(TestOptimRenewed): right direction, param groups, no-grad no-op, lockstep state_dict
determinism, weights_only round trip, deepcopy, printing, error messages, dtypes, complex,
NaN/Inf policy, chunking, torch.compile."""
from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import learned_optim
from helpers import imitation_trained_rule

CLASSES = {"dm": learned_optim.L2ODM, "rnnprop": learned_optim.RNNprop, "scale": learned_optim.L2OScale}
NAMES = sorted(CLASSES)


def make(name: str, params, trained: bool = True, **kwargs):
    rule = copy.deepcopy(imitation_trained_rule(name)) if trained else None
    return CLASSES[name](params, rule, **kwargs)


def quadratic_problem(contiguous: bool = True, dtype=torch.float32):
    torch.manual_seed(1)
    weight = torch.randn(10, 5, dtype=dtype)
    if not contiguous:
        weight = torch.randn(5, 10, dtype=dtype).t()
    weight.requires_grad_(True)
    bias = torch.randn(10, dtype=dtype, requires_grad=True)
    x = torch.randn(5, dtype=dtype)

    def loss_fn():
        return ((weight @ x + bias) ** 2).sum()

    return [weight, bias], loss_fn


def run_steps(opt, loss_fn, n):
    for _ in range(n):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    return loss_fn().item()


# ------------------------------------------------------------------------------ direction
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_goes_right_direction(name, contiguous):
    params, loss_fn = quadratic_problem(contiguous)
    initial = loss_fn().item()
    opt = make(name, params)
    assert run_steps(opt, loss_fn, 20) < initial


@pytest.mark.parametrize("name", NAMES)
def test_maximize_goes_the_other_way(name):
    params, loss_fn = quadratic_problem()
    initial = loss_fn().item()
    opt = make(name, params, maximize=True)
    assert run_steps(opt, loss_fn, 20) > initial


@pytest.mark.parametrize("name", NAMES)
def test_maximize_equals_minimizing_the_negation(name):
    p1, f1 = quadratic_problem()
    p2, _ = quadratic_problem()
    o1 = make(name, p1, maximize=True)
    o2 = make(name, p2)
    for _ in range(5):
        o1.zero_grad()
        f1().backward()
        for a, c in zip(p1, p2):  # minimise -f from the same point: the same trajectory
            c.grad = -a.grad.clone()
        o1.step()
        o2.step()
    for a, c in zip(p1, p2):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_works_with_lr_scheduler(name):
    params, loss_fn = quadratic_problem()
    initial = loss_fn().item()
    opt = make(name, params)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    for _ in range(20):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        sched.step()
    assert loss_fn().item() < initial
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0625)


@pytest.mark.parametrize("name", NAMES)
def test_lr_scales_the_update(name):
    deltas = []
    for lr in (1.0, 0.25):
        params, loss_fn = quadratic_problem()
        before = [p.detach().clone() for p in params]
        opt = make(name, params, lr=lr)
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        deltas.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)]))
    torch.testing.assert_close(deltas[1], deltas[0] * 0.25)


@pytest.mark.parametrize("name", NAMES)
def test_closure_returns_the_loss(name):
    params, loss_fn = quadratic_problem()
    opt = make(name, params)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0


# ------------------------------------------------------------------------------ param groups / no-ops
@pytest.mark.parametrize("name", NAMES)
def test_param_group_with_tiny_lr_does_not_move(name):
    params, loss_fn = quadratic_problem()
    weight, bias = params
    opt = make(name, [{"params": [weight]}, {"params": [bias], "lr": 1e-28}])
    bias_before = bias.detach().clone()
    weight_before = weight.detach().clone()
    run_steps(opt, loss_fn, 5)
    assert torch.equal(bias, bias_before)
    assert not torch.equal(weight, weight_before)


@pytest.mark.parametrize("name", NAMES)
def test_step_is_noop_when_params_have_no_grad(name):
    params, _ = quadratic_problem()
    before = [p.detach().clone() for p in params]
    opt = make(name, params)
    opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    assert len(opt.state) == 0


@pytest.mark.parametrize("name", NAMES)
def test_params_without_grad_are_skipped(name):
    params, loss_fn = quadratic_problem()
    frozen = torch.randn(3, requires_grad=True)
    frozen_before = frozen.detach().clone()
    opt = make(name, params + [frozen])
    run_steps(opt, loss_fn, 3)
    assert torch.equal(frozen, frozen_before)
    assert frozen not in opt.state or "step" not in opt.state[frozen] or opt.state[frozen]["step"] == 0


def test_empty_and_bad_params_follow_torch():
    with pytest.raises(ValueError, match="empty parameter list"):
        learned_optim.L2ODM([])
    with pytest.raises(TypeError, match="iterable of Tensors"):
        learned_optim.L2ODM(torch.zeros(3, requires_grad=True))


# ------------------------------------------------------------------------------ state_dict
def _prime(name, dtype=torch.float32, n=10, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)).to(dtype)
    x, y = torch.randn(16, 6, dtype=dtype), torch.randn(16, 1, dtype=dtype)
    opt = make(name, model.parameters(), **kwargs)

    def loss_fn(m=model):
        return ((m(x) - y) ** 2).mean()

    for _ in range(n):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    return model, opt, loss_fn, (x, y)


def _lockstep(name, model, opt, loss_fn, data, reload):
    clone = copy.deepcopy(model)
    opt2 = make(name, clone.parameters(), state_dtype=opt.state_dtype)
    opt2.load_state_dict(reload(opt.state_dict()))
    x, y = data
    for _ in range(10):
        for m, o in ((model, opt), (clone, opt2)):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for pid in s1["state"]:
        for key, value in s1["state"][pid].items():
            assert torch.equal(value, s2["state"][pid][key]), key
            assert s2["state"][pid][key].dtype == value.dtype
    assert s1["param_groups"] == s2["param_groups"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_deterministic_lockstep(name, dtype):
    model, opt, loss_fn, data = _prime(name, dtype)
    _lockstep(name, model, opt, loss_fn, data, copy.deepcopy)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_without_copy_does_not_alias(name):
    model, opt, loss_fn, data = _prime(name)
    _lockstep(name, model, opt, loss_fn, data, lambda sd: sd)  # loading the live dict must not share tensors


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_with_weights_only(name, dtype):
    model, opt, loss_fn, data = _prime(name, dtype)

    def through_disk(sd):
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)

    _lockstep(name, model, opt, loss_fn, data, through_disk)


@pytest.mark.parametrize("name", NAMES)
def test_recurrent_state_stays_float32_for_low_precision_params(name):
    model, opt, _, _ = _prime(name, torch.bfloat16)
    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(sd)  # torch would cast state to bf16 here; we keep float32
    for state in opt.state.values():
        for key, value in state.items():
            assert value.dtype == torch.float32, key


@pytest.mark.parametrize("name", NAMES)
def test_bf16_state_dtype_option(name):
    model, opt, loss_fn, _ = _prime(name, state_dtype=torch.bfloat16)
    for state in opt.state.values():
        for key, value in state.items():
            if key != "step":
                assert value.dtype == torch.bfloat16
    assert math.isfinite(loss_fn().item())


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy(name):
    model, opt, loss_fn, _ = _prime(name)
    twin = copy.deepcopy(opt)
    public = lambda o: {k for k in vars(o) if not k.startswith("_")}  # noqa: E731
    assert public(twin) == public(opt)
    assert twin.rule is not opt.rule
    assert all(torch.equal(a, b) for a, b in zip(twin.rule.state_dict().values(), opt.rule.state_dict().values()))
    for p, q in zip(opt.param_groups[0]["params"], twin.param_groups[0]["params"]):
        assert p is not q and torch.equal(p, q)
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], twin.state[q][key])
            assert opt.state[p][key].data_ptr() != twin.state[q][key].data_ptr()


@pytest.mark.parametrize("name", NAMES)
def test_can_be_printed(name):
    params, _ = quadratic_problem()
    text = repr(make(name, params))
    assert CLASSES[name].__name__ in text and f"Rule: {name}" in text and "lr: 1.0" in text


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kwargs, regex", [
    ({"lr": -1.0}, "Invalid learning rate: -1.0"),
    ({"lr": float("nan")}, "Invalid learning rate"),
    ({"lr": torch.tensor(0.1)}, "Invalid learning rate: lr as a Tensor"),
    ({"chunk_size": 0}, "Invalid chunk_size"),
    ({"state_dtype": torch.int32}, "Invalid state_dtype"),
    ({"nonfinite": "ignore"}, "Invalid nonfinite policy"),
])
def test_invalid_hyperparameters(name, kwargs, regex):
    params, _ = quadratic_problem()
    with pytest.raises(ValueError, match=regex):
        CLASSES[name](params, **kwargs)


def test_rule_of_the_wrong_kind_is_refused():
    params, _ = quadratic_problem()
    with pytest.raises(ValueError, match="runs 'dm' rules"):
        learned_optim.L2ODM(params, learned_optim.build_rule("rnnprop"))
    with pytest.raises(ValueError, match="either rule or weights"):
        learned_optim.L2ODM(params, learned_optim.build_rule("dm"), weights="dm")


def test_unknown_weights_name_lists_known_ones():
    params, _ = quadratic_problem()
    with pytest.raises(learned_optim.WeightsError, match="known:"):
        learned_optim.L2ODM(params, weights="no-such-weights")


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradients_are_refused(name):
    emb = nn.Embedding(10, 3, sparse=True)
    opt = make(name, emb.parameters(), trained=False)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


@pytest.mark.parametrize("name", NAMES)
def test_complex_params_match_their_real_view(name):
    torch.manual_seed(0)
    z = torch.randn(4, 3, dtype=torch.complex64, requires_grad=True)
    r = torch.view_as_real(z.detach()).clone().requires_grad_(True)
    oz, orr = make(name, [z]), make(name, [r])
    target = torch.randn(4, 3, dtype=torch.complex64)
    for _ in range(5):
        oz.zero_grad()
        orr.zero_grad()
        (z - target).abs().pow(2).sum().backward()
        (r - torch.view_as_real(target)).pow(2).sum().backward()
        oz.step()
        orr.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach())


# ------------------------------------------------------------------------------ NaN / Inf
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_tensor_and_keeps_state(name, bad):
    model, opt, loss_fn, _ = _prime(name, n=3)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    loss_fn().backward()
    params[0].grad[0, 0] = bad
    with pytest.warns(RuntimeWarning, match="non-finite gradient") as record:
        opt.step()
    assert [w.filename for w in record if "non-finite" in str(w.message)] == [__file__]  # the caller's line
    assert torch.equal(params[0], before[0])
    assert not torch.equal(params[1], before[1])
    after = opt.state_dict()
    for key, value in state_before["state"][0].items():
        if not key.startswith("group_"):  # group-level state is updated by the healthy tensors
            assert torch.equal(value, after["state"][0][key]), key


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_gradient_raise_policy_changes_nothing(name):
    model, opt, loss_fn, _ = _prime(name, n=3, nonfinite="raise")
    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    loss_fn().backward()
    list(model.parameters())[2].grad.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    for pid, state in state_before["state"].items():
        for key, value in state.items():
            assert torch.equal(value, opt.state_dict()["state"][pid][key])


# ------------------------------------------------------------------------------ chunking
@pytest.mark.parametrize("name", ["dm", "rnnprop"])
def test_chunking_does_not_change_the_result(name):
    results = []
    for chunk in (1 << 16, 7, 1):
        model, opt, _, _ = _prime(name, chunk_size=chunk, n=4)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[2], results[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_params_match_a_contiguous_copy(name, layout):
    """Permuted (dense) parameters are updated in place in memory order; parameters with gaps through
    one buffer: either way the result is that of the same values stored contiguously."""
    torch.manual_seed(0)
    base = torch.randn(12, 8) if layout == "transposed" else torch.randn(12, 16)
    weird = (base.t() if layout == "transposed" else base[:, ::2]).requires_grad_(True)
    plain = weird.detach().contiguous().requires_grad_(True)
    assert not weird.is_contiguous() and plain.is_contiguous()
    gaps = base[:, 1::2].clone()
    o1, o2 = make(name, [weird], chunk_size=13), make(name, [plain], chunk_size=13)
    target = torch.randn(weird.shape)
    initial = ((weird.detach() - target) ** 2).sum()
    for _ in range(4):
        o1.zero_grad()
        o2.zero_grad()
        ((weird - target) ** 2).sum().backward()
        ((plain - target) ** 2).sum().backward()
        o1.step()
        o2.step()
    if name == "scale" and layout == "transposed":
        # L2O-Scale draws each coordinate's initial log-lr at random, in the order coordinates are visited
        # (memory order here): same distribution, other draws. It must still optimise as well.
        assert ((weird.detach() - target) ** 2).sum() < initial
    else:
        torch.testing.assert_close(weird.detach(), plain.detach(), rtol=1e-5, atol=1e-6)
    if layout == "strided":
        assert torch.equal(base[:, 1::2], gaps)  # the storage between the parameter's elements is untouched


@pytest.mark.parametrize("name", NAMES)
def test_zero_size_and_many_small_tensors(name):
    torch.manual_seed(0)
    params = [torch.randn(3, requires_grad=True) for _ in range(40)] + [torch.zeros(0, requires_grad=True)]
    opt = make(name, params, chunk_size=16)
    loss_fn = lambda: sum((p ** 2).sum() for p in params)  # noqa: E731
    initial = loss_fn().item()
    assert run_steps(opt, loss_fn, 10) < initial


# ------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("name", NAMES)
def test_compiled_training_step(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1))
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    opt = make(name, model.parameters())

    @torch.compile(backend="aot_eager")
    def loss_and_backward():
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    @torch.compile(backend="eager")
    def step():
        opt.step()

    first = None
    for _ in range(10):
        opt.zero_grad()
        loss = loss_and_backward()
        step()
        first = loss.item() if first is None else first
    assert ((model(x) - y) ** 2).mean().item() < first


@pytest.mark.parametrize("name", ["dm", "scale"])
def test_compiling_a_whole_training_step_leaves_step_eager(name):
    """torch.compile of a function that also calls opt.step(): dynamo runs the step eagerly (it is
    ``torch.compiler.disable``d) instead of tracing its host-side work anew at every step, and the losses are
    the eager loop's."""
    from torch._dynamo.utils import counters

    def run(compiled: bool) -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1))
        x, y = torch.randn(16, 6), torch.randn(16, 1)
        opt = make(name, model.parameters())

        def train_step():
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            return loss.detach()

        fn = torch.compile(train_step, backend="aot_eager") if compiled else train_step
        return [fn().item() for _ in range(6)]

    torch._dynamo.reset()
    counters.clear()
    compiled = run(True)
    graphs = counters["stats"]["unique_graphs"]
    assert compiled == pytest.approx(run(False), rel=1e-6, abs=1e-7)
    assert graphs <= 3, graphs  # the model's forward/backward around a graph break; the step traced: 12 or more


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_and_autocast_drive_the_optimizer(name):
    """Mixed precision as in torch.optim: GradScaler unscales the gradients before step() (the losses follow
    the unscaled loop's), and skips step() when its scaled gradients overflow (nothing changes)."""
    def run(scaled: bool) -> tuple[list[float], nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
        x, y = torch.randn(16, 6), torch.randn(16, 1)
        opt = make(name, model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=scaled)
        losses = []
        for _ in range(4):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=scaled):
                loss = ((model(x).float() - y) ** 2).mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
        return losses, model, opt

    scaled, model, opt = run(True)
    plain, _, _ = run(False)
    assert scaled == pytest.approx(plain, rel=0.05)  # bf16 autocast: close, not equal
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    scaler.scale((model(torch.randn(2, 6)) ** 2).mean()).backward()
    next(model.parameters()).grad[0, 0] = float("inf")  # as an overflow of the scaled gradients leaves it
    scaler.step(opt)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, opt.state_dict()["state"][pid][key]), key


# ------------------------------------------------------------------------------ property tests
shapes = st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=shapes, dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       groups=st.integers(1, 3), name=st.sampled_from(NAMES), chunk=st.integers(1, 40))
def test_property_any_shapes_dtypes_groups(shapes, dtype, groups, name, chunk):
    torch.manual_seed(0)
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    split = [params[i::groups] for i in range(groups)]
    opt = make(name, [{"params": g} for g in split if g] or params, chunk_size=chunk)
    for _ in range(2):
        opt.zero_grad()
        sum((p.float() ** 2).sum() for p in params).backward()
        opt.step()
    for p in params:
        assert p.dtype == dtype and torch.isfinite(p.float()).all()
        state = opt.state[p]
        assert state["step"] == 2
        for key, value in state.items():
            if key != "step":
                assert value.dtype == torch.float32
                if key in ("rnn", "mv", "coord"):
                    assert value.shape[-1] == p.numel()
