"""L2O-DM (Andrychowicz et al. 2016) as trained by Chen et al. 2020.

LogAndSign preprocessing (k=5) -> LSTMCell(2, 20) -> LSTMCell(20, 20) -> Linear(20, 1) x 0.01,
shared by every coordinate; the output is added to the parameter. The forget-gate bias starts
at +1 (sonnet's ``forget_bias``). State: ``rnn`` (80, N) = rows [h1; c1; h2; c2], 80 floats per
coordinate.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Rule, State, init_linear_sonnet_, init_lstm_sonnet_, layout_numels, lstm_cell

#: float32 machine epsilon, as in the original LogAndSign
_EPS = float(torch.finfo(torch.float32).eps)


def log_and_sign(grad: Tensor, k: float) -> Tensor:
    """(N,) -> (2, N): [max(log(|g| + eps) / k, -1), clip(g * e^k, -1, 1)]."""
    log = torch.clamp(torch.log(grad.abs() + _EPS) / k, min=-1.0)
    sign = torch.clamp(grad * math.exp(k), -1.0, 1.0)
    return torch.stack((log, sign), dim=0)


class L2ODMRule(Rule):
    name = "dm"
    coordinatewise = True

    def __init__(self, hidden_size: int = 20, num_layers: int = 2, k: float = 5.0, output_scale: float = 0.01):
        super().__init__()
        if hidden_size < 1 or num_layers < 1:
            raise ValueError(f"Invalid L2O-DM size: hidden_size={hidden_size}, num_layers={num_layers}")
        self.hidden_size, self.num_layers = int(hidden_size), int(num_layers)
        self.k, self.output_scale = float(k), float(output_scale)
        sizes = [2] + [self.hidden_size] * self.num_layers
        self.cells = nn.ModuleList(nn.LSTMCell(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.output = nn.Linear(self.hidden_size, 1)
        for cell in self.cells:
            init_lstm_sonnet_(cell, forget_bias=1.0)
        init_linear_sonnet_(self.output)

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "k": self.k,
                "output_scale": self.output_scale}

    @property
    def state_width(self) -> int:
        return 2 * self.hidden_size * self.num_layers

    def init_state(self, layout, *, device=None, generator=None) -> State:
        n = sum(layout_numels(layout))
        return {"rnn": torch.zeros(self.state_width, n, device=device)}

    def forward(self, grad: Tensor, state: State, step=None):
        x = log_and_sign(grad, self.k)
        parts = state["rnn"].split(self.hidden_size, dim=0)
        new = []
        for layer, cell in enumerate(self.cells):
            x, c = lstm_cell(x, parts[2 * layer], parts[2 * layer + 1], cell)
            new += [x, c]
        update = torch.addmm(self.output.bias[:, None], self.output.weight, x).squeeze(0) * self.output_scale
        return update, {"rnn": torch.cat(new, dim=0)}
