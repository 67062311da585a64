"""The element-wise part of the rules' LSTM cell as two Triton kernels, forward and backward, for a GPU.

``rules.base.lstm_cell`` computes the four gates' pre-activations of N coordinates with one matrix product, a
feature-major (4H, N) tensor; the rest of the cell is element-wise::

    c' = sigmoid(f) * c + sigmoid(i) * tanh(g),    h' = sigmoid(o) * tanh(c')

In eager torch on a GPU that is 9 kernels forward and 13 backward (sigmoids, tanhs, products, sums and the
``cat`` of the four gate gradients), each a pass through memory: 88 B forward and 176 B backward per hidden unit
and coordinate in float32. Here the forward is one kernel (reads the gates and c, writes h' and c': 28 B) that
keeps only its two inputs for the backward, and the backward is one kernel that recomputes the activations from
them (reads the gates, c, dh' and dc', writes the gates' gradient and dc: 48 B), 3.5x less traffic. A whole
meta-training step moves about half the bytes with them (``benchmarks/meta_traffic.py``): the cell is most of
the rule's traffic, beside the matrix products, the preprocessing and the head.

``tanh`` is the rule's own ``2 sigmoid(2x) - 1`` and sigmoid ``1 / (1 + exp(-x))``, as in the fused step
(``kernels.lstm``); the maths is float32. Tests compare both kernels with torch's autograd of the plain maths
through Triton's interpreter (CPU tensors), and a whole meta-training unroll (losses and meta-gradient) with
and without them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from .lstm import _sigmoid, compile_source, device_guard, warm_up

BLOCK = 1024  # elements of the (H, n) cell state per program on a GPU
WARPS = 4


@triton.jit
def _tanh(x):
    return 2.0 * _sigmoid(2.0 * x) - 1.0


@triton.jit
def _c_offsets(e, n, c_stride, C_CONTIGUOUS: tl.constexpr):
    if C_CONTIGUOUS:
        return e
    return (e // n) * c_stride + e % n


@triton.jit
def _cell_forward_kernel(gates, c, h_out, c_out, hn, n, c_stride, C_CONTIGUOUS: tl.constexpr, BLOCK: tl.constexpr):
    """Elements [pid BLOCK, (pid + 1) BLOCK) of the flat (H, n) outputs. ``gates`` is (4H, n) contiguous (the
    i, f, g, o blocks of H rows: gate k of element e at k H n + e), ``c`` (H, n) with row stride ``c_stride``,
    the outputs (H, n) contiguous."""
    hn = hn.to(tl.int64)  # 4 H n may pass 2^31 where H n does not
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < hn
    i = tl.load(gates + e, mask=mask, other=0.0)
    f = tl.load(gates + hn + e, mask=mask, other=0.0)
    g = tl.load(gates + 2 * hn + e, mask=mask, other=0.0)
    o = tl.load(gates + 3 * hn + e, mask=mask, other=0.0)
    c_prev = tl.load(c + _c_offsets(e, n, c_stride, C_CONTIGUOUS), mask=mask, other=0.0)
    c_new = _sigmoid(f) * c_prev + _sigmoid(i) * _tanh(g)
    tl.store(c_out + e, c_new, mask=mask)
    tl.store(h_out + e, _sigmoid(o) * _tanh(c_new), mask=mask)


@triton.jit
def _cell_backward_kernel(gates, c, dh, dc, d_gates, dc_prev, hn, n, c_stride, C_CONTIGUOUS: tl.constexpr,
                          HAS_DH: tl.constexpr, HAS_DC: tl.constexpr, WRITE_DC: tl.constexpr,
                          BLOCK: tl.constexpr):
    """The gradient of the forward's outputs (dh, dc: (H, n) contiguous, either absent) with respect to its
    inputs, the activations recomputed from the inputs."""
    hn = hn.to(tl.int64)
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < hn
    si = _sigmoid(tl.load(gates + e, mask=mask, other=0.0))
    sf = _sigmoid(tl.load(gates + hn + e, mask=mask, other=0.0))
    tg = _tanh(tl.load(gates + 2 * hn + e, mask=mask, other=0.0))
    so = _sigmoid(tl.load(gates + 3 * hn + e, mask=mask, other=0.0))
    c_prev = tl.load(c + _c_offsets(e, n, c_stride, C_CONTIGUOUS), mask=mask, other=0.0)
    tc = _tanh(sf * c_prev + si * tg)
    if HAS_DC:
        d_c = tl.load(dc + e, mask=mask, other=0.0)
    else:
        d_c = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_DH:
        d_h = tl.load(dh + e, mask=mask, other=0.0)
        d_c += d_h * so * (1.0 - tc * tc)
        tl.store(d_gates + 3 * hn + e, d_h * tc * so * (1.0 - so), mask=mask)
    else:
        tl.store(d_gates + 3 * hn + e, tl.zeros([BLOCK], dtype=tl.float32), mask=mask)
    tl.store(d_gates + e, d_c * tg * si * (1.0 - si), mask=mask)
    tl.store(d_gates + hn + e, d_c * c_prev * sf * (1.0 - sf), mask=mask)
    tl.store(d_gates + 2 * hn + e, d_c * si * (1.0 - tg * tg), mask=mask)
    if WRITE_DC:
        tl.store(dc_prev + e, d_c * sf, mask=mask)


def _launch_shape(c: Tensor) -> tuple[tuple[int], dict]:
    """Grid and meta-parameters: BLOCK elements per program on a GPU; under Triton's interpreter (CPU tensors,
    which it runs one program at a time) as few programs as possible."""
    hidden, n = c.shape
    block = BLOCK if c.device.type == "cuda" else min(triton.next_power_of_2(max(hidden * n, 16)), 1 << 18)
    meta = dict(C_CONTIGUOUS=c.stride(0) == n or hidden == 1, BLOCK=block, num_warps=WARPS)
    return (triton.cdiv(hidden * n, block),), meta


def cell_forward(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """(h', c') of the cell from the gates' pre-activations (4H, n) and the cell state (H, n)."""
    hidden, n = c.shape
    h_out = torch.empty((hidden, n), dtype=c.dtype, device=c.device)
    c_out = torch.empty_like(h_out)
    grid, meta = _launch_shape(c)
    with device_guard(c.device):
        _cell_forward_kernel[grid](gates, c, h_out, c_out, hidden * n, n, c.stride(0), **meta)
    return h_out, c_out


