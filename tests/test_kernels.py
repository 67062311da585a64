"""The fused Triton step (learned_optim.kernels) against the torch path: same updates and states.

On the CPU the kernel runs through Triton's interpreter, which needs TRITON_INTERPRET=1 before
triton is imported: those cases run in one subprocess (this file with ``--worker``), on small sizes.
The same cases, and larger ones, run in-process on CUDA when a GPU is present (marker ``cuda``).
Backend selection and its error messages are checked in-process.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import learned_optim
from helpers import imitation_trained_rule, once_per_run
from learned_optim import kernels

REPO = Path(__file__).resolve().parent.parent
HAS_TRITON = kernels.triton_available()
HAS_CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")

FP32_TOL = 1e-5  # relative error of the fused step against the torch path, float32 state and parameters
# bfloat16 state: an fp32 difference of one ulp can round a state value to the neighbouring bf16 number
# (relative 2^-8), which then feeds the next steps; low-precision parameters: one ulp of the update
LOOSE_TOL = {"state_bfloat16": 1e-1, "param_bfloat16": 1e-2, "param_float16": 2e-3}
ULP_TOL = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}  # one unit in the last place, relative
# parameters after ``p += lr * update`` from the same p, relative to |p|: one rounding of the sum
PARAM_TOL = {"float32": 1e-6, "bfloat16": 1e-2, "float16": 1e-3}


# ---------------------------------------------------------------------------------------------- the cases
def case(name, rule, **kw):
    spec = {"name": name, "rule": rule, "config": {}, "shapes": [[37], [3, 5]], "steps": 10,
            "state_dtype": "float32", "param_dtype": "float32", "lr": 1.0, "maximize": False,
            "layouts": None, "late": {}, "groups": None, "nan_at": None, "block": None, "tol": FP32_TOL,
            "sync": False, "swap_at": None, "step_rows": None, "none_at": {}, "strided_at": None, "redict_at": None,
            "reload_at": None, "reverse_at": None, "lr_at": {}}
    spec.update(kw)
    return spec


def interpreter_cases() -> list[dict]:
    """Small enough for Triton's interpreter (about 20 ms per program of BLOCK coordinates)."""
    out = []
    for rule in ("dm", "rnnprop"):
        # 100 steps, odd sizes; RNNprop with per-tensor step counts (the second tensor has no gradient for 3 steps)
        if rule == "dm":
            out.append(case(f"{rule}-fp32-100", rule, steps=100, shapes=[[5, 9]]))
        else:
            out.append(case(f"{rule}-fp32-100", rule, steps=100, late={1: 3}))
        # low-precision state, free-running (rounding flips accumulate) and re-synchronised before every step
        # (then a state value differs by at most one unit in the last place of its dtype)
        out.append(case(f"{rule}-state-bfloat16", rule, steps=20, state_dtype="bfloat16", late={1: 3},
                        tol=LOOSE_TOL["state_bfloat16"]))
        for dtype in ("bfloat16", "float16"):
            out.append(case(f"{rule}-state-{dtype}-one-step", rule, steps=6, state_dtype=dtype, sync=True,
                            tol=ULP_TOL[dtype]))
        for dtype in ("bfloat16", "float16"):  # parameters and gradients: the update is rounded to them
            out.append(case(f"{rule}-param-{dtype}", rule, steps=6, param_dtype=dtype, tol=LOOSE_TOL[f"param_{dtype}"]))
        # many tensors, sizes around block boundaries (BLOCK 16), one launch
        sizes = [1, 15, 16, 17, 31, 33, 2, 64, 7, 3, 129, 40]
        # ... its step counters advanced by several programs (4 tensors each), one NaN tensor among them
        out.append(case(f"{rule}-many", rule, steps=2, shapes=[[s] for s in sizes], block=16, late={3: 1},
                        step_rows=4, nan_at=[1, 6]))
        out.append(case(f"{rule}-groups-lr-maximize", rule, steps=6, shapes=[[4, 6], [9], [2, 3]],
                        groups=[{"idx": [0, 2], "lr": 0.5, "maximize": True}, {"idx": [1], "lr": 2.0}]))
        out.append(case(f"{rule}-layouts", rule, steps=6, shapes=[[6, 5], [4, 10], [7], [3, 4], [5, 3]],
                        layouts=["transposed", "gapped", "complex", "grad_strided", "contiguous"]))
        out.append(case(f"{rule}-nonfinite", rule, steps=5, shapes=[[13], [6]], nan_at=[2, 0]))
        out.append(case(f"{rule}-state-float64-falls-back", rule, steps=4, state_dtype="float64"))
        # state tensors and parameter storage replaced between steps: the kernel's cached plan must notice
        out.append(case(f"{rule}-replaced-tensors", rule, steps=5, shapes=[[12], [2, 8]], swap_at=[2, 3]))
        # what the fast path of later steps relies on, changed between steps: a gradient gone and back, a strided
        # gradient for one step, every state dict replaced by a copy, the optimizer's state_dict loaded back,
        # the group's list reordered in place, a new lr (as a scheduler sets it)
        out.append(case(f"{rule}-fast-path-changes", rule, steps=12, shapes=[[12], [2, 8], [5]],
                        none_at={2: [1], 3: [0, 2]}, strided_at=[5, 1], redict_at=6, reload_at=8, reverse_at=10,
                        lr_at={9: 0.5}))
    # other configurations, freshly initialised (their updates cancel more: the torch path's own distance to
    # float64 is ~1e-5 there, so the bound is 1e-4)
    out.append(case("dm-small-1-layer", "dm", steps=8, config={"hidden_size": 8, "num_layers": 1}, tol=1e-4))
    out.append(case("rnnprop-wide-3-layers", "rnnprop", steps=8, config={"hidden_size": 36, "num_layers": 3},
                    tol=1e-4))
    out.append(case("rnnprop-betas-below-half", "rnnprop", steps=8, config={"beta1": 0.3, "beta2": 0.45}, tol=1e-4))
    return out


INTERPRETER_CASES = interpreter_cases()


