"""The interface every update rule implements, and the small pieces the rules share.

A rule is an ``nn.Module`` over a flat batch of coordinates::

    state = rule.init_state(layout)               # layout: the parameter shapes, in order
    update, state = rule(grad_flat, state, step)  # update = delta theta, *added* to theta

``grad_flat`` is the concatenation of the flattened gradients of the tensors in ``layout``;
``state`` is a dict of tensors; ``step`` is the 1-based step number (int or 0-d tensor).
``forward`` is a pure function of its inputs (it never mutates ``state``) and differentiable
with respect to the rule's weights, so the optimizer runs it under ``no_grad`` and the
meta-trainer runs the very same module inside a differentiable unroll.

Coordinate-wise rules (``coordinatewise = True``) treat every coordinate independently: any
slice of the coordinates can be processed on its own, which is what lets the optimizer work in
bounded chunks.

Layout of the tensors: per-coordinate state tensors are *feature-major*, shape (features, N), with
the coordinates on the last dimension. Every gate or feature is then a contiguous row block, so
the element-wise maths runs on contiguous memory (strided column slices of an (N, features)
tensor are several times slower on the CPU).
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import kernels

State = Dict[str, Tensor]
Layout = Sequence[Tuple[int, ...]]


def layout_numels(layout: Layout) -> list[int]:
    return [math.prod(shape) for shape in layout]


class Rule(nn.Module):
    """Base class of the learned update rules."""

    #: registry name, written into weight files
    name: str = ""
    #: True when every coordinate is updated independently of the others
    coordinatewise: bool = True
    #: values meant by config keys that a stored config (weight file, checkpoint) lacks because it was
    #: written before the key existed; fresh rules use the constructor's defaults
    legacy_config: dict = {}

    def state_kinds(self) -> dict[str, str]:
        """How each state key is indexed on its last dimension: ``coord`` (one column per coordinate),
        ``tensor`` (one column per tensor of the layout), ``global`` (one column for the whole layout)
        or ``layout`` (derived from the layout, not stored)."""
        return {"rnn": "coord"}

    def config(self) -> dict:
        """The constructor arguments, JSON-serialisable; ``type(self)(**config)`` rebuilds the rule."""
        raise NotImplementedError

    def init_state(self, layout: Layout, *, device=None, generator: torch.Generator | None = None) -> State:
        raise NotImplementedError

    def forward(self, grad: Tensor, state: State, step) -> Tuple[Tensor, State]:  # pragma: no cover
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items())


def as_step(step, like: Tensor) -> Tensor:
    """``step`` (an int or a tensor) as a tensor of ``like``'s dtype on its device. A Python number is filled in
    on the device (``torch.full``) rather than copied from the host, which on CUDA would wait for the stream at
    every step of an unroll."""
    if isinstance(step, Tensor):
        return step.to(device=like.device, dtype=like.dtype)
    return torch.full((), float(step), dtype=like.dtype, device=like.device)


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small host tensor (indices, step counts, a pointer table) on ``device`` without waiting: to a GPU
    through pinned memory, non-blocking (a copy from pageable memory synchronises the stream); elsewhere a
    plain ``.to``."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def truncated_normal_(tensor: Tensor, std: float) -> Tensor:
    """Truncated normal at two standard deviations (sonnet's default initialiser)."""
    return nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, cell: nn.LSTMCell) -> Tuple[Tensor, Tensor]:
    """One step of ``cell`` on feature-major tensors: x (in, N), h and c (hidden, N).

    Same maths as ``nn.LSTMCell`` (gate order i, f, g, o; ``tests/test_rules.py`` checks it against
    ``nn.LSTMCell`` itself), written so the two matrix products accumulate into one buffer and
    every gate is a contiguous block of rows.
    """
    weight = torch.cat((cell.weight_ih, cell.weight_hh), dim=1)
    gates = torch.addmm((cell.bias_ih + cell.bias_hh)[:, None], weight, torch.cat((x, h), dim=0))
    if not torch.compiler.is_compiling() and (gates.device.type == "cuda" or kernels.cell_on_cpu()):
        fused = kernels.fused_cell(gates, c)  # the element-wise rest in one kernel, forward and backward
        if fused is not None:
            return fused
    i, f, g, o = gates.chunk(4, dim=0)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * fast_tanh(g)
    h_new = torch.sigmoid(o) * fast_tanh(c_new)
    return h_new, c_new


def fast_tanh(x: Tensor) -> Tensor:
    """tanh(x), on the CPU as 2 sigmoid(2x) - 1: on the CPU builds we ship against, ``torch.tanh`` is several
    times slower than ``torch.sigmoid`` (one core, a (20, 15910) float32 tensor: 1.2 ms against 0.22 ms, this
    form 0.33 ms), and this form costs a few ulp (abs. error ~2e-7).
    Elsewhere (CUDA) ``torch.tanh`` itself: one element-wise kernel instead of four, and in a backward one
    instead of three, where every kernel's cost is its memory traffic."""
    if x.device.type != "cpu":
        return torch.tanh(x)
    return torch.sigmoid(2.0 * x).mul(2.0).sub(1.0)


def init_lstm_sonnet_(cell: nn.LSTMCell, forget_bias: float = 1.0) -> None:
    """Sonnet-1 LSTM initialisation: weights truncated-normal with std 1/sqrt(fan_in) where
    fan_in = input + hidden; biases zero except the forget gate (sonnet's ``forget_bias``)."""
    hidden = cell.hidden_size
    std = 1.0 / math.sqrt(cell.input_size + hidden)
    with torch.no_grad():
        truncated_normal_(cell.weight_ih, std)
        truncated_normal_(cell.weight_hh, std)
        cell.bias_ih.zero_()
        cell.bias_hh.zero_()
        cell.bias_ih[hidden : 2 * hidden] = forget_bias


def init_linear_sonnet_(linear: nn.Linear) -> None:
    with torch.no_grad():
        truncated_normal_(linear.weight, 1.0 / math.sqrt(linear.in_features))
        if linear.bias is not None:
            linear.bias.zero_()
