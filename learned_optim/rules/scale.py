"""L2O-Scale (Wichrowska et al. 2017), the hierarchical RNN optimizer, without attention.

Three GRUs: per coordinate (10 units), per tensor (20) and global (20). Each coordinate sees 12
features: 4 momentum timescales of the gradient, RMS-normalised and squashed with asinh; the 3
products of neighbouring timescales; 4 log-mean-square deviations; and its log learning rate
relative to the mean over the whole problem. The per-coordinate GRU receives a bias injected from
the tensor and global GRUs. The update is an RMS-normalised direction (per tensor) times
exp(log-lr), where log-lr has learned momentum.

Structure note: the cells are standard ``nn.GRUCell`` modules (torch's GRU variant, reset gate
applied after the hidden matrix product) plus injected biases on the input side, rather than
the TF ``BiasGRUCell``; the initial constants (gate bias 2.2, weight scale 0.5/sqrt(fan_in),
readout biases 3.2 and 2.2, step-size offset -1, lr momentum logit 3.2) follow the original.

State (feature-major, coordinates last): ``coord`` (21, N) = rows [h (10); momenta a (4);
mean squares ms (4); log_lr; scl_decay; inp_decay], ``tensor`` (20, T), ``glob`` (20, 1),
``numels`` (T,) the tensor sizes of the layout.

Initial log learning rates (``init_state``): per coordinate U(ln(min_lr)/2, ln(max_lr)/2) plus an
offset from the same range. ``lr_offset="tensor"`` draws one offset per tensor, as the original's
``_initialize_state(var)`` does per variable; ``"shared"`` draws one for the whole layout, which is
what learned_optim did before this key existed, and what a stored config without the key means
(``legacy_config``), so weight files written then keep computing what they computed.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Rule, State, as_step, layout_numels

NUM_SCALES = 4
NUM_FEATURES = 3 * NUM_SCALES  # 4 + 3 + 4 + 1
_H, _A, _MS = slice(0, 10), slice(10, 14), slice(14, 18)
_LOGLR, _SCL, _INP = 18, 19, 20


def _init_gru_(cell: nn.GRUCell, scale: float = 0.5, gate_bias: float = 2.2) -> None:
    hidden = cell.hidden_size
    with torch.no_grad():
        nn.init.normal_(cell.weight_ih, std=scale / math.sqrt(cell.input_size + hidden))
        nn.init.normal_(cell.weight_hh, std=scale / math.sqrt(cell.input_size + hidden))
        cell.bias_ih.zero_()
        cell.bias_hh.zero_()
        cell.bias_ih[: 2 * hidden] = gate_bias  # reset and update gates


def gru_cell(x: Tensor, h: Tensor, cell: nn.GRUCell, injected: Tensor | None = None) -> Tensor:
    """``nn.GRUCell`` maths on feature-major tensors (x (in, N), h (hidden, N)) with an optional
    bias (3*hidden, N or 1) injected on the input side."""
    gi = torch.addmm(cell.bias_ih[:, None], cell.weight_ih, x)
    if injected is not None:
        gi = gi + injected
    gh = torch.addmm(cell.bias_hh[:, None], cell.weight_hh, h)
    i_r, i_z, i_n = gi.chunk(3, dim=0)
    h_r, h_z, h_n = gh.chunk(3, dim=0)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (h - n)


class _ClampST(torch.autograd.Function):
    """Clamp with a straight-through gradient (as the original's clipped log-lr). Written with
    ``setup_context`` and ``generate_vmap_rule`` so that ``torch.func.vmap`` can run the rule over a
    population of optimizees, each with its own per-tensor and global state."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, lo, hi):
        return x.clamp(lo, hi)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class L2OScaleRule(Rule):
    name = "scale"
    coordinatewise = False

    legacy_config = {"lr_offset": "shared"}
    LR_OFFSETS = ("tensor", "shared")

    def __init__(self, param_hidden: int = 10, tensor_hidden: int = 20, global_hidden: int = 20,
                 min_lr: float = 1e-6, max_lr: float = 1e-2, lr_offset: str = "tensor"):
        super().__init__()
        if (param_hidden, tensor_hidden, global_hidden) != (10, 20, 20):
            # the packed state layout below assumes the paper's sizes
            raise ValueError("Invalid L2O-Scale sizes: only (10, 20, 20) is supported")
        if not 0 < min_lr <= max_lr:
            raise ValueError(f"Invalid learning-rate range: min_lr={min_lr}, max_lr={max_lr}")
        if lr_offset not in self.LR_OFFSETS:
            raise ValueError(f"Invalid lr_offset {lr_offset!r}: 'tensor' (one initial log-lr offset per tensor, "
                             "as the original) or 'shared' (one for all tensors)")
        self.lr_offset = lr_offset
        self.param_hidden, self.tensor_hidden, self.global_hidden = param_hidden, tensor_hidden, global_hidden
        self.min_lr, self.max_lr = float(min_lr), float(max_lr)
        ph, th, gh = param_hidden, tensor_hidden, global_hidden
        self.param_cell = nn.GRUCell(NUM_FEATURES, ph)
        self.tensor_cell = nn.GRUCell(ph + NUM_FEATURES, th)
        self.global_cell = nn.GRUCell(th, gh)
        for cell in (self.param_cell, self.tensor_cell, self.global_cell):
            _init_gru_(cell)
        # injected biases
        self.tensor_to_param = nn.Linear(th, 3 * ph)
        self.global_to_param = nn.Linear(gh, 3 * ph, bias=False)
        self.global_to_tensor = nn.Linear(gh, 3 * th)
        for lin in (self.tensor_to_param, self.global_to_param, self.global_to_tensor):
            nn.init.normal_(lin.weight, std=0.5 / math.sqrt(lin.in_features))
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        # readouts from the per-coordinate state
        self.direction = nn.Linear(ph, 1, bias=False)
        self.shortcut = nn.Linear(NUM_SCALES, 1, bias=False)
        self.scl_decay = nn.Linear(ph, 1)
        self.inp_decay = nn.Linear(ph, 1)
        self.log_lr = nn.Linear(ph, 1)
        with torch.no_grad():
            for lin in (self.direction, self.scl_decay, self.inp_decay):
                nn.init.normal_(lin.weight, std=0.5 / math.sqrt(ph))
            nn.init.normal_(self.shortcut.weight, mean=1.0 / NUM_SCALES, std=0.05)
            self.scl_decay.bias.fill_(3.2)
            self.inp_decay.bias.fill_(2.2)
            nn.init.zeros_(self.log_lr.weight)
            nn.init.zeros_(self.log_lr.bias)
        self.lr_momentum_logit = nn.Parameter(torch.tensor(3.2))
        self.stepsize_offset = nn.Parameter(torch.tensor(-1.0))
        # learned initial states
        self.param_init = nn.Parameter(torch.empty(ph).uniform_(-1, 1))
        self.tensor_init = nn.Parameter(torch.empty(th).uniform_(-1, 1))
        self.global_init = nn.Parameter(torch.empty(gh).uniform_(-1, 1))

    def config(self) -> dict:
        return {"param_hidden": self.param_hidden, "tensor_hidden": self.tensor_hidden,
                "global_hidden": self.global_hidden, "min_lr": self.min_lr, "max_lr": self.max_lr,
                "lr_offset": self.lr_offset}

    def state_kinds(self) -> dict[str, str]:
        return {"coord": "coord", "tensor": "tensor", "glob": "global", "numels": "layout"}

    def init_state(self, layout, *, device=None, generator=None, select=None) -> State:
        """The initial state of ``layout``. ``select`` (one entry per tensor: None for all of its coordinates,
        or a 1-D index tensor into its flattened coordinates) keeps only those coordinates of the per-coordinate
        state, with the log learning rates they have in the whole layout's draw (a shard of a tensor starts
        where the same coordinates of the unsharded tensor start)."""
        numels = layout_numels(layout)
        n, t = sum(numels), len(numels)
        dev = device if device is not None else self.param_init.device
        lo, hi = math.log(self.min_lr) / 2, math.log(self.max_lr) / 2
        per_tensor = self.lr_offset == "tensor"
        u = lo + (hi - lo) * torch.rand(n + (t if per_tensor else 1), generator=generator, device="cpu")
        if select is None:
            u = u.to(dev)
            offset = u[n:].repeat_interleave(torch.tensor(numels, device=dev)) if per_tensor else u[n]
            log_lr = u[:n] + offset
        else:
            if len(select) != t:
                raise ValueError(f"init_state: select has {len(select)} entries for a layout of {t} tensors")
            parts, start = [], 0
            for i, (numel, keep) in enumerate(zip(numels, select)):
                part = u[start: start + numel] + (u[n + i] if per_tensor else u[n])
                parts.append(part if keep is None else part[keep.to("cpu", torch.long)])
                start += numel
            log_lr = torch.cat(parts).to(dev) if parts else u[:0].to(dev)
            n = log_lr.numel()
        coord = torch.cat([self.param_init.to(dev)[:, None].expand(-1, n), torch.zeros(8, n, device=dev),
                           log_lr[None], torch.zeros(2, n, device=dev)], dim=0)
        return {"coord": coord, "tensor": self.tensor_init.to(dev)[:, None].expand(-1, t).clone(),
                "glob": self.global_init.to(dev)[:, None].clone(),
                "numels": torch.tensor(numels, dtype=torch.long, device=dev)}

    # ------------------------------------------------------------------ the step, in stages
    # ``forward`` is the composition of the stages below on a whole layout. The optimizer runs the same
    # stages over a param group in bounded chunks: the per-coordinate stage chunk by chunk (accumulating
    # the per-tensor sums), then the tensor stage on the sums (all-reduced first when the parameters
    # are sharded), then each tensor's unnormalised update divided by its RMS normaliser.

    #: rows of the per-tensor sums returned by ``coord_stage``: [h_new (10); features (12); direction^2 (1)]
    SUM_ROWS = 10 + NUM_FEATURES + 1

    def pre_sums(self, coords: list[Tensor]) -> Tensor:
        """(1, len(coords)): for each per-coordinate state (21, n) of ``coords``, the sums over its coordinates
        needed before the per-coordinate stage (that of the log learning rates, whose mean over the layout is
        a feature)."""
        return torch.stack([coord[_LOGLR].sum(dtype=torch.float32) for coord in coords])[None]

    def prepare(self, tensor_h: Tensor, glob_h: Tensor, pre_means: Tensor) -> dict[str, Tensor]:
        """What every coordinate needs from its tensor and the whole layout: the bias injected into the
        per-coordinate GRU from the tensor and global GRUs (3*param_hidden, T), and the mean log-lr."""
        per_tensor = torch.addmm(self.tensor_to_param.bias[:, None], self.tensor_to_param.weight, tensor_h)
        return {"injected": per_tensor + self.global_to_param.weight @ glob_h, "log_lr_mean": pre_means[0]}

    def coord_stage(self, grad: Tensor, coord: Tensor, context: dict[str, Tensor], step, columns: Tensor | None,
                    sizes: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """The per-coordinate maths on a batch of coordinates made of segments of ``sizes`` coordinates, the
        segment ``i`` belonging to tensor ``columns[i]`` of the layout (None: the segments are the tensors).

        Returns the unnormalised update (n,) (the direction before the per-tensor RMS normalisation, times
        the step size), the new per-coordinate state (21, n) and the segments' sums (SUM_ROWS, len(sizes)).
        """
        h, a_prev, ms_prev = coord[_H], coord[_A], coord[_MS]
        log_lr, scl, inp = coord[_LOGLR], coord[_SCL], coord[_INP]
        # momenta at 4 timescales, each twice the previous one
        powers = 0.5 ** torch.arange(NUM_SCALES, device=grad.device, dtype=grad.dtype)
        d = inp[None] ** powers[:, None]
        a = (1 - d) * grad[None] + d * a_prev
        first = as_step(step, grad) <= 1
        sd = torch.where(first, torch.zeros_like(scl), scl)[None]
        ms = (1 - sd) * (a * a + 1e-12) + sd * ms_prev
        s = torch.asinh(a / torch.sqrt(ms + 1e-16))
        log_ms = torch.log(ms + 1e-16)
        feats = torch.cat([s, s[:-1] * s[1:], log_ms - log_ms.mean(0, keepdim=True),
                           (log_lr - context["log_lr_mean"])[None]], dim=0)
        injected = context["injected"]
        if columns is not None:
            injected = injected.index_select(1, columns)
        if len(sizes) > 1:  # each segment's column over its coordinates (a cat of expanded views, not a gather)
            injected = torch.cat([col.expand(-1, size) for col, size in zip(injected.split(1, dim=1), sizes)], dim=1)
        h_new = gru_cell(feats, h, self.param_cell, injected)
        direction = (self.direction.weight @ h_new + self.shortcut.weight @ s).squeeze(0)
        step_log_lr = _ClampST.apply(log_lr + (self.log_lr.weight @ h_new).squeeze(0) + self.log_lr.bias,
                                     -33.0, 33.0)
        lrm = torch.sigmoid(self.lr_momentum_logit)
        new_log_lr = lrm * log_lr + (1 - lrm) * step_log_lr
        raw_update = -torch.exp(step_log_lr + self.stepsize_offset) * direction
        scl_new = torch.sigmoid(torch.addmm(self.scl_decay.bias[:, None], self.scl_decay.weight, h_new))
        inp_new = torch.sigmoid(torch.addmm(self.inp_decay.bias[:, None], self.inp_decay.weight, h_new))
        new_coord = torch.cat([h_new, a, ms, new_log_lr[None], scl_new, inp_new], dim=0)
        stats = torch.cat([h_new, feats, direction[None] ** 2], dim=0)
        if len(sizes) == 1:
            sums = stats.sum(1, keepdim=True)
        else:  # split+sum is much faster than index_add
            sums = torch.stack([part.sum(1) for part in stats.split(sizes, dim=1)], dim=1)
        return raw_update, new_coord, sums

    def tensor_stage(self, sums: Tensor, numels: Tensor, tensor_h: Tensor, glob_h: Tensor
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """The per-tensor and global GRUs on the per-tensor sums (SUM_ROWS, T) over each tensor's ``numels``
        coordinates: returns the RMS normaliser of each tensor's direction (T,), the new tensor state (20, T)
        and the new global state (20, 1). A tensor's update is its unnormalised update / its normaliser."""
        means = sums / numels.to(sums.dtype)
        ph = self.param_hidden
        tensor_new = gru_cell(means[: ph + NUM_FEATURES], tensor_h, self.tensor_cell,
                              torch.addmm(self.global_to_tensor.bias[:, None], self.global_to_tensor.weight, glob_h))
        glob_new = gru_cell(tensor_new.mean(1, keepdim=True), glob_h, self.global_cell)
        return torch.sqrt(means[ph + NUM_FEATURES] + 1e-16), tensor_new, glob_new

    def host_sizes(self, numels: Tensor) -> list[int]:
        """``numels.tolist()``, remembered for that tensor: a layout's sizes do not change along an unroll, and
        reading them back from a GPU at every step would wait for the stream."""
        memo = self.__dict__.get("_host_sizes")
        if memo is None or memo[0] is not numels:
            memo = self.__dict__["_host_sizes"] = (numels, numels.tolist())
        return memo[1]

    def forward(self, grad: Tensor, state: State, step):
        coord, numels = state["coord"], state["numels"]
        tensor_h, glob_h = state["tensor"], state["glob"]
        sizes = self.host_sizes(numels)
        pre = self.pre_sums(list(coord.split(sizes, dim=1))).sum(1)  # tensor by tensor, as the optimizer sums
        context = self.prepare(tensor_h, glob_h, pre / coord.shape[1])
        raw_update, new_coord, sums = self.coord_stage(grad, coord, context, step, None, sizes)
        norm, tensor_new, glob_new = self.tensor_stage(sums, numels, tensor_h, glob_h)
        update = raw_update / norm.repeat_interleave(numels, output_size=grad.numel())
        return update, {"coord": new_coord, "tensor": tensor_new, "glob": glob_new, "numels": numels}