# ---------------------------------------------------------------------------------------------- the runner
def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _make_param(shape, layout, gen, dtype, device):
    if layout == "complex":
        return torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.complex64).to(device))
    if layout == "transposed":  # dense, not contiguous: stepped in place in memory order
        data = torch.randn(list(reversed(shape)), generator=gen).to(device, dtype).t()
    elif layout == "gapped":  # a strided slice: stepped through one update buffer
        data = torch.randn(shape[0], 2 * shape[1], generator=gen).to(device, dtype)[:, ::2]
    else:
        data = torch.randn(shape, generator=gen).to(device, dtype)
    return torch.nn.Parameter(data)


def _grad(p, layout, gen, scale):
    """A gradient over several orders of magnitude (exercises LogAndSign's clipping), some exact zeros."""
    real = torch.view_as_real(p.detach()) if p.is_complex() else p.detach()
    g = torch.randn(real.shape, generator=gen) * torch.exp(torch.empty(real.shape).uniform_(-9, 2, generator=gen))
    g[torch.rand(real.shape, generator=gen) < 0.05] = 0.0
    g = g * scale
    if p.is_complex():
        return torch.view_as_complex(g.contiguous()).to(p.device)
    if layout == "grad_strided":  # a gradient with another memory layout than its parameter
        return g.t().contiguous().t().to(device=p.device, dtype=p.dtype)
    if layout == "transposed":  # autograd's gradient of a dense parameter has the parameter's strides
        return torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=p.device).copy_(g)
    return g.to(device=p.device, dtype=p.dtype)


def build(spec: dict, backend: str, device: str, nonfinite: str = "skip"):
    if spec["config"]:
        torch.manual_seed(0)
        rule = learned_optim.build_rule(spec["rule"], spec["config"])
    else:  # a (briefly) trained rule: a fresh L2O-DM's outputs nearly cancel, and then even the torch path is
        # only ~2e-5 away from float64 (a trained one: ~3e-7)
        rule = copy.deepcopy(imitation_trained_rule(spec["rule"], meta_steps=30))
    gen = torch.Generator().manual_seed(1)
    layouts = spec["layouts"] or ["contiguous"] * len(spec["shapes"])
    params = [_make_param(s, lay, gen, _dtype(spec["param_dtype"]), device) for s, lay in zip(spec["shapes"], layouts)]
    if spec["groups"]:
        groups = [{"params": [params[i] for i in g["idx"]], **{k: v for k, v in g.items() if k != "idx"}}
                  for g in spec["groups"]]
    else:
        groups = params
    opt = learned_optim.LearnedOptimizer(groups, rule.to(device), lr=spec["lr"], maximize=spec["maximize"],
                                         state_dtype=_dtype(spec["state_dtype"]), backend=backend,
                                         nonfinite=nonfinite)
    return params, layouts, opt


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(||a - b|| / ||b||, max|a - b| / max|b|): the relative error of ``a`` against ``b``, in the 2-norm and
    elementwise against the largest value."""
    a, b = (torch.view_as_real(t) if t.is_complex() else t for t in (a, b))
    a, b = a.detach().double().cpu().reshape(-1), b.detach().double().cpu().reshape(-1)
    d = a - b
    norm, top = b.norm().item(), b.abs().max().item()
    return (d.norm().item() / norm if norm > 0 else d.norm().item(),
            d.abs().max().item() / top if top > 0 else d.abs().max().item())


def run_pair(spec: dict, device: str) -> dict:
    """Step a torch-backend and a triton-backend optimizer on the same gradients; the worst relative error
    of any step's update, and of the final state, over all tensors."""
    saved_block = os.environ.pop("LEARNED_OPTIM_TRITON_BLOCK", None)
    if spec["block"]:
        os.environ["LEARNED_OPTIM_TRITON_BLOCK"] = str(spec["block"])
    from learned_optim.kernels import lstm

    saved_rows, saved_fast = lstm._STEP_ROWS, lstm.fast_step
    lstm._STEP_ROWS = spec["step_rows"] or saved_rows
    taken = []

    def counted(*args, **kwargs):  # how many group steps went through a recorded fast plan
        out = saved_fast(*args, **kwargs)
        taken.append(out is not None)
        return out

    lstm.fast_step = counted
    try:
        result = _run_pair(spec, device)
        result["fast_steps"], result["full_steps"] = sum(taken), len(taken) - sum(taken)
        return result
    finally:
        lstm._STEP_ROWS, lstm.fast_step = saved_rows, saved_fast
        os.environ.pop("LEARNED_OPTIM_TRITON_BLOCK", None)
        if saved_block is not None:
            os.environ["LEARNED_OPTIM_TRITON_BLOCK"] = saved_block


