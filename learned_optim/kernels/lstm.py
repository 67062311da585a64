"""The fused L2O-DM / RNNprop step: one Triton kernel per param group (and dtype combination).

Importing this module decorates the kernel with ``triton.jit``; ``TRITON_INTERPRET=1`` must be set
before that for the interpreter (CPU tensors). See ``learned_optim.kernels`` for the design.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import operator
import os
from array import array
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..rules import L2ODMRule, RNNpropRule, Rule
from ..rules.base import host_to_device

# table layout (int64): weight pointers first -- output weight, output bias, input projection weight and bias
# (RNNprop), then per layer w_ih, w_hh, b_ih, b_hh -- then one row of _NCOL entries per tensor
_NCOL = 7  # grad ptr, param ptr, rnn ptr, mv ptr, step ptr, numel, first block
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_RULE_IDS = {"dm": 0, "rnnprop": 1}
_STEP_ROWS = 256  # tensors per program of _advance_steps_kernel


# ---------------------------------------------------------------------------------------- device maths
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _expm1(x):
    # exp(x) - 1 without cancellation near 0: a degree-7 Taylor polynomial for |x| < 1/4 (error < 4e-10)
    p = x * (1.0 + x * (0.5 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0 + x * (1.0 / 720.0 + x / 5040.0))))))
    return tl.where(tl.abs(x) < 0.25, p, tl.exp(x) - 1.0)


@triton.jit
def _gate(x, x0, x1, h, w_ih, w_hh, b_ih, b_hh, w_offs, w_mask, js, jmask,
          TWO_INPUTS: tl.constexpr, PRECISION: tl.constexpr):
    """Pre-activation of one LSTM gate, [BLOCK, HP]: x W_ih^T + h W_hh^T + b_ih + b_hh. The pointers point at
    the gate's first row; ``w_offs`` / ``w_mask`` address the [HP, HP] tile W^T of an (H, H) block."""
    if TWO_INPUTS:  # L2O-DM's first layer: 2 input features, outer products instead of a matrix product
        w0 = tl.load(w_ih + js * 2, mask=jmask, other=0.0)
        w1 = tl.load(w_ih + js * 2 + 1, mask=jmask, other=0.0)
        acc = x0[:, None] * w0[None, :] + x1[:, None] * w1[None, :]
    else:
        acc = tl.dot(x, tl.load(w_ih + w_offs, mask=w_mask, other=0.0), input_precision=PRECISION)
    acc = tl.dot(h, tl.load(w_hh + w_offs, mask=w_mask, other=0.0), acc, input_precision=PRECISION)
    bias = tl.load(b_ih + js, mask=jmask, other=0.0) + tl.load(b_hh + js, mask=jmask, other=0.0)
    return acc + bias[None, :]


