"""RNNprop (Lv et al. 2017) as trained by Chen et al. 2020.

Inputs per coordinate: bias-corrected Adam statistics [m_hat / (sqrt(v_hat) + eps), g / (sqrt(v_hat) + eps)]
with beta1 = beta2 = 0.95 -> Linear(2, 20) + ELU -> LSTMCell(20, 20) x 2 -> Linear(20, 1) -> tanh x 0.01,
added to the parameter. State: ``mv`` (2, N) = rows [m; v] and ``rnn`` (80, N) = rows
[h1; c1; h2; c2], 82 floats per coordinate.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Rule, State, as_step, init_linear_sonnet_, init_lstm_sonnet_, layout_numels, lstm_cell


class RNNpropRule(Rule):
    name = "rnnprop"
    coordinatewise = True

    def __init__(self, hidden_size: int = 20, num_layers: int = 2, beta1: float = 0.95, beta2: float = 0.95,
                 eps: float = 1e-8, output_scale: float = 0.01):
        super().__init__()
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
        if hidden_size < 1 or num_layers < 1:
            raise ValueError(f"Invalid RNNprop size: hidden_size={hidden_size}, num_layers={num_layers}")
        self.hidden_size, self.num_layers = int(hidden_size), int(num_layers)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.output_scale = float(output_scale)
        self.input_projection = nn.Linear(2, self.hidden_size)
        self.cells = nn.ModuleList(nn.LSTMCell(self.hidden_size, self.hidden_size) for _ in range(self.num_layers))
        self.output = nn.Linear(self.hidden_size, 1)
        init_linear_sonnet_(self.input_projection)
        for cell in self.cells:
            init_lstm_sonnet_(cell, forget_bias=1.0)
        init_linear_sonnet_(self.output)

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "beta1": self.beta1,
                "beta2": self.beta2, "eps": self.eps, "output_scale": self.output_scale}

    def state_kinds(self) -> dict[str, str]:
        return {"mv": "coord", "rnn": "coord"}

    @property
    def state_width(self) -> int:
        return 2 * self.hidden_size * self.num_layers

    def init_state(self, layout, *, device=None, generator=None) -> State:
        n = sum(layout_numels(layout))
        return {"mv": torch.zeros(2, n, device=device), "rnn": torch.zeros(self.state_width, n, device=device)}

    def features(self, grad: Tensor, mv: Tensor, step) -> tuple[Tensor, Tensor]:
        """Bias-corrected moment features (2, N) and the new (m, v) state (2, N)."""
        m = torch.lerp(grad, mv[0], self.beta1)
        v = torch.lerp(grad * grad, mv[1], self.beta2)
        step = as_step(step, grad)
        m_hat = m / (1.0 - self.beta1 ** step)
        denom = torch.sqrt(v / (1.0 - self.beta2 ** step)) + self.eps
        return torch.stack((m_hat / denom, grad / denom), dim=0), torch.stack((m, v), dim=0)

    def forward(self, grad: Tensor, state: State, step):
        x, mv = self.features(grad, state["mv"], step)
        x = F.elu(torch.addmm(self.input_projection.bias[:, None], self.input_projection.weight, x))
        parts = state["rnn"].split(self.hidden_size, dim=0)
        new = []
        for layer, cell in enumerate(self.cells):
            x, c = lstm_cell(x, parts[2 * layer], parts[2 * layer + 1], cell)
            new += [x, c]
        update = torch.tanh(torch.addmm(self.output.bias[:, None], self.output.weight, x).squeeze(0))
        return update * self.output_scale, {"mv": mv, "rnn": torch.cat(new, dim=0)}