def _run_pair(spec: dict, device: str) -> dict:
    import warnings

    pa, layouts, oa = build(spec, "torch", device)
    pb, _, ob = build(spec, "triton", device)
    theta = [p.detach().clone() for p in pa]
    gen = torch.Generator().manual_seed(2)
    worst = {"update": 0.0, "param": 0.0, "state": 0.0, "update_max": 0.0, "param_max": 0.0, "state_max": 0.0}
    steps_equal = True
    for step in range(spec["steps"]):
        for i, (a, b, lay) in enumerate(zip(pa, pb, layouts)):
            if step < spec["late"].get(i, 0) or i in spec["none_at"].get(step, ()):
                a.grad = b.grad = None
                continue
            g = _grad(a, lay, gen, 0.1)
            if spec["nan_at"] is not None and spec["nan_at"] == [step, i]:
                g.view(-1)[0] = float("nan")
            a.grad, b.grad = g.clone(memory_format=torch.preserve_format), g.clone(memory_format=torch.preserve_format)
            if spec["strided_at"] == [step, i]:  # same values, every other element of a buffer twice the size
                b.grad = torch.zeros(2 * g.numel(), dtype=g.dtype, device=g.device)[::2].view(g.shape).copy_(g)
        for params, opt in ((pa, oa), (pb, ob)):
            if spec["redict_at"] == step:
                for p in params:
                    opt.state[p] = dict(opt.state[p])
            if spec["reload_at"] == step:
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            if spec["reverse_at"] == step:
                opt.param_groups[0]["params"].reverse()
            if step in spec["lr_at"]:
                for group in opt.param_groups:
                    group["lr"] = spec["lr_at"][step]
        if spec["swap_at"] and step in spec["swap_at"]:
            with torch.no_grad():
                for params, opt in ((pa, oa), (pb, ob)):
                    for p in params:
                        for key in opt.state[p]:
                            opt.state[p][key] = opt.state[p][key].clone()
                        p.data = p.data.clone()
        # even steps start from 0, so the parameter after the step is the update itself (lr * update rounded
        # once); odd steps from the initial parameters, checking the in-place addition at its own scale
        with torch.no_grad():
            for a, b, t in zip(pa, pb, theta):
                a.copy_(t if step % 2 else torch.zeros_like(t))
                b.copy_(t if step % 2 else torch.zeros_like(t))
                if spec["sync"] and a in oa.state:
                    for key, value in oa.state[a].items():
                        if key != "step":
                            ob.state[b][key].copy_(value)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the NaN case warns on both paths
            oa.step()
            ob.step()
        for a, b in zip(pa, pb):
            _worst(worst, "param" if step % 2 else "update", _rel(b.detach(), a.detach()))
            sa, sb = oa.state.get(a, {}), ob.state.get(b, {})
            assert sa.keys() == sb.keys(), (sa.keys(), sb.keys())
            for key in sa:
                if key == "step":
                    steps_equal &= float(sa[key]) == float(sb[key])
                else:
                    assert sa[key].dtype == sb[key].dtype and sa[key].shape == sb[key].shape, key
                    _worst(worst, "state", _rel(sb[key], sa[key]))
    return {**worst, "steps_equal": steps_equal}


def _worst(worst: dict, key: str, rel: tuple[float, float]) -> None:
    worst[key] = max(worst[key], rel[0])
    worst[f"{key}_max"] = max(worst[f"{key}_max"], rel[1])


def state_dict_round_trip(device: str) -> dict:
    """A state_dict saved from one backend loads into the other and the run continues as if uninterrupted."""
    out = {}
    for rule in ("dm", "rnnprop"):
        spec = case(f"{rule}-sd", rule, shapes=[[21], [4, 3]])
        ref, _, oref = build(spec, "torch", device)
        start = [p.detach().clone() for p in ref]
        gen = torch.Generator().manual_seed(5)
        grads = [[_grad(p, None, gen, 0.1) for p in ref] for _ in range(8)]

        def run(params, opt, steps):
            for gs in steps:
                for p, g in zip(params, gs):
                    p.grad = g.clone()
                opt.step()

        run(ref, oref, grads)
        worst = 0.0
        for first, second in (("triton", "torch"), ("torch", "triton")):
            p1, _, o1 = build(spec, first, device)
            run(p1, o1, grads[:4])
            saved = copy.deepcopy(o1.state_dict())
            p2, _, o2 = build(spec, second, device)
            with torch.no_grad():
                for a, b in zip(p2, p1):
                    a.copy_(b)
            o2.load_state_dict(saved)
            run(p2, o2, grads[4:])
            for a, b, s in zip(p2, ref, start):
                worst = max(worst, _rel(a.detach() - s, b.detach() - s)[0])
            for a, b in zip(p2, ref):
                for key in oref.state[b]:
                    if key != "step":
                        worst = max(worst, _rel(o2.state[a][key], oref.state[b][key])[0])
                    elif float(o2.state[a][key]) != float(oref.state[b][key]):
                        worst = float("inf")
        out[rule] = worst
    return out


def nonfinite_skip(device: str) -> dict:
    """NaN / Inf gradients on the fused path, checked on the device: each flagged tensor is skipped (parameter,
    state and step unchanged; one skipped at its very first step keeps its fresh state at step 0), the others
    match the torch path, and every skip is reported by a RuntimeWarning (on a GPU from a later step())."""
    import warnings

    out = {}
    for rule in ("dm", "rnnprop"):
        spec = case(f"{rule}-nf", rule, shapes=[[13], [6], [2, 5]])
        pa, _, oa = build(spec, "torch", device)
        pb, _, ob = build(spec, "triton", device)
        gen = torch.Generator().manual_seed(3)
        bad_at = {0: (1, float("nan")), 2: (0, float("inf")), 3: (2, -float("inf"))}  # step: (tensor, value)
        warned, worst, skipped_kept, first_kept = 0, 0.0, True, True
        for step in range(5):
            for i, (a, b) in enumerate(zip(pa, pb)):
                g = _grad(a, None, gen, 0.1)
                if bad_at.get(step, (None,))[0] == i:
                    g.view(-1)[3] = bad_at[step][1]
                a.grad, b.grad = g.clone(), g.clone()
            before = [(b.detach().clone(), {k: v.clone() for k, v in ob.state[b].items()}) if b in ob.state else None
                      for b in pb]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                oa.step()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ob.step()
                if device == "cuda":  # the count reaches the host behind the step; a later step() reports it
                    torch.cuda.synchronize()
                    ob._report_nonfinite()
            warned += sum("non-finite gradient" in str(w.message) for w in caught)
            for i, (a, b) in enumerate(zip(pa, pb)):
                if bad_at.get(step, (None,))[0] == i:
                    if before[i] is None:  # skipped at its first step: fresh state, step 0, parameter untouched
                        first_kept &= float(ob.state[b]["step"]) == 0.0 and all(
                            not v.any() for k, v in ob.state[b].items() if k != "step")
                    else:
                        skipped_kept &= torch.equal(b.detach(), before[i][0]) and all(
                            torch.equal(ob.state[b][k], v) for k, v in before[i][1].items())
                worst = max(worst, _rel(b.detach(), a.detach())[0])
                if a in oa.state:
                    for key, value in oa.state[a].items():
                        if key == "step":
                            worst = max(worst, abs(float(value) - float(ob.state[b][key])))
                        else:
                            worst = max(worst, _rel(ob.state[b][key], value)[0])
        out[rule] = {"worst": worst, "warned": warned, "expected_warnings": len(bad_at), "skipped_kept": skipped_kept,
                     "first_kept": first_kept}
    return out