@triton.jit
def _lstm_step_kernel(table, block_map, skip, lr, sign, c0, c1, c2, c3, c4, output_scale,
                      RULE: tl.constexpr, NUM_LAYERS: tl.constexpr, H: tl.constexpr, HP: tl.constexpr,
                      BLOCK: tl.constexpr, G_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
                      PRECISION: tl.constexpr, NW: tl.constexpr, NCOL: tl.constexpr, VEC: tl.constexpr):
    """One program = BLOCK coordinates of one tensor: preprocessing, the LSTM layers, the head, state and
    parameter written in place. DM: c0 = k, c1 = e^k; RNNprop: c0 = log2(beta1), c1 = log2(beta2), c2 = eps,
    c3 = beta1, c4 = beta2. A tensor whose ``skip`` flag is set (a NaN/Inf in its gradient) is left unchanged:
    every load and store of its programs is masked off."""
    pid = tl.program_id(0)
    t = tl.load(block_map + pid).to(tl.int64)
    row = table + NW + t * NCOL
    g_ptr = tl.load(row).to(tl.pointer_type(G_DTYPE))
    p_ptr = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
    s_ptr = tl.load(row + 2).to(tl.pointer_type(S_DTYPE))
    n = tl.load(row + 5)
    if VEC > 1:  # every tensor of this launch: numel and pointers multiples of VEC elements -> vector accesses
        g_ptr = tl.multiple_of(g_ptr, 16)
        p_ptr = tl.multiple_of(p_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
        n = tl.multiple_of(n, VEC)
    coord = (pid - tl.load(row + 6)) * BLOCK + tl.arange(0, BLOCK)  # int64: row * n + coord may exceed 2^31
    valid = (coord < n) & (tl.load(skip + t) == 0)
    js = tl.arange(0, HP)
    jmask = js < H
    w_offs = js[None, :] * H + js[:, None]  # tile[k, j] = W[j, k] of an (H, H) block
    w_mask = jmask[None, :] & jmask[:, None]
    s_offs = js[None, :].to(tl.int64) * n + coord[:, None]  # row j of the state, [BLOCK, HP]
    s_mask = valid[:, None] & jmask[None, :]

    g = tl.load(g_ptr + coord, mask=valid, other=0.0, eviction_policy="evict_first").to(tl.float32) * sign
    x0 = g
    x1 = g
    x = tl.zeros([BLOCK, HP], dtype=tl.float32)
    if RULE == 0:  # L2O-DM: LogAndSign with k = c0 (1.1920929e-07: float32 eps, as in the rule)
        x0 = tl.maximum(tl.log(tl.abs(g) + 1.1920928955078125e-07) / c0, -1.0)
        x1 = tl.minimum(tl.maximum(g * c1, -1.0), 1.0)
    else:  # RNNprop: Adam moments (torch.lerp's formula), bias-corrected features, Linear(2, H) + ELU
        mv_ptr = tl.load(row + 3).to(tl.pointer_type(S_DTYPE))
        if VEC > 1:
            mv_ptr = tl.multiple_of(mv_ptr, 16)
        m = tl.load(mv_ptr + coord, mask=valid, other=0.0, eviction_policy="evict_first").to(tl.float32)
        v = tl.load(mv_ptr + n + coord, mask=valid, other=0.0, eviction_policy="evict_first").to(tl.float32)
        if c3 < 0.5:
            m = g + c3 * (m - g)
        else:
            m = m - (m - g) * (1.0 - c3)
        if c4 < 0.5:
            v = g * g + c4 * (v - g * g)
        else:
            v = v - (v - g * g) * (1.0 - c4)
        tl.store(mv_ptr + coord, m.to(S_DTYPE), mask=valid, eviction_policy="evict_first")
        tl.store(mv_ptr + n + coord, v.to(S_DTYPE), mask=valid, eviction_policy="evict_first")
        # this tensor's own step count, advanced after the launch (_advance_steps_kernel): this is step + 1
        step = tl.load(tl.load(row + 4).to(tl.pointer_type(tl.float32))) + 1.0
        denom = tl.sqrt(v / (1.0 - tl.exp2(step * c1))) + c2
        f0 = (m / (1.0 - tl.exp2(step * c0))) / denom
        f1 = g / denom
        w_proj = tl.load(table + 2).to(tl.pointer_type(tl.float32))
        b_proj = tl.load(table + 3).to(tl.pointer_type(tl.float32))
        wp0 = tl.load(w_proj + js * 2, mask=jmask, other=0.0)
        wp1 = tl.load(w_proj + js * 2 + 1, mask=jmask, other=0.0)
        z = (f0[:, None] * wp0[None, :] + f1[:, None] * wp1[None, :]) + tl.load(b_proj + js, mask=jmask, other=0.0)[None, :]
        x = tl.where(z > 0.0, z, _expm1(tl.minimum(z, 0.0)))

    for layer in tl.static_range(NUM_LAYERS):
        k_in = H  # input width of this layer: 2 for L2O-DM's first layer
        if RULE == 0 and layer == 0:
            k_in = 2
        w_ih = tl.load(table + 4 + 4 * layer).to(tl.pointer_type(tl.float32))
        w_hh = tl.load(table + 5 + 4 * layer).to(tl.pointer_type(tl.float32))
        b_ih = tl.load(table + 6 + 4 * layer).to(tl.pointer_type(tl.float32))
        b_hh = tl.load(table + 7 + 4 * layer).to(tl.pointer_type(tl.float32))
        h_ptrs = s_ptr + (2 * layer * H) * n + s_offs
        c_ptrs = h_ptrs + H * n
        h = tl.load(h_ptrs, mask=s_mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        c = tl.load(c_ptrs, mask=s_mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        # gates in the order i, g, f, o: at most two gate tiles alive at once; tanh as 2 sigmoid(2x) - 1,
        # the form of learned_optim.rules.base.fast_tanh
        ig = _sigmoid(_gate(x, x0, x1, h, w_ih, w_hh, b_ih, b_hh, w_offs, w_mask, js, jmask, RULE == 0 and layer == 0, PRECISION))
        a = _gate(x, x0, x1, h, w_ih + 2 * H * k_in, w_hh + 2 * H * H, b_ih + 2 * H, b_hh + 2 * H, w_offs, w_mask,
                  js, jmask, RULE == 0 and layer == 0, PRECISION)
        ig = ig * (_sigmoid(2.0 * a) * 2.0 - 1.0)
        a = _gate(x, x0, x1, h, w_ih + H * k_in, w_hh + H * H, b_ih + H, b_hh + H, w_offs, w_mask, js, jmask,
                  RULE == 0 and layer == 0, PRECISION)
        c = _sigmoid(a) * c + ig
        a = _gate(x, x0, x1, h, w_ih + 3 * H * k_in, w_hh + 3 * H * H, b_ih + 3 * H, b_hh + 3 * H, w_offs, w_mask,
                  js, jmask, RULE == 0 and layer == 0, PRECISION)
        x = _sigmoid(a) * (_sigmoid(2.0 * c) * 2.0 - 1.0)
        tl.store(h_ptrs, x.to(S_DTYPE), mask=s_mask, eviction_policy="evict_first")
        tl.store(c_ptrs, c.to(S_DTYPE), mask=s_mask, eviction_policy="evict_first")

    w_out = tl.load(table + 0).to(tl.pointer_type(tl.float32))
    b_out = tl.load(table + 1).to(tl.pointer_type(tl.float32))
    y = tl.sum(x * tl.load(w_out + js, mask=jmask, other=0.0)[None, :], axis=1) + tl.load(b_out)
    if RULE == 1:  # tanh(y) = -expm1(-2|y|) / (expm1(-2|y|) + 2), signed: exact near 0, no overflow
        e = _expm1(-2.0 * tl.abs(y))
        y = tl.where(y < 0.0, e / (e + 2.0), -e / (e + 2.0))
    update = y * output_scale
    p = tl.load(p_ptr + coord, mask=valid, other=0.0, eviction_policy="evict_first").to(tl.float32)
    p = p + lr * update.to(P_DTYPE).to(tl.float32)  # the update is rounded to the parameter dtype first, as in torch
    tl.store(p_ptr + coord, p.to(P_DTYPE), mask=valid, eviction_policy="evict_first")


@triton.jit
def _nonfinite_kernel(table, block_map, skip, BLOCK: tl.constexpr, G_DTYPE: tl.constexpr, NW: tl.constexpr,
                      NCOL: tl.constexpr):
    """Before the step: flag (``skip[t] = 1``) each tensor with a NaN or Inf in its gradient. One program per
    BLOCK coordinates, the step's own block map; flags are only ever set, so the programs need no ordering."""
    pid = tl.program_id(0)
    t = tl.load(block_map + pid).to(tl.int64)
    row = table + NW + t * NCOL
    g_ptr = tl.load(row).to(tl.pointer_type(G_DTYPE))
    coord = (pid - tl.load(row + 6)) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(g_ptr + coord, mask=coord < tl.load(row + 5), other=0.0).to(tl.float32)
    found = tl.max(((g != g) | (tl.abs(g) > 3.4028234663852886e38)).to(tl.int32), axis=0)  # NaN, or +-Inf
    if found > 0:
        tl.store(skip + t, 1)


@triton.jit
def _advance_steps_kernel(table, skip, count, rows, NW: tl.constexpr, NCOL: tl.constexpr, R: tl.constexpr):
    """After the step, R tensors per program: each tensor's ``step += 1`` unless it was skipped; the number of
    skipped tensors into ``count[pid]``; the flags cleared for the next step."""
    pid = tl.program_id(0)
    r = pid * R + tl.arange(0, R)
    m = r < rows
    flag = tl.load(skip + r, mask=m, other=0)
    step_ptr = tl.load(table + NW + r.to(tl.int64) * NCOL + 4, mask=m, other=0).to(tl.pointer_type(tl.float32))
    tl.store(step_ptr, tl.load(step_ptr, mask=m, other=0.0) + (1 - flag).to(tl.float32), mask=m)
    tl.store(skip + r, tl.zeros([R], dtype=tl.int32), mask=m)
    tl.store(count + pid, tl.sum(flag, axis=0))


# ---------------------------------------------------------------------------------------- host side
_PLAIN = (Tensor, torch.nn.Parameter)
_PRECISIONS = ("tf32x3", "ieee", "tf32")


def launch_config() -> dict:
    """BLOCK (coordinates per program), num_warps, the tl.dot input precision and a register cap per thread
    (0: ptxas decides); the environment variables LEARNED_OPTIM_TRITON_BLOCK / _WARPS / _PRECISION / _MAXNREG
    override the defaults (benchmarks, tuning)."""
    block = int(os.environ.get("LEARNED_OPTIM_TRITON_BLOCK", "64"))
    warps = int(os.environ.get("LEARNED_OPTIM_TRITON_WARPS", "4"))
    precision = os.environ.get("LEARNED_OPTIM_TRITON_PRECISION", "tf32x3")
    maxnreg = int(os.environ.get("LEARNED_OPTIM_TRITON_MAXNREG", "0"))
    if block < 16 or block & (block - 1):
        raise ValueError(f"LEARNED_OPTIM_TRITON_BLOCK must be a power of two >= 16, got {block}")
    if warps < 1 or warps & (warps - 1):
        raise ValueError(f"LEARNED_OPTIM_TRITON_WARPS must be a power of two, got {warps}")
    if precision not in _PRECISIONS:
        raise ValueError(f"LEARNED_OPTIM_TRITON_PRECISION must be one of {_PRECISIONS}, got {precision!r}")
    if maxnreg < 0:
        raise ValueError(f"LEARNED_OPTIM_TRITON_MAXNREG must be >= 0, got {maxnreg}")
    return {"BLOCK": block, "num_warps": warps, "PRECISION": precision, "maxnreg": maxnreg}


def _weight_tensors(rule: Rule) -> list[Tensor]:
    """The rule's own parameter tensors (looked up now, never cached) in the order of the weight part of the
    table; read from the modules' parameter dicts, which is what ``module.name`` resolves to, without
    ``nn.Module.__getattr__`` (a few microseconds per step)."""
    modules = rule._modules
    out = modules["output"]._parameters
    proj = modules["input_projection"]._parameters if isinstance(rule, RNNpropRule) else out  # DM: unused
    weights = [out["weight"], out["bias"], proj["weight"], proj["bias"]]
    for cell in modules["cells"]._modules.values():
        cell = cell._parameters
        weights += [cell["weight_ih"], cell["weight_hh"], cell["bias_ih"], cell["bias_hh"]]
    return weights


def unsupported_reason(rule: Rule, device: torch.device) -> str | None:
    """Why the kernel cannot run ``rule`` on ``device`` (None when it can)."""
    if type(rule) not in (L2ODMRule, RNNpropRule):
        return f"no fused kernel for {type(rule).__name__} (only L2O-DM and RNNprop)"
    if rule.hidden_size > 128:
        return f"hidden_size {rule.hidden_size} > 128"
    for w in _weight_tensors(rule):
        if w.dtype != torch.float32 or w.device != device or not w.is_contiguous():
            return "the rule's weights must be contiguous float32 tensors on the parameters' device"
    return None


def _block_map(numels: tuple[int, ...], block: int, device: torch.device, cache: dict) -> Tensor:
    key = (block, device, numels)
    found = cache.get(key)
    if found is None:
        counts = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
        found = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts).to(device)
        if len(cache) >= 16:  # layouts rarely change; bound the cache anyway
            cache.clear()
        cache[key] = found
    return found


def lstm_step(rule: Rule, params: Sequence[Tensor], state, *, lr: float, maximize: bool, flat_pair,
              cache: dict, group_params: list) -> tuple[list[Tensor], Tensor | None]:
    """Step ``params`` (the tensors of one param group with a gradient, state initialised) with the fused
    kernel, from a fresh scan, and record the group's plan for :func:`fast_step`, which takes its next steps.

    ``state`` is the optimizer's ``self.state``; ``flat_pair(p)`` gives (flat gradient, flat target, buffer)
    for parameters that are not plain contiguous tensors; ``group_params`` is the param group's list. Returns
    ``(rest, counts)``: the parameters the kernel cannot take (tensor subclasses, float64, state that is not a
    contiguous tensor on the parameter's device), which the caller steps on the torch path, and an int32
    tensor on the device whose sum is the number of tensors skipped for a non-finite gradient (None when
    nothing was launched), which the caller reads when it is ready. Each tensor's ``step`` is kept on its
    device (as torch's fused optimizers do); the kernel reads it through the table.

    Non-finite gradients are found on the device, without waiting for the GPU: a first launch flags each
    tensor with a NaN or Inf in its gradient, the step leaves flagged tensors (parameter, state, ``step``)
    unchanged, and a last launch advances the other tensors' steps and counts the flagged ones.
    """
    device = params[0].device
    cfg = launch_config()
    plan = _scan(rule, params, state, flat_pair, cfg["BLOCK"], device, cache)
    try:
        out = _launch(rule, plan, plan["grads"], lr, maximize, device, cfg, check=True)
    except KernelUnavailable:
        _record_fast(cache, None, rule, group_params, state)
        raise
    _record_fast(cache, plan if plan["reusable"] else None, rule, group_params, state)
    return out


def device_guard(device: torch.device):
    """The launches' device as the current one on a GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def warm_up(kernel, *args, grid, **meta) -> None:
    """Compile ``kernel`` for these arguments and load it on the GPU (Triton's warm-up, no launch): a variant
    the device cannot run (resource limits, instructions) raises here, before anything is written."""
    compiled = kernel.warmup(*args, grid=grid, **meta)
    init = getattr(compiled, "_init_handles", None)
    if init is not None:
        init()


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (Triton's compile errors run to pages)."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def compile_source(kernel, signature: dict, const: dict, arch: int, options: dict):
    """``kernel`` compiled for an NVIDIA GPU of compute capability ``arch`` without that GPU (Triton's compiler
    and the ptxas of its wheel), ``const`` its constexpr arguments."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(kernel, triton.JITFunction):
        raise RuntimeError("compiling for a GPU target needs the compiled kernels: unset TRITON_INTERPRET before "
                           "importing triton")
    names = kernel.arg_names
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in const.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


class KernelUnavailable(RuntimeError):
    """A kernel variant a step needs cannot be compiled or loaded on this device (e.g. TF32 products or
    bfloat16 on a GPU older than Ampere, or too little shared memory); raised before anything is written."""


def _launch(rule: Rule, plan: dict, grads: list[int], lr: float, maximize: bool, device: torch.device,
            cfg: dict, check: bool = False) -> tuple[list[Tensor], Tensor | None]:
    """Launch the plan's kernels. With ``check`` (a fresh scan), every kernel variant is first
    compiled and loaded for the device (Triton's warm-up, no launch), so that a variant this GPU cannot run
    raises :class:`KernelUnavailable` before any launch has modified a parameter or the state."""
    block = cfg["BLOCK"]
    weights = array("q", [w.data_ptr() for w in _weight_tensors(rule)])
    is_rnnprop = isinstance(rule, RNNpropRule)
    if is_rnnprop:  # the kernel computes 1 - beta^step = 1 - exp2(step * log2(beta)) per tensor
        consts = (math.log2(rule.beta1) if rule.beta1 > 0 else -math.inf,
                  math.log2(rule.beta2) if rule.beta2 > 0 else -math.inf, rule.eps, rule.beta1, rule.beta2)
    else:
        consts = (rule.k, math.exp(rule.k), 0.0, 0.0, 0.0)  # e^k is rounded to float32, as torch does with a scalar
    nw = len(weights)
    with device_guard(device):
        calls = []  # per launch: (kernel, grid, args, meta) of its three kernels
        for launch in plan["launches"]:
            table = array("q", launch["table"])
            table[:nw] = weights
            table[nw::_NCOL] = array("q", grads if launch["every_row"] else [grads[i] for i in launch["rows"]])
            table_t = host_to_device(torch.frombuffer(table, dtype=torch.int64), device)  # queued, no wait
            p_dtype, g_dtype, s_dtype, vec = launch["kind"]
            skip, rows = launch["skip"], len(launch["rows"])
            calls += [
                (_nonfinite_kernel, (launch["blocks"],), (table_t, launch["block_map"], skip),
                 dict(BLOCK=block, G_DTYPE=_TL_DTYPES[g_dtype], NW=nw, NCOL=_NCOL, num_warps=2)),
                (_lstm_step_kernel, (launch["blocks"],),
                 (table_t, launch["block_map"], skip, float(lr), -1.0 if maximize else 1.0, *map(float, consts),
                  float(rule.output_scale)),
                 dict(RULE=_RULE_IDS[rule.name], NUM_LAYERS=rule.num_layers, H=rule.hidden_size,
                      HP=max(16, triton.next_power_of_2(rule.hidden_size)), BLOCK=block, G_DTYPE=_TL_DTYPES[g_dtype],
                      P_DTYPE=_TL_DTYPES[p_dtype], S_DTYPE=_TL_DTYPES[s_dtype], PRECISION=cfg["PRECISION"],
                      NW=nw, NCOL=_NCOL, VEC=vec, num_warps=cfg["num_warps"],
                      **({"maxnreg": cfg["maxnreg"]} if cfg["maxnreg"] else {}))),
                (_advance_steps_kernel, (-(-rows // _STEP_ROWS),),
                 (table_t, skip, plan["counts"][launch["count_at"]:], rows),
                 dict(NW=nw, NCOL=_NCOL, R=_STEP_ROWS, num_warps=4)),
            ]
        if check:
            for kernel, grid, args, meta in calls:
                try:
                    warm_up(kernel, *args, grid=grid, **meta)
                except Exception as exc:  # noqa: BLE001 -- whatever Triton raises, nothing was written yet
                    raise KernelUnavailable(first_line(exc)) from exc
        try:
            for kernel, grid, args, meta in calls:
                kernel[grid](*args, **meta)
        except Exception:  # e.g. a launch configuration changed between steps and does not compile
            for launch in plan["launches"]:
                launch["skip"].zero_()  # flags a check may have set, which its step never cleared
            raise
        for p, buffer in plan["buffers"]:  # zero where skipped: the kernel masked those tensors' stores
            target = torch.view_as_real(p) if p.is_complex() else p
            target.add_(buffer.view(target.shape))
    return plan["rest"], (plan["counts"] if plan["launches"] else None)


# how a tensor of a param group took part in the step a fast plan was recorded from
_ROW, _REST, _NO_GRAD, _EMPTY = range(4)


def _record_fast(cache: dict, plan: dict | None, rule: Rule, group_params: list, state) -> None:
    """Record (or, for ``plan=None``, drop) the fast plan of a param group: which of its tensors are the plan's
    rows (with what their check needs, as columns), which have no gradient, are empty or are left to the torch
    path, and the state dict's keys and values as they are now."""
    key = ("fast", id(group_params))
    if plan is None:
        cache.pop(key, None)
        return
    rows = {id(r[0]): i for i, r in enumerate(plan["rows"])}
    rest = {id(p) for p in plan["rest"]}
    row_idx, others = [], []
    for i, p in enumerate(group_params):
        if id(p) in rows:
            row_idx.append(i)
        elif id(p) in rest:
            others.append((i, _REST, p))
        elif p.grad is None or p.numel() == 0:
            others.append((i, _NO_GRAD if p.grad is None else _EMPTY, p))
        else:  # a tensor this step did not take (e.g. dropped by the caller): no fast plan
            cache.pop(key, None)
            return
    if len(row_idx) != len(plan["rows"]) or not all(group_params[i] is r[0] for i, r in zip(row_idx, plan["rows"])):
        cache.pop(key, None)  # rows out of the group's order (cannot happen: params keep the group's order)
        return
    cols = list(zip(*plan["rows"])) if plan["rows"] else [()] * 7
    if sum(1 for k in cache if k[0] == "fast") >= 8:
        for k in [k for k in cache if k[0] == "fast"]:
            del cache[k]
    cache[key] = {"plan": plan, "rule": rule, "params": group_params, "members": list(group_params),
                  "row_idx": None if len(row_idx) == len(group_params) else row_idx, "others": others,
                  "row_params": list(cols[0]), "sts": list(cols[1]), "rnns": list(cols[2]),
                  "mvs": None if cols[3] and cols[3][0] is None else list(cols[3]), "steps": list(cols[4]),
                  "pptrs": list(cols[5]), "aligned": list(cols[6]), "any_aligned": any(cols[6]),
                  "state": state, "keys": list(state), "values": list(state.values()), "block": plan["block"]}


_GRAD = operator.attrgetter("grad")
_RNN, _MV, _STEP = operator.itemgetter("rnn"), operator.itemgetter("mv"), operator.itemgetter("step")


def fast_step(rule_on, group_params: list, state, *, lr: float, maximize: bool,
              cache: dict) -> tuple[list[Tensor], Tensor | None] | None:
    """Step a param group through the fast plan recorded at an earlier step; None (nothing done) when there
    is no such plan or anything it relies on changed, and the caller takes the full path, which scans again.
    ``rule_on(device)`` gives the rule module for the plan's device (the optimizer's rule or its copy there).

    It checks what the plan relies on -- for each tensor its gradient (present or absent as before, a plain
    contiguous tensor, alignment), parameter storage and state tensors -- and that the group's list holds the
    same tensors, and the state dict the same keys and values in the same order; every check is a comparison
    of whole lists, iterated in C (``map``), not a Python loop over the tensors."""
    fast = cache.get(("fast", id(group_params)))
    if (fast is None or fast["params"] is not group_params or fast["state"] is not state
            or len(group_params) != len(fast["members"])):
        return None
    device = fast["plan"]["device"]
    rule = rule_on(device)  # the rule on the plan's device: the same module as when the plan was recorded
    if rule is not fast["rule"]:
        return None
    cfg = launch_config()
    if cfg["BLOCK"] != fast["block"]:
        return None
    keys, values = fast["keys"], fast["values"]
    is_ = operator.is_
    if (len(state) != len(keys) or not all(map(is_, state, keys)) or not all(map(is_, state.values(), values))
            or not all(map(is_, group_params, fast["members"]))):
        return None
    grads = list(map(_GRAD, group_params))
    rest: list[Tensor] = []
    try:
        for i, kind, p in fast["others"]:
            g = grads[i]
            if kind == _NO_GRAD:
                if g is not None:
                    return None
            elif kind == _REST:
                if g is None or g.is_sparse:
                    return None
                rest.append(p)
            elif g is None or p.numel() != 0:  # _EMPTY: a gradient on a tensor without coordinates
                return None
        row_idx = fast["row_idx"]
        if row_idx is not None:
            grads = [grads[i] for i in row_idx]
        n = len(grads)
        if (not all(map(is_, map(type, grads), itertools.repeat(Tensor, n)))
                or not all(map(Tensor.is_contiguous, grads))
                or list(map(Tensor.data_ptr, fast["row_params"])) != fast["pptrs"]
                or not all(map(is_, map(_RNN, fast["sts"]), fast["rnns"]))
                or not all(map(is_, map(_STEP, fast["sts"]), fast["steps"]))
                or (fast["mvs"] is not None and not all(map(is_, map(_MV, fast["sts"]), fast["mvs"])))):
            return None
        ptrs = list(map(Tensor.data_ptr, grads))
    except (KeyError, RuntimeError):  # e.g. a state dict emptied in place, a sparse CSR gradient
        return None
    if fast["any_aligned"] and functools.reduce(operator.or_, itertools.compress(ptrs, fast["aligned"]), 0) & 15:
        return None  # a gradient lost the alignment of its vectorised launch
    _, counts = _launch(rule, fast["plan"], ptrs, lr, maximize, device, cfg)
    return rest, counts


def _scan(rule: Rule, params: Sequence[Tensor], state, flat_pair, block: int, device: torch.device,
          cache: dict) -> dict:
    """Check every tensor of the group and lay out the launches: one per (parameter, gradient, state dtype,
    vector width) class, each with its table (gradient pointers filled in per step), steps and block map."""
    dev = params[0].get_device()  # -1 on the CPU; an int compares faster than torch.device objects
    is_rnnprop = isinstance(rule, RNNpropRule)
    nw = len(_weight_tensors(rule))
    rest: list[Tensor] = []
    rows: list[tuple] = []  # (p, st, rnn, mv, step, param ptr, aligned) of the tensors the kernel takes
    grads: list[int] = []
    buffers: list[tuple] = []
    keep: list[Tensor] = []
    classes: dict[tuple, list] = {}
    reusable = True
    for p in params:
        st = state[p]
        g = p.grad
        rnn = st["rnn"]
        mv = st["mv"] if is_rnnprop else rnn
        if (type(p) not in _PLAIN or type(g) is not Tensor or rnn.get_device() != dev or mv.get_device() != dev
                or rnn.dtype not in _TL_DTYPES or mv.dtype is not rnn.dtype or not rnn.is_contiguous()
                or not mv.is_contiguous()):
            rest.append(p)
            continue
        if p.dtype in _TL_DTYPES and p.is_contiguous() and g.is_contiguous():  # g has p's dtype (autograd's rule)
            flat_g, target = g, p
        else:  # a layout the plan cannot re-check cheaply: scanned again at every step
            flat_g, target, buffer = flat_pair(p)
            if target.dtype not in _TL_DTYPES or flat_g.dtype not in _TL_DTYPES:
                rest.append(p)
                continue
            reusable = False
            keep.append(flat_g)  # may be a temporary copy of the gradient: alive until the launch
            if buffer is not None:
                buffers.append((p, buffer))
        step = st["step"]
        if step.get_device() != dev or step.dtype is not torch.float32:  # first fused step: move it, once
            step = st["step"] = step.to(device, torch.float32)
        ptrs = (flat_g.data_ptr(), target.data_ptr(), rnn.data_ptr(), mv.data_ptr(), step.data_ptr())
        n = target.numel()
        # 16-byte aligned pointers and numel % 4 == 0 (most tensors): 4-element vector loads and stores
        vec = 4 if n % 4 == 0 and not (ptrs[0] | ptrs[1] | ptrs[2] | ptrs[3]) & 15 else 1
        classes.setdefault((target.dtype, flat_g.dtype, rnn.dtype, vec), []).append((len(rows), ptrs, n, step))
        rows.append((p, st, rnn, mv if is_rnnprop else None, step, p.data_ptr(), vec == 4))
        grads.append(ptrs[0])
    launches = []
    count_at = 0  # each launch's first entry in the counts of skipped tensors, one per program of its last kernel
    for kind, entries in classes.items():
        table = array("q", bytes(8 * nw))
        numels = []
        first = 0
        for _, ptrs, n, _ in entries:
            table.extend(ptrs)
            table.extend((n, first))
            numels.append(n)
            first += -(-n // block)
        launches.append({"kind": kind, "rows": [e[0] for e in entries], "table": table, "blocks": first,
                         "block_map": _block_map(tuple(numels), block, device, cache),
                         "skip": torch.zeros(len(entries), dtype=torch.int32, device=device),  # cleared after use
                         "count_at": count_at, "every_row": len(classes) == 1})
        count_at += -(-len(entries) // _STEP_ROWS)
    return {"rows": rows, "grads": grads, "launches": launches, "rest": rest, "buffers": buffers,
            "keep": keep, "reusable": reusable, "block": block, "device": device,
            "counts": torch.zeros(count_at, dtype=torch.int32, device=device)}


# ---------------------------------------------------------------------------------------- ahead-of-time compile
def variants(rules=("dm", "rnnprop"), dtypes=(torch.float32, torch.bfloat16, torch.float16), vecs=(1, 4),
             block: int | None = None, configs=None) -> list[dict]:
    """The kernel variants a launch can ask for: per rule (and config), state dtype, parameter dtype, VEC."""
    cfg = launch_config()
    out = []
    for rule in rules:
        for config in (configs or [{}]):
            built = L2ODMRule(**config) if rule == "dm" else RNNpropRule(**config)
            for s_dtype in dtypes:
                for p_dtype in dtypes:
                    for vec in vecs:
                        out.append(dict(rule=rule, hidden=built.hidden_size, layers=built.num_layers, s=s_dtype,
                                        p=p_dtype, vec=vec, block=block or cfg["BLOCK"], warps=cfg["num_warps"],
                                        precision=cfg["PRECISION"], maxnreg=cfg["maxnreg"]))
    return out


def _specialisation(v: dict) -> dict:
    """The compile-time arguments (constexprs) of one variant."""
    return dict(RULE=_RULE_IDS[v["rule"]], NUM_LAYERS=v["layers"], H=v["hidden"],
                HP=max(16, triton.next_power_of_2(v["hidden"])), BLOCK=v["block"], G_DTYPE=_TL_DTYPES[v["p"]],
                P_DTYPE=_TL_DTYPES[v["p"]], S_DTYPE=_TL_DTYPES[v["s"]], PRECISION=v["precision"],
                NW=4 + 4 * v["layers"], NCOL=_NCOL, VEC=v["vec"])


def _compile(v: dict) -> str:
    _lstm_step_kernel.warmup(
        torch.int64, torch.int32, torch.int32, 1.0, 1.0, 0.5, 0.5, 1e-8, 0.5, 0.5, 0.01, grid=(1,),
        **_specialisation(v),
        num_warps=v["warps"], **({"maxnreg": v["maxnreg"]} if v.get("maxnreg") else {}))
    nw = _specialisation(v)["NW"]  # the small launches around the step
    _nonfinite_kernel.warmup(torch.int64, torch.int32, torch.int32, grid=(1,), BLOCK=v["block"],
                             G_DTYPE=_TL_DTYPES[v["p"]], NW=nw, NCOL=_NCOL, num_warps=2)
    _advance_steps_kernel.warmup(torch.int64, torch.int32, torch.int32, 7, grid=(1,), NW=nw, NCOL=_NCOL,
                                 R=_STEP_ROWS, num_warps=4)
    return f"{v['rule']} H={v['hidden']} L={v['layers']} state={v['s']} param={v['p']} VEC={v['vec']}"


def compile_for(v: dict, arch: int = 90):
    """Compile one variant (an entry of :func:`variants`) for an NVIDIA GPU of compute capability ``arch``
    (90: H100 / H200) without that GPU, or any GPU: Triton's compiler and the ptxas of its wheel, down to
    the cubin. Returns Triton's ``CompiledKernel`` (``asm["ptx"]``, ``asm["cubin"]``, ``metadata.shared``).
    Checks what Triton's interpreter cannot: that the kernel lowers for the real target."""
    const = _specialisation(v)
    signature = {n: "constexpr" if n in const else "*i64" if n == "table" else "*i32" if n in ("block_map", "skip")
                 else "fp32" for n in _lstm_step_kernel.arg_names}
    options = {"num_warps": v["warps"], **({"maxnreg": v["maxnreg"]} if v.get("maxnreg") else {})}
    return compile_source(_lstm_step_kernel, signature, const, arch, options)


def precompile(variant_list: list[dict] | None = None, processes: int | None = None) -> list[str]:
    """Compile kernel variants into Triton's on-disk cache in parallel processes (a cold cache costs seconds
    per variant at the first step that needs it). Needs the GPU the kernels will run on."""
    import concurrent.futures
    import multiprocessing

    variant_list = variants() if variant_list is None else variant_list
    processes = processes or min(len(variant_list), os.cpu_count() or 1)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=ctx) as pool:
        return list(pool.map(_compile, variant_list))