def cell_backward(gates: Tensor, c: Tensor, dh: Tensor | None, dc: Tensor | None,
                  need_dc: bool = True) -> tuple[Tensor, Tensor | None]:
    """(d gates, d c) from the gradients of h' and c' (None: zero)."""
    hidden, n = c.shape
    d_gates = torch.empty_like(gates)
    dc_prev = torch.empty((hidden, n), dtype=c.dtype, device=c.device) if need_dc else None
    dh = dh.contiguous() if dh is not None else None
    dc = dc.contiguous() if dc is not None else None
    grid, meta = _launch_shape(c)
    with device_guard(c.device):
        _cell_backward_kernel[grid](gates, c, dh if dh is not None else d_gates, dc if dc is not None else d_gates,
                                    d_gates, dc_prev if need_dc else d_gates, hidden * n, n, c.stride(0),
                                    HAS_DH=dh is not None, HAS_DC=dc is not None, WRITE_DC=need_dc, **meta)
    return d_gates, dc_prev


class FusedCell(torch.autograd.Function):
    """``(gates, c) -> (h', c')`` through the two kernels; differentiable once (the meta-gradient of an unroll
    is a first derivative of the rule)."""

    @staticmethod
    def forward(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        return cell_forward(gates, c)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)

    @staticmethod
    @once_differentiable
    def backward(ctx, dh: Tensor | None, dc: Tensor | None):
        gates, c = ctx.saved_tensors
        if dh is None and dc is None:
            return None, None
        d_gates, dc_prev = cell_backward(gates, c, dh, dc, need_dc=ctx.needs_input_grad[1])
        return d_gates, dc_prev


def check_compiles(gates: Tensor, c: Tensor) -> None:
    """Compile and load both kernels for ``gates``' device (Triton's warm-up, no launch); raises whatever
    Triton raises when this GPU cannot run them."""
    hidden, n = c.shape
    grid, meta = _launch_shape(c)
    with device_guard(c.device):
        for kernel, args, extra in (
                (_cell_forward_kernel, (gates, c, c, c, hidden * n, n, c.stride(0)), {}),
                (_cell_backward_kernel, (gates, c, c, c, gates, c, hidden * n, n, c.stride(0)),
                 dict(HAS_DH=True, HAS_DC=True, WRITE_DC=True))):
            warm_up(kernel, *args, grid=grid, **meta, **extra)


def compile_for(arch: int = 90, contiguous: bool = True) -> list:
    """Both kernels compiled for an NVIDIA GPU of compute capability ``arch`` without one (Triton's compiler
    and the ptxas of its wheel; see ``lstm.compile_for``): the forward and the full backward, as a GPU compiles
    them at their first use. Returns Triton's ``CompiledKernel``s."""
    out = []
    for kernel, extra in ((_cell_forward_kernel, {}),
                          (_cell_backward_kernel, dict(HAS_DH=True, HAS_DC=True, WRITE_DC=True))):
        const = dict(C_CONTIGUOUS=contiguous, BLOCK=BLOCK, **extra)
        signature = {n: "constexpr" if n in const else "i64" if n in ("hn", "n", "c_stride") else "*fp32"
                     for n in kernel.arg_names}
        out.append(compile_source(kernel, signature, const, arch, {"num_warps": WARPS}))
    return out