def nonfinite_raise(device: str) -> dict:
    """nonfinite="raise" on the fused path: clean steps take the recorded plan; a NaN gradient raises
    FloatingPointError with every parameter, state tensor and step count unchanged."""
    out = {}
    for rule in ("dm", "rnnprop"):
        spec = case(f"{rule}-raise", rule, shapes=[[13], [2, 5]])
        pa, _, oa = build(spec, "torch", device)
        pb, _, ob = build(spec, "triton", device, nonfinite="raise")
        gen = torch.Generator().manual_seed(4)
        worst = 0.0
        for _ in range(4):
            for a, b in zip(pa, pb):
                a.grad = b.grad = _grad(a, None, gen, 0.1)
            oa.step()
            ob.step()
            worst = max([worst] + [_rel(b.detach(), a.detach())[0] for a, b in zip(pa, pb)])
        fast = any(k[0] == "fast" for k in ob._kernel_cache)
        before = [b.detach().clone() for b in pb]
        states = copy.deepcopy(ob.state_dict())
        pb[1].grad = _grad(pb[1], None, gen, 0.1)
        pb[1].grad.view(-1)[2] = float("nan")
        try:
            ob.step()
            raised = False
        except FloatingPointError:
            raised = True
        kept = all(torch.equal(b, x) for b, x in zip(pb, before)) and all(
            torch.equal(v, ob.state_dict()["state"][i][k]) for i, st in states["state"].items() for k, v in st.items())
        out[rule] = {"worst": worst, "fast_plan": fast, "raised": raised, "kept": kept}
    return out


# ------------------------------------------------------------------------------ the LSTM cell kernels (meta-training)
def _plain_cell(gates, c):
    """The cell's element-wise maths as torch ops: the reference for kernels.cell (the rule's own tanh form)."""
    from learned_optim.rules.base import fast_tanh

    i, f, g, o = gates.chunk(4, dim=0)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * fast_tanh(g)
    return torch.sigmoid(o) * fast_tanh(c_new), c_new


def cell_against_autograd(device: str) -> dict:
    """kernels.cell's forward and backward against torch's autograd of the plain maths: odd sizes, a cell state
    with a row stride (a column slice of the state, as the optimizer's chunks and the CPU population blocks give),
    absent output gradients, and a cell state that needs no gradient. Worst relative errors per case."""
    from learned_optim.kernels import cell

    gen = torch.Generator().manual_seed(5)
    out = {}
    for hidden, n, strided, grads in ((3, 37, False, "both"), (20, 1500, True, "both"), (20, 1100, False, "dh"),
                                      (5, 2049, True, "dc"), (4, 64, False, "no-dc-input")):
        gates = (torch.randn(4 * hidden, n, generator=gen) * 3).to(device)
        wide = (torch.randn(hidden, 2 * n if strided else n, generator=gen) * 2).to(device)
        c = wide[:, :n]
        dh = torch.randn(hidden, n, generator=gen).to(device)
        dc = torch.randn(hidden, n, generator=gen).to(device)
        want_c = grads != "no-dc-input"
        a_g, a_c = gates.clone().requires_grad_(True), c.clone().requires_grad_(want_c)
        h_ref, c_ref = _plain_cell(a_g, a_c)
        outs = [t for t, use in ((h_ref, grads != "dc"), (c_ref, grads != "dh")) if use]
        gouts = [t for t, use in ((dh, grads != "dc"), (dc, grads != "dh")) if use]
        torch.autograd.backward(outs, gouts)
        b_g, b_c = gates.clone().requires_grad_(True), c.detach().requires_grad_(want_c)  # keeps the stride
        h_k, c_k = cell.FusedCell.apply(b_g, b_c)
        outs = [t for t, use in ((h_k, grads != "dc"), (c_k, grads != "dh")) if use]
        torch.autograd.backward(outs, gouts)
        errs = {"h": _rel(h_k, h_ref), "c": _rel(c_k, c_ref), "d_gates": _rel(b_g.grad, a_g.grad)}
        if want_c:
            errs["d_c"] = _rel(b_c.grad, a_c.grad)
        else:
            errs["d_c_none"] = (0.0, 0.0) if b_c.grad is None else (1.0, 1.0)
        out[f"H{hidden}-n{n}{'-strided' if strided else ''}-{grads}"] = {k: max(v) for k, v in errs.items()}
    return out


def cell_in_an_unroll(device: str) -> dict:
    """A meta-training truncation (one optimizee, and a population of 3) of L2O-DM and RNNprop with the cell
    kernels and with the plain maths: the worst relative error of the per-step losses, the meta-loss and the
    meta-gradient (every weight of the rule). Under the interpreter (slow) L2O-DM alone and RNNprop in a
    population."""
    from helpers import synthetic_images
    from meta_train.tasks import Task

    from learned_optim.kernels import cell

    images, labels = synthetic_images(256, 1, 8, 0)
    data = (torch.from_numpy(images).float().div(255), torch.from_numpy(labels).long())
    task = Task("mlp-orig", train=True, data=data, device=device)
    out = {}
    forward, backward, launches = cell.cell_forward, cell.cell_backward, []
    cell.cell_forward = lambda *a: launches.append("forward") or forward(*a)  # counts the kernels' launches
    cell.cell_backward = lambda *a, **kw: launches.append("backward") or backward(*a, **kw)
    try:
        _cell_unrolls(device, task, out, launches)
    finally:
        cell.cell_forward, cell.cell_backward = forward, backward
    return out


def _cell_unrolls(device: str, task, out: dict, launches: list) -> None:
    from meta_train.unroll import meta_unroll, population_meta_unroll, start, start_population

    for name, populations in (("dm", (1,)), ("rnnprop", (3,))) if device == "cpu" else (("dm", (1, 3)),
                                                                                      ("rnnprop", (1, 3))):
        rule = copy.deepcopy(imitation_trained_rule(name, meta_steps=30)).to(device).requires_grad_(True)
        for k in populations:
            runs, counts = [], []
            for mode in ("off", "on" if device == "cpu" else "auto"):
                rule.zero_grad(set_to_none=True)
                launches.clear()
                with kernels.cell_kernel(mode):
                    if k == 1:
                        gen = torch.Generator().manual_seed(0)
                        traj = start(rule, task, gen)
                        loss, _, values = meta_unroll(rule, task, traj, 5, gen)
                        values = torch.tensor(values)
                    else:
                        gens = [torch.Generator().manual_seed(j) for j in range(k)]
                        traj = start_population(rule, task, gens)[0]
                        losses, _, values = population_meta_unroll(rule, task, traj, 5, gens)
                        loss, values = losses.mean(), torch.as_tensor(values).cpu()
                    loss.backward()
                grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                  for p in rule.parameters()])
                runs.append((loss.detach(), values, grad))
                counts.append((launches.count("forward"), launches.count("backward")))
            (la, va, ga), (lb, vb, gb) = runs
            out[f"{name}-K{k}"] = {"loss": max(_rel(lb, la)), "values": max(_rel(vb, va)),
                                   "meta_grad": max(_rel(gb, ga)), "meta_grad_norm": ga.norm().item(),
                                   "launches_plain": counts[0], "launches_fused": counts[1]}


def check_cell(result: dict, tol: float) -> None:
    assert "error" not in result, result.get("error")
    for case, errs in result.items():
        if "launches_fused" in errs:  # 5 steps x 2 layers, forward and backward: the kernels did run, and only there
            assert list(errs["launches_plain"]) == [0, 0] and list(errs["launches_fused"]) == [10, 10], (case, errs)
            assert errs["meta_grad_norm"] > 0, (case, errs)
        for key, err in errs.items():
            if not key.startswith(("meta_grad_norm", "launches")):
                assert err <= tol, (case, key, err)


def worker() -> None:
    """Entry point of the interpreter subprocess: every case, as one JSON line on stdout."""
    assert kernels.interpreter_enabled()
    torch.set_num_threads(1)
    results = {}
    for spec in INTERPRETER_CASES:
        try:
            start = time.perf_counter()
            results[spec["name"]] = run_pair(spec, "cpu")
            results[spec["name"]]["seconds"] = time.perf_counter() - start
        except Exception as exc:  # reported per case by the tests
            results[spec["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        results["nonfinite-raise"] = nonfinite_raise("cpu")
    except Exception as exc:
        results["nonfinite-raise"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        results["nonfinite-skip"] = nonfinite_skip("cpu")
    except Exception as exc:
        results["nonfinite-skip"] = {"error": f"{type(exc).__name__}: {exc}"}
    for key, fn in (("state-dict-round-trip", state_dict_round_trip), ("cell-autograd", cell_against_autograd),
                    ("cell-unroll", cell_in_an_unroll)):
        try:
            start = time.perf_counter()
            results[key] = fn("cpu")
            print(f"{key}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        except Exception as exc:
            results[key] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(results))


def check(spec: dict, result: dict) -> None:
    assert "error" not in result, result.get("error")
    assert result["steps_equal"], result
    if spec["name"].endswith("-fast-path-changes"):  # the changes send some steps back to the full path
        assert result["fast_steps"] >= 2 and result["full_steps"] >= 5, result
    elif spec["steps"] >= 20 and spec["state_dtype"] != "float64":  # later steps take the group's fast plan
        assert result["fast_steps"] >= spec["steps"] - 5, result
    if spec["sync"] or spec["state_dtype"] in ("float32", "float64"):  # the same update from the same parameter
        assert result["param"] <= PARAM_TOL[spec["param_dtype"]], result
    if spec["sync"]:  # same state in: the update agrees to float32 precision, the stored state to one ulp
        assert result["update_max"] <= FP32_TOL and result["state_max"] <= spec["tol"], result
        return
    assert result["update"] <= spec["tol"] and result["state"] <= spec["tol"], result
    if spec["state_dtype"] in ("float32", "float64") and spec["param_dtype"] == "float32":
        assert result["update_max"] <= spec["tol"] and result["state_max"] <= spec["tol"], result


# ---------------------------------------------------------------------------------------------- CPU: interpreter
@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")

    def build(folder: Path) -> None:  # ~25 s: once per test run, whichever xdist worker gets here first
        env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
            [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
        env.pop("LEARNED_OPTIM_TRITON_BLOCK", None)
        proc = subprocess.run([sys.executable, __file__, "--worker"], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        (folder / "results.json").write_text(proc.stdout.strip().splitlines()[-1])

    return json.loads((once_per_run(tmp_path_factory, "interpreter", build) / "results.json").read_text())


@pytest.mark.parametrize("spec", INTERPRETER_CASES, ids=lambda s: s["name"])
def test_interpreted_kernel_matches_torch_path(interpreted, spec):
    check(spec, interpreted[spec["name"]])


def test_interpreted_state_dict_moves_between_backends(interpreted):
    result = interpreted["state-dict-round-trip"]
    assert "error" not in result, result.get("error")
    for rule, worst in result.items():
        assert worst <= FP32_TOL, (rule, worst)


def check_nonfinite(result: dict) -> None:
    assert "error" not in result, result.get("error")
    for rule, r in result.items():
        assert r["skipped_kept"] and r["first_kept"], (rule, r)
        assert r["warned"] == r["expected_warnings"], (rule, r)
        assert r["worst"] <= FP32_TOL, (rule, r)


def test_interpreted_kernel_skips_nonfinite_tensors_on_the_device(interpreted):
    check_nonfinite(interpreted["nonfinite-skip"])


def check_raise(result: dict) -> None:
    assert "error" not in result, result.get("error")
    for rule, r in result.items():
        assert r["fast_plan"] and r["raised"] and r["kept"] and r["worst"] <= FP32_TOL, (rule, r)


def test_interpreted_kernel_raise_policy_changes_nothing(interpreted):
    check_raise(interpreted["nonfinite-raise"])


def test_interpreted_cell_kernels_match_autograd(interpreted):
    check_cell(interpreted["cell-autograd"], FP32_TOL)


def test_interpreted_cell_kernels_in_a_meta_training_unroll(interpreted):
    # the same truncation with the kernels and with torch's ops: float32 rounding apart, the same meta-gradient
    check_cell(interpreted["cell-unroll"], 1e-4)


# ---------------------------------------------------------------------------------------------- CPU: compiler
_COMPILE_FOR_H200 = """
import json, sys, torch
sys.path.insert(0, "benchmarks")
from kernel_resources import measure
from learned_optim.kernels import lstm
dm = lstm.variants(rules=("dm",), dtypes=(torch.float32,), vecs=(4,))[0]
rnnprop = lstm.variants(rules=("rnnprop",), dtypes=(torch.bfloat16,), vecs=(1,))[0]
from learned_optim.kernels import cell
usage = [measure(v, 90) for v in (dm, rnnprop)]
for kernel in cell.compile_for(90):  # the meta-trainer's LSTM cell (forward, backward): a cubin, no register count
    usage.append({"shared_bytes": kernel.metadata.shared, "cubin_bytes": len(kernel.asm["cubin"])})
print(json.dumps(usage))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernel_compiles_for_the_h200_without_a_gpu():
    # The interpreter runs the kernel's maths, not its lowering: compile the default L2O-DM variant and a
    # bfloat16 RNNprop one (scalar accesses) down to sm_90a machine code, as the GPU would at its first step.
    # A hit in Triton's cache (keyed on the source, options and target) is a compile that succeeded.
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this triton wheel has no ptxas")
    env = dict(os.environ, PYTHONPATH=str(REPO))  # Triton's own cache: a repeated run reuses the compiled kernel
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H200], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for usage in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert usage["cubin_bytes"] > 0 and 0 < usage.get("registers", 1) <= 255, usage
        assert usage["shared_bytes"] <= 227 * 1024, usage  # the most shared memory one block may use on sm_90


# ---------------------------------------------------------------------------------------------- dispatch
def _params(device="cpu"):
    return [torch.nn.Parameter(torch.randn(3, 4, device=device))]


def test_cell_kernel_modes(monkeypatch):
    """``kernels.cell_kernel`` scopes where lstm_cell takes the fused cell; the optimizer's torch path never does
    (on CPU tensors outside the interpreter fused_cell declines, so a recording stub stands in for it)."""
    with pytest.raises(ValueError, match="cell kernel mode"):
        with kernels.cell_kernel("fast"):
            pass
    monkeypatch.setenv("LEARNED_OPTIM_CELL_KERNEL", "sometimes")
    with pytest.warns(RuntimeWarning, match="LEARNED_OPTIM_CELL_KERNEL"):
        assert kernels._cell_mode_from_env() == "auto"
    calls = []
    monkeypatch.setattr(kernels, "fused_cell", lambda gates, c: calls.append(gates.shape) and None)
    rule = learned_optim.build_rule("dm")
    state = rule.init_state([(6,)])
    assert not kernels.cell_on_cpu()
    rule(torch.randn(6), state, 1)
    assert calls == []  # "auto": CUDA tensors only
    with kernels.cell_kernel("on"):
        rule(torch.randn(6), state, 1)
        assert len(calls) == 2  # one per layer
        p = torch.nn.Parameter(torch.randn(6))
        opt = learned_optim.L2ODM([p], rule, backend="torch")
        p.grad = torch.randn(6)
        opt.step()
        assert len(calls) == 2 and kernels.cell_on_cpu()  # the torch path: torch's maths, the mode restored after
    assert not kernels.cell_on_cpu()


def test_fused_cell_declines_what_it_cannot_take():
    """CPU tensors outside mode "on" under the interpreter, other dtypes, shapes and layouts: None (the plain
    maths), without importing Triton's kernels for the question."""
    gates, c = torch.randn(8, 5), torch.randn(2, 5)
    assert kernels.fused_cell(gates, c) is None
    with kernels.cell_kernel("on"):
        if not kernels.interpreter_enabled():
            assert kernels.fused_cell(gates, c) is None
        assert kernels.fused_cell(gates.double(), c.double()) is None
        assert kernels.fused_cell(gates[:, :4], c[:, :4]) is None  # gates not contiguous
        assert kernels.fused_cell(torch.randn(6, 5), c) is None  # not 4 H rows
        assert kernels.fused_cell(gates, c.t().contiguous().t()) is None  # c's columns strided

def test_backend_argument_is_checked():
    with pytest.raises(ValueError, match="Invalid backend"):
        learned_optim.L2ODM(_params(), learned_optim.build_rule("dm"), backend="cuda")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_backend_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if kernels.interpreter_enabled():
        pytest.skip("the kernels were imported under TRITON_INTERPRET=1 in this process")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        learned_optim.RNNprop(_params(), learned_optim.build_rule("rnnprop"), backend="triton")


def test_triton_backend_refuses_l2o_scale():
    with pytest.raises(ValueError, match="no fused kernel for the 'scale' rule"):
        learned_optim.L2OScale(_params(), learned_optim.build_rule("scale"), backend="triton")


def test_auto_on_cpu_takes_the_torch_path_without_importing_the_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "lstm_step", lambda *a, **k: calls.append(1))
    params = _params()
    opt = learned_optim.L2ODM(params, learned_optim.build_rule("dm"))
    assert opt.backend == "auto"
    params[0].grad = torch.randn(3, 4)
    opt.step()
    assert calls == [] and opt.state[params[0]]["step"].device.type == "cpu"


def test_host_cost_benchmark_times_the_fast_plan(tmp_path):
    """benchmarks/step_host.py: the fused path with its launches stubbed (no GPU, no interpreter needed)."""
    import importlib.util

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    spec = importlib.util.spec_from_file_location("bench_step_host", REPO / "benchmarks" / "step_host.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--sizes", "10k", "--repeats", "2", "--steps", "2", "--out", str(tmp_path / "host.json")])
    assert [(c["shape"], sorted(c["results"])) for c in out["cases"]] == [
        ("matrix", ["dm", "rnnprop", "walk"]), ("many", ["dm", "rnnprop", "walk"])]
    assert json.loads((tmp_path / "host.json").read_text())["cases"][1]["num_tensors"] > 1
    from learned_optim.kernels import lstm

    assert isinstance(lstm._lstm_step_kernel, type(lstm._nonfinite_kernel)) and not isinstance(
        lstm._lstm_step_kernel, bench._NoLaunch)  # the stubs are gone afterwards


class _Launches:
    """Stands in for a Triton kernel (no GPU, no interpreter): its compile check passes or raises; a launch fails."""

    def __init__(self, error=None):
        self.error = error

    def warmup(self, *args, **kwargs):
        if self.error is not None:
            raise self.error

    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched although the compile check failed")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("name", ["dm", "rnnprop"])
def test_a_kernel_this_gpu_cannot_compile_falls_back_to_the_torch_path(monkeypatch, name):
    """E.g. TF32 products or bfloat16 on a pre-Ampere GPU: backend="auto" warns once and steps on the torch path,
    with the torch path's results; backend="triton" raises before anything is updated."""
    import warnings

    from learned_optim.kernels import lstm

    monkeypatch.setattr(kernels, "use_kernel", lambda backend, rule, device: backend != "torch")
    monkeypatch.setattr(kernels, "check_backend", lambda backend, rule, params: None)
    monkeypatch.setattr(lstm, "_nonfinite_kernel", _Launches())
    monkeypatch.setattr(lstm, "_lstm_step_kernel", _Launches(RuntimeError("simulated: tf32 dot needs sm_80\nmore")))
    monkeypatch.setattr(lstm, "_advance_steps_kernel", _Launches())
    rule = learned_optim.build_rule(name)
    runs = {}
    for backend in ("torch", "auto"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(3))]
        opt = learned_optim.LearnedOptimizer(params, rule, backend=backend)
        caught = []
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            with warnings.catch_warnings(record=True) as got:
                warnings.simplefilter("always")
                opt.step()
            caught.append([str(w.message) for w in got])
        runs[backend] = (params, opt, caught)
    (ref, oref, quiet), (got, ogot, warned) = runs["torch"], runs["auto"]
    assert quiet == [[], [], []]
    assert len(warned[0]) == 1 and "cannot run on cpu (RuntimeError: simulated: tf32 dot needs sm_80)" in warned[0][0]
    assert warned[1:] == [[], []]  # once: the device is marked, the kernel is not tried again
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
        for key, value in oref.state[a].items():
            assert torch.equal(value, ogot.state[b][key]), key

    params = [torch.nn.Parameter(torch.randn(4))]
    before = params[0].detach().clone()
    opt = learned_optim.LearnedOptimizer(params, rule, backend="triton")
    params[0].grad = torch.randn(4)
    with pytest.raises(RuntimeError, match="backend='triton'.*cannot run on cpu .*nothing was updated"):
        opt.step()
    assert torch.equal(params[0], before) and float(opt.state[params[0]]["step"]) == 0.0


class _Recorder:
    """Stands in for a kernel: records the first argument (the pointer table) of every launch, runs nothing."""

    def __init__(self, tables):
        self.tables = tables

    def warmup(self, *args, **kwargs):
        return None

    def __getitem__(self, grid):
        return lambda table, *args, **kwargs: self.tables.append(table.clone())


_OPS = ("grad_none", "new_grads", "param_data", "state_tensor", "state_dict", "state_dict_cloned", "reload",
        "reverse", "nothing")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule_name=st.sampled_from(["dm", "rnnprop"]),
       ops=st.lists(st.tuples(st.sampled_from(_OPS), st.integers(0, 3)), min_size=3, max_size=10))
def test_every_launch_points_at_the_current_tensors(rule_name, ops):
    """Whatever changes between steps (gradients gone or new, parameter storage, state tensors or dicts, a
    reloaded state_dict, the group reordered), the pointer table of every launch -- full path or fast plan --
    holds exactly the current gradient, parameter, state and step pointers of the tensors with a gradient, and
    the rule's current weights. The kernels are stubbed: this checks the host side alone, on any machine."""
    from learned_optim.kernels import lstm

    tables = []
    saved = (kernels.use_kernel, lstm._nonfinite_kernel, lstm._lstm_step_kernel, lstm._advance_steps_kernel)
    kernels.use_kernel = lambda backend, rule, device: backend != "torch"
    lstm._nonfinite_kernel = _Recorder([])  # the NaN/Inf check and the step counters: recorded, not run
    lstm._advance_steps_kernel = _Recorder([])
    lstm._lstm_step_kernel = _Recorder(tables)
    try:
        torch.manual_seed(0)
        rule = learned_optim.build_rule(rule_name)
        params = [torch.nn.Parameter(torch.randn(s)) for s in ((4, 4), (8,), (3, 5), (16,))]
        opt = learned_optim.LearnedOptimizer(params, rule)
        nw = len(lstm._weight_tensors(rule))
        for p in params:
            p.grad = torch.randn(p.shape)
        for op, i in [("nothing", 0)] + ops:
            p = opt.param_groups[0]["params"][i]
            if op == "grad_none":
                p.grad = None
            elif op == "new_grads":
                for q in params:
                    q.grad = torch.randn(q.shape)
            elif op == "param_data":
                p.data = p.data.clone()
            elif op == "state_tensor" and opt.state[p]:
                opt.state[p]["rnn"] = opt.state[p]["rnn"].clone()
            elif op == "state_dict" and opt.state[p]:
                opt.state[p] = dict(opt.state[p])
            elif op == "state_dict_cloned" and opt.state[p]:
                opt.state[p] = {key: value.clone() for key, value in opt.state[p].items()}
            elif op == "reload":
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
            elif op == "reverse":
                opt.param_groups[0]["params"].reverse()
            tables.clear()
            opt.step()
            stepped = [q for q in opt.param_groups[0]["params"] if q.grad is not None]
            assert bool(tables) == bool(stepped)  # one launch per dtype / vector-width class
            rows = set()
            for table in (t.tolist() for t in tables):
                assert table[:nw] == [w.data_ptr() for w in lstm._weight_tensors(rule)]
                rows |= {tuple(table[nw + k * 7: nw + k * 7 + 5]) for k in range((len(table) - nw) // 7)}
            expected = set()
            for q in stepped:
                st_q = opt.state[q]
                mv = st_q["mv"] if rule_name == "rnnprop" else st_q["rnn"]
                expected.add((q.grad.data_ptr(), q.data_ptr(), st_q["rnn"].data_ptr(), mv.data_ptr(),
                              st_q["step"].data_ptr()))
            assert rows == expected
    finally:
        kernels.use_kernel, lstm._nonfinite_kernel, lstm._lstm_step_kernel, lstm._advance_steps_kernel = saved


def test_backend_survives_pickling():
    opt = learned_optim.L2ODM(_params(), learned_optim.build_rule("dm"), backend="torch")
    assert copy.deepcopy(opt).backend == "torch"


# ---------------------------------------------------------------------------------------------- CUDA
def cuda_cases() -> list[dict]:
    out = list(INTERPRETER_CASES)
    for rule in ("dm", "rnnprop"):
        # a 100k-coordinate matrix next to odd small tensors, and a network-like list of 300 tensors
        out.append(case(f"{rule}-cuda-large", rule, steps=20, shapes=[[100, 1000], [3, 7], [1], [4097]]))
        shapes = [[(64 << (i % 6)) // 64, 64] for i in range(300)]
        out.append(case(f"{rule}-cuda-300-tensors", rule, steps=10, shapes=shapes, late={5: 2}))
    return out


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("spec", cuda_cases(), ids=lambda s: s["name"])
def test_cuda_kernel_matches_torch_path(spec):
    if kernels.interpreter_enabled():
        pytest.skip("TRITON_INTERPRET=1 in this process")
    check(spec, run_pair(spec, "cuda"))


@pytest.mark.cuda
@cuda_only
def test_cuda_state_dict_moves_between_backends():
    for rule, worst in state_dict_round_trip("cuda").items():
        assert worst <= FP32_TOL, (rule, worst)


@pytest.mark.cuda
@cuda_only
def test_cuda_kernel_raise_policy_changes_nothing():
    check_raise(nonfinite_raise("cuda"))


@pytest.mark.cuda
@cuda_only
def test_cuda_cell_kernels_match_autograd():
    check_cell(cell_against_autograd("cuda"), FP32_TOL)


@pytest.mark.cuda
@cuda_only
def test_cuda_cell_kernels_in_a_meta_training_unroll():
    check_cell(cell_in_an_unroll("cuda"), 1e-4)

@pytest.mark.cuda
@cuda_only
def test_cuda_cell_kernels_that_do_not_compile_fall_back_to_torch(monkeypatch):
    from learned_optim.kernels import cell
    from learned_optim.rules import lstm_cell

    def broken(gates, c):
        raise RuntimeError("no such instruction on this GPU")

    monkeypatch.setattr(cell, "check_compiles", broken)
    monkeypatch.setattr(kernels, "_cell_checked", set())
    monkeypatch.setattr(kernels, "_cell_off", set())
    torch.manual_seed(0)
    lstm = torch.nn.LSTMCell(3, 4).cuda()
    x, h, c = torch.randn(3, 9, device="cuda"), torch.randn(4, 9, device="cuda"), torch.randn(4, 9, device="cuda")
    with pytest.warns(RuntimeWarning, match="fused LSTM cell kernels cannot run"):
        h_new, c_new = lstm_cell(x, h, c, lstm)
    h_ref, c_ref = lstm(x.t(), (h.t(), c.t()))
    torch.testing.assert_close(h_new.t(), h_ref)
    torch.testing.assert_close(c_new.t(), c_ref)

@pytest.mark.cuda
@cuda_only
def test_cuda_kernel_skips_nonfinite_tensors_on_the_device():
    check_nonfinite(nonfinite_skip("cuda"))


@pytest.mark.cuda
@cuda_only
@pytest.mark.parametrize("name", ["dm", "rnnprop"])
def test_cuda_fused_step_never_waits_for_the_gpu(name):
    """After the first step (which initialises the state), step() queues its work without a host sync, NaN
    gradients included; the skip is reported by a later step() once its count has reached the host."""
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).cuda()
    opt = learned_optim.LearnedOptimizer(model.parameters(), learned_optim.build_rule(name).cuda())
    x = torch.randn(16, 64, device="cuda")

    def backward(nan: bool):
        opt.zero_grad()
        model(x).square().mean().backward()
        if nan:
            model[0].weight.grad[0, 0] = float("nan")

    backward(False)
    opt.step()
    torch.cuda.synchronize()
    snapshots = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("error")
        try:
            for nan in (False, True, False):
                backward(nan)
                snapshots.append(model[0].weight.detach().clone())
                opt.step()
                snapshots.append(model[0].weight.detach().clone())
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        backward(False)
        opt.step()
    assert torch.equal(snapshots[2], snapshots[3])  # the NaN step left the tensor as it was
    assert not torch.equal(snapshots[0], snapshots[1]) and not torch.equal(snapshots[4], snapshots[5])
    messages = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(messages) == 1 and "in 1 tensor(s); skipped them in 1 earlier step(s)" in messages[0], messages


@pytest.mark.cuda
@cuda_only
def test_cuda_auto_uses_the_kernel_and_keeps_steps_on_the_device(monkeypatch):
    real = kernels.lstm_step
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "lstm_step", spy)
    params = _params("cuda")
    opt = learned_optim.RNNprop(params, learned_optim.build_rule("rnnprop").cuda())
    params[0].grad = torch.randn(3, 4, device="cuda")
    opt.step()
    assert calls == [1] and opt.state[params[0]]["step"].device.type == "cuda"
    scale = learned_optim.L2OScale(_params("cuda"), learned_optim.build_rule("scale").cuda())
    scale.param_groups[0]["params"][0].grad = torch.randn(3, 4, device="cuda")
    scale.step()
    assert calls == [1]  # L2O-Scale stays on the torch path


if __name__ == "__main__" and "--worker" in sys.argv:
    worker()
