"""``LearnedOptimizer``: the thin ``torch.optim.Optimizer`` shell that runs an update rule.

The rule (``learned_optim.rules``) maps gradients and recurrent state to an update; this class
owns the bookkeeping torch users expect: param groups, ``lr`` (multiplies the rule's update, so
LR schedulers work), ``maximize``, closures, ``state_dict``/``load_state_dict``, deepcopy.

Recurrent state lives in ``self.state[p]`` as plain tensors (so ``torch.load(weights_only=True)``
works) and is kept in ``state_dtype`` (float32 by default) whatever the parameter dtype: torch's
``load_state_dict`` casts floating state to the parameter dtype, which we undo with a pair of
load hooks that restore the saved tensors exactly (bit-for-bit resume for bf16/fp16 params too).

Coordinate-wise rules (L2O-DM, RNNprop) are evaluated over the coordinates of a param group in
chunks of at most ``chunk_size`` coordinates: small tensors are packed together into one chunk
(one rule call for many tensors), large ones are cut into slices, so the temporary memory of
``step()`` is bounded by the chunk size, not the model size. L2O-Scale runs in the same chunks, in
two passes: its per-coordinate stage chunk by chunk (new state written in place, the update before
its per-tensor RMS normalisation kept in one float per coordinate, per-tensor sums accumulated),
then its per-tensor and global RNNs on the sums, then each tensor's normalised update.

On CUDA tensors L2O-DM and RNNprop take a fused Triton kernel instead (one step launch per param group,
``backend="auto"``; ``"torch"`` / ``"triton"`` force either path): same updates, same state layout,
so state dicts move between the two (``learned_optim.kernels``). ``backend="compile"`` runs the same chunks
through ``torch.compile`` of the rule (its own module, so its own tensors): generated code with the element-wise
work fused, on the CPU too, after a compilation at the first steps; same state layout again.

Distributed: under DDP every rank steps identically (same gradients after the all-reduce). FSDP2
parameters (DTensors) are stepped on each rank's local shard, with the state of its own coordinates;
L2O-Scale's per-tensor sums are all-reduced across the shards (``learned_optim.distributed``).

Non-finite gradients (policy ``nonfinite="skip"``, the default): a tensor whose gradient holds
NaN or Inf is skipped for that step, its parameter and recurrent state left untouched, and a
``RuntimeWarning`` is issued; other tensors update normally. ``nonfinite="raise"`` raises a
``FloatingPointError`` before anything is modified. The torch path checks on the host (one sync per
param group); the fused kernel checks on the device, so its ``step()`` never waits for the GPU, and on a
GPU its warning comes from a later ``step()``, once the count has reached the host (``"raise"`` checks on
the host on every path).
"""
from __future__ import annotations

import collections
import copy
import numbers
import os
import sys
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import distributed as _dist
from . import kernels
from .rules import Rule
from .rules.base import host_to_device
from .weights import load_rule, resolve_weights

_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: torch.compile backend of ``backend="compile"`` (inductor: C++ on the CPU, Triton on a GPU)
COMPILE_BACKEND = "inductor"


_NOT_USER_CODE = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))


def _warn_caller(message: str) -> None:
    """A ``RuntimeWarning`` attributed to the user's line that called ``step()``: the first frame outside this
    package and torch (whose decorators and hooks wrap ``step``), however deep that is."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_NOT_USER_CODE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, RuntimeWarning, stacklevel=level)


def _add_pieces(targets: list[Tensor], updates, lr: float) -> None:
    """``target += lr * update`` for each pair, the update first rounded to the target's dtype (as ``add_``
    would be given it): one multi-tensor add when every target is float32."""
    if all(t.dtype is torch.float32 for t in targets):
        torch._foreach_add_(targets, list(updates), alpha=lr)
    else:
        for t, u in zip(targets, updates):
            t.add_(u.to(t.dtype), alpha=lr)


def _real_view(t: Tensor) -> Tensor:
    """The real coordinates the rule sees: the local shard of a DTensor, complex numbers as pairs."""
    t = _dist.local(t)
    return torch.view_as_real(t) if t.is_complex() else t


def _memory_order_view(t: Tensor) -> Tensor | None:
    """A 1-D view of ``t``'s elements in memory order, or None when ``t`` has gaps or overlaps.

    Coordinate-wise rules do not care in which order coordinates come, only that gradient,
    parameter and state agree: a transposed (non-contiguous but dense) parameter is then processed
    in place, chunk by chunk, without any copy.
    """
    if t.is_contiguous():
        return t.view(-1)
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return None
        expected *= size
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


class LearnedOptimizer(Optimizer):
    """Run a learned update rule as a ``torch.optim.Optimizer``.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        rule: an update-rule module (``learned_optim.rules``); a string here is taken as ``weights``.
        weights: a bundled name (``learned_optim.available_weights()``), a name you exported with
            ``meta_train.export``, a path to a ``.safetensors`` file, or ``hf://org/repo[/file][@revision]``.
            Without ``weights`` (and ``rule``) the rule is the untrained initialisation, with a warning.
        lr: multiplies the rule's update (default 1.0: the rule as trained).
        maximize: maximise the objective instead of minimising it.
        chunk_size: coordinates per rule evaluation (bounds the temporary memory of ``step``).
        state_dtype: dtype of the recurrent state (float32 default; bfloat16 halves its memory).
        nonfinite: ``"skip"`` (skip tensors whose gradient is NaN/Inf, warn) or ``"raise"``.
        backend: ``"auto"`` (a fused Triton kernel for L2O-DM / RNNprop on CUDA tensors when Triton
            imports, the torch path otherwise), ``"torch"`` or ``"triton"`` (see ``learned_optim.kernels``), or
            ``"compile"`` (L2O-DM / RNNprop: the torch path's chunks through ``torch.compile`` of the rule).
        revision, cache_dir, local_files_only, endpoint, token: passed to the hub download.
    """

    rule_name: str | None = None  # set by the subclasses; checked against the weight file

    def __init__(self, params: Iterable, rule: Rule | None = None, *, weights: str | None = None, lr: float = 1.0,
                 maximize: bool = False, chunk_size: int = 8192, state_dtype: torch.dtype = torch.float32,
                 nonfinite: str = "skip", backend: str = "auto", revision: str | None = None, cache_dir=None,
                 local_files_only: bool | None = None, endpoint: str | None = None, token=None):
        name = type(self).__name__
        if isinstance(rule, (str, os.PathLike)):  # RNNprop(params, "rnnprop-cl-il"): the weights, positionally
            if weights is not None:
                raise TypeError(f"{name}() got weights twice: positionally ({rule!r}) and as weights={weights!r}")
            rule, weights = None, rule
        elif rule is not None and not isinstance(rule, Rule):
            raise TypeError(f"{name}(): the second argument is a rule module or a weights name, got "
                            f"{type(rule).__name__} {rule!r}; pass the others by keyword, e.g. "
                            f"{name}(params, weights='rnnprop-cl-il', lr=0.5)")
        if weights is not None and not isinstance(weights, (str, os.PathLike)):
            raise TypeError(f"{name}(): weights= takes a bundled name, a .safetensors path or hf://org/repo, got "
                            f"{type(weights).__name__}")
        if isinstance(lr, Tensor):
            raise ValueError("Invalid learning rate: lr as a Tensor is not supported, pass a float")
        _check_number("learning rate", lr)
        if not 0.0 <= lr or lr != lr or lr == float("inf"):
            raise ValueError(f"Invalid learning rate: {lr} (a finite float >= 0)")
        if not isinstance(maximize, bool):
            raise TypeError(f"Invalid maximize: {maximize!r} (True or False)")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"Invalid chunk_size: {chunk_size!r} (a positive int)")
        if state_dtype not in _STATE_DTYPES:
            raise ValueError(f"Invalid state_dtype: {state_dtype!r} (one of {_STATE_DTYPES})")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"Invalid nonfinite policy: {nonfinite!r} (use 'skip' or 'raise')")
        if rule is None and weights is None and self.rule_name is not None:
            _warn_untrained(name, self.rule_name)
        if rule is None:
            if weights is not None:
                path = resolve_weights(weights, revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only, endpoint=endpoint, token=token)
                rule = load_rule(path, rule=self.rule_name)
            elif self.rule_name is not None:
                from .rules import build_rule

                rule = build_rule(self.rule_name)
            else:
                raise ValueError("LearnedOptimizer needs a rule or weights=")
        elif weights is not None:
            raise ValueError("Pass either rule or weights, not both")
        if self.rule_name is not None and rule.name != self.rule_name:
            raise ValueError(f"{type(self).__name__} runs {self.rule_name!r} rules, got a {rule.name!r} rule")
        defaults = dict(lr=lr, maximize=maximize)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not support sparse parameters")
        kernels.check_backend(backend, rule, [p for group in self.param_groups for p in group["params"]])
        self.backend = backend
        self._kernel_cache: dict = {}
        self._nonfinite_pending: collections.deque = collections.deque()  # (pinned count, CUDA event)
        self._kernel_off: set = set()  # devices the fused kernel turned out not to run on (backend="auto")
        self._compiled: dict = {}
        self.rule = rule  # run under no_grad; the caller's module is not modified (it may be in training)
        self.weights = None if weights is None else str(weights)
        self.chunk_size = chunk_size
        self.state_dtype = state_dtype
        self.nonfinite = nonfinite
        self._rule_copies: dict[torch.device, Rule] = {}
        self._pending_state: dict | None = None
        self.register_load_state_dict_pre_hook(_remember_loaded_state)
        self.register_load_state_dict_post_hook(_restore_loaded_state)
        self.register_state_dict_post_hook(_add_rule_identity)
        self.register_state_dict_post_hook(_shard_state_dict)

    # ------------------------------------------------------------------ torch plumbing
    _PICKLED = ("rule", "weights", "chunk_size", "state_dtype", "nonfinite", "backend")

    def __getstate__(self) -> dict[str, Any]:
        # torch pickles only defaults/state/param_groups; the rule and our options travel too
        state = super().__getstate__()
        state.update({key: getattr(self, key) for key in self._PICKLED})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
        defaults = {"weights": None, "chunk_size": 8192, "state_dtype": torch.float32, "nonfinite": "skip",
                    "_rule_copies": {}, "_pending_state": None, "backend": "auto", "_kernel_cache": {},
                    "_compiled": {}}
        for key, value in defaults.items():
            self.__dict__.setdefault(key, value)
        self.__dict__.setdefault("_nonfinite_pending", collections.deque())
        self.__dict__.setdefault("_kernel_off", set())
        hooks = self._optimizer_load_state_dict_pre_hooks.values()
        if not any(getattr(h, "__name__", "") == _remember_loaded_state.__name__ for h in hooks):
            self.register_load_state_dict_pre_hook(_remember_loaded_state)
            self.register_load_state_dict_post_hook(_restore_loaded_state)
        if not any(getattr(h, "__name__", "") == _add_rule_identity.__name__
                   for h in self._optimizer_state_dict_post_hooks.values()):
            self.register_state_dict_post_hook(_add_rule_identity)
        if not any(getattr(h, "__name__", "") == _shard_state_dict.__name__
                   for h in self._optimizer_state_dict_post_hooks.values()):
            self.register_state_dict_post_hook(_shard_state_dict)

    def __repr__(self) -> str:
        head = super().__repr__()
        return head.replace("(\n", f"(\nRule: {self.rule.name} (weights={self.weights!r})\n", 1)

    def _rule_on(self, device: torch.device) -> Rule:
        """The rule on ``device`` (a cached copy when the parameters live elsewhere)."""
        if next(self.rule.parameters()).device == device:
            return self.rule
        rule = self._rule_copies.get(device)
        if rule is None:
            rule = self._rule_copies[device] = copy.deepcopy(self.rule).to(device)
        return rule

    def _compiled_rule(self, rule: Rule) -> Callable:
        """``torch.compile`` of ``rule`` (backend="compile"), one per rule object (the rule and its device copies)."""
        compiled = self._compiled.get(id(rule))
        if compiled is None or compiled[0] is not rule:
            compiled = self._compiled[id(rule)] = (rule, torch.compile(rule, backend=COMPILE_BACKEND, dynamic=None))
        return compiled[1]

    # ------------------------------------------------------------------ step
    # torch.compile of a training step that calls step(): dynamo leaves the step out of its graphs and runs it
    # eagerly (its plans, chunks and kernel launches are host-side work that tracing would only re-guard)
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._nonfinite_pending:
            self._report_nonfinite()
        fast = self._kernel_cache and self.backend in ("auto", "triton") and not self._kernel_off
        for group in self.param_groups:
            if fast and self._fast_step(group):
                continue
            params = [p for p in group["params"] if p.grad is not None and p.numel() > 0]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; use a dense "
                                       "embedding (sparse=False) or torch.optim.SparseAdam for those parameters")
            device = params[0].device
            fused = (self.rule.coordinatewise and self.backend not in ("torch", "compile")
                     and device not in self._kernel_off and kernels.use_kernel(self.backend, self._rule_on(device), device))
            if not fused or self.nonfinite == "raise":  # the fused kernel skips non-finite tensors itself
                params = self._drop_nonfinite(params)
                if not params:
                    continue
            self._init_group_state(group, params)
            if fused:
                try:
                    params, counts = kernels.lstm_step(
                        self._rule_on(device), params, self.state, lr=group["lr"], maximize=group["maximize"],
                        flat_pair=self._flat_pair, cache=self._kernel_cache, group_params=group["params"])
                except Exception as exc:
                    if not kernels.kernel_unavailable(exc):
                        raise
                    self._kernel_unavailable(device, exc)  # raises for backend="triton"; nothing was written
                    counts = None
                if counts is not None and self.nonfinite == "skip":
                    self._note_nonfinite(counts)
                if params:  # the tensors the kernel cannot take (all of them when it is unavailable)
                    params = self._drop_nonfinite(params) if self.nonfinite == "skip" else params
                    if params:
                        self._step_coordinatewise(group, params)
            elif self.rule.coordinatewise:
                self._step_coordinatewise(group, params)
            else:
                self._step_whole_group(group, params)
        return loss

    def _kernel_unavailable(self, device: torch.device, exc: Exception) -> None:
        """The fused kernel cannot run on ``device``: backend="triton" raises; "auto" warns once and steps that
        device's tensors on the torch path from now on."""
        name = type(self).__name__
        if self.backend == "triton":
            raise RuntimeError(f"{name}(backend='triton'): the fused kernel cannot run on {device} ({exc}); nothing "
                               "was updated. Use backend='torch' (or 'auto', which falls back to it)") from exc
        self._kernel_off.add(device)
        _warn_caller(f"{name}: the fused Triton kernel cannot run on {device} ({exc}); stepping with the torch "
                     "path instead (same updates, slower on a GPU). backend='torch' silences this")

    def _fast_step(self, group: dict) -> bool:
        """A fused step of ``group`` through the plan recorded at its last step (one pass over its tensors, no
        state initialisation or gradient filtering needed); False when the full path must run."""
        skip = self.nonfinite == "skip"
        if not skip:  # "raise": checked on the host before anything is written (sparse: the full path says so)
            with_grad = [p for p in group["params"] if p.grad is not None and p.numel() > 0]
            if not with_grad or any(p.grad.is_sparse for p in with_grad):
                return False
            self._drop_nonfinite(with_grad)
        done = kernels.fast_step(self._rule_on, group["params"], self.state, lr=group["lr"],
                                 maximize=group["maximize"], cache=self._kernel_cache)
        if done is None:
            return False
        rest, counts = done
        if skip and counts is not None:
            self._note_nonfinite(counts)
        if skip and rest:
            rest = self._drop_nonfinite(rest)
        if rest:  # the tensors the kernel cannot take, on the torch path
            self._step_coordinatewise(group, rest)
        return True

    def _init_group_state(self, group: dict, params: list[Tensor]) -> None:
        fresh = [p for p in params if len(self.state[p]) == 0]
        if not fresh:
            return
        rule = self._rule_on(fresh[0].device)
        layout = [tuple(_real_view(p).shape) for p in fresh]
        # rules with a random initial state (L2O-Scale's log learning rates) draw it from a generator
        # seeded by the parameter's position: deterministic, independent of the global RNG
        index = next(i for i, q in enumerate(q for g in self.param_groups for q in g["params"]) if q is fresh[0])
        init = _dist.init_state(rule, fresh, layout, device=fresh[0].device,  # FSDP2: this rank's coordinates
                                generator=torch.Generator().manual_seed(index))
        kinds = rule.state_kinds()
        offsets = {"coord": 0, "tensor": 0}
        for p, shape in zip(fresh, layout):
            n = _real_view(p).numel()
            st: dict[str, Tensor] = {"step": torch.tensor(0.0)}
            for key, kind in kinds.items():
                if kind in ("coord", "tensor"):  # feature-major: coordinates / tensors on the last dim
                    start = offsets[kind]
                    st[key] = init[key][..., start: start + (n if kind == "coord" else 1)].to(
                        p.device, self.state_dtype).contiguous()
            offsets["coord"] += n
            offsets["tensor"] += 1
            self.state[p] = st
        owner = self.state[group["params"][0]]
        for key, kind in kinds.items():
            if kind == "global" and f"group_{key}" not in owner:
                owner[f"group_{key}"] = init[key].to(fresh[0].device, self.state_dtype).clone()

    @staticmethod
    def _flat_pair(p: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(flat gradient, flat update target, buffer to add to ``p`` afterwards or None), in one order.

        Dense parameters (contiguous or permuted, e.g. transposed) are read and updated in place in
        memory order; a parameter with gaps gets one contiguous gradient copy and one update buffer,
        applied once after all its chunks (not a full copy per chunk).
        """
        target, grad = _real_view(p), _real_view(p.grad)
        flat_p = _memory_order_view(target)
        if flat_p is not None and grad.stride() == target.stride():
            return _memory_order_view(grad), flat_p, None
        if flat_p is not None:  # dense parameter, gradient with another layout: bring it to p's layout
            return _memory_order_view(torch.empty_like(target).copy_(grad)), flat_p, None
        buffer = torch.zeros(target.numel(), dtype=target.dtype, device=target.device)
        return grad.reshape(-1), buffer, buffer

    def _step_coordinatewise(self, group: dict, params: list[Tensor]) -> None:
        lr, sign = group["lr"], (-1.0 if group["maximize"] else 1.0)
        rule = self._rule_on(params[0].device)
        keys = [k for k, kind in rule.state_kinds().items() if kind == "coord"]
        if self.backend == "compile":
            rule = self._compiled_rule(rule)
        torch._foreach_add_([self.state[p]["step"] for p in params], 1.0)
        self._chunks_done = 0
        try:
            with kernels.cell_kernel("off"):  # the torch path is torch's maths (the fused path has its own kernel)
                self._step_chunks(rule, params, keys, lr, sign)
        except torch._dynamo.exc.BackendCompilerFailed as exc:  # e.g. no C++ compiler for inductor's CPU code
            if self._chunks_done == 0:  # it failed before writing anything: the step is undone
                torch._foreach_sub_([self.state[p]["step"] for p in params], 1.0)
            done = ("nothing was updated" if self._chunks_done == 0 else
                    f"this step was applied to {self._chunks_done} chunk(s) of the group only")
            inner = getattr(exc, "inner_exception", None) or exc
            raise RuntimeError(f"{type(self).__name__}(backend='compile'): torch.compile failed "
                               f"({type(inner).__name__}: {str(inner).strip().splitlines()[0][:200]}); {done}. "
                               "Use backend='torch' (or 'auto')") from exc

    def _step_chunks(self, rule, params: list[Tensor], keys: list[str], lr: float, sign: float) -> None:
        flats = {p: self._flat_pair(p) for p in params}
        # plan: pieces (param, start, length) packed into chunks of <= chunk_size coordinates
        chunk: list[tuple[Tensor, int, int]] = []
        room = self.chunk_size
        for p in params:
            n = _real_view(p).numel()
            start = 0
            while start < n:
                take = min(room, n - start)
                chunk.append((p, start, take))
                start += take
                room -= take
                if room == 0:
                    self._run_chunk(rule, chunk, flats, keys, lr, sign)
                    chunk, room = [], self.chunk_size
        if chunk:
            self._run_chunk(rule, chunk, flats, keys, lr, sign)
        for p, (_, _, buffer) in flats.items():
            if buffer is not None:
                _real_view(p).add_(buffer.view(_real_view(p).shape))

    def _run_chunk(self, rule: Rule, chunk, flats, keys, lr: float, sign: float) -> None:
        grads = [flats[p][0][s: s + n] for p, s, n in chunk]
        g = (grads[0] if len(grads) == 1 else torch.cat(grads)).to(torch.float32)
        if sign < 0:
            g = -g
        state = {}
        for k in keys:
            parts = [self.state[p][k][..., s: s + n] for p, s, n in chunk]
            state[k] = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).to(torch.float32)
        if len(chunk) == 1:
            step = host_to_device(self.state[chunk[0][0]]["step"], g.device)
        else:
            lengths = host_to_device(torch.tensor([n for _, _, n in chunk]), g.device)
            step = host_to_device(torch.stack([self.state[p]["step"] for p, _, _ in chunk]), g.device)
            step = step.repeat_interleave(lengths, output_size=g.numel())
        update, new_state = rule(g, state, step)
        lengths = [n for _, _, n in chunk]
        # one multi-tensor copy per state key and one multi-tensor add per chunk (on a GPU the add is one launch;
        # the copies, of row slices, one per piece)
        for k in keys:
            torch._foreach_copy_([self.state[p][k][..., s: s + n] for p, s, n in chunk],
                                 new_state[k].split(lengths, dim=-1))
        _add_pieces([flats[p][1][s: s + n] for p, s, n in chunk], update.split(lengths), lr)
        self._chunks_done += 1

    def _drop_nonfinite(self, params: list[Tensor]) -> list[Tensor]:
        """Apply the NaN/Inf policy: one reduction per tensor, one host sync per group."""
        grads = [_real_view(p.grad) for p in params]  # an FSDP2 shard may hold no coordinates: norm 0
        norms = torch._foreach_norm([g if g.numel() else g.new_zeros(1) for g in grads], float("inf"))
        finite = torch.isfinite(torch.stack([n.to(params[0].device) for n in norms]))
        finite = _dist.all_across_shards(finite, params).tolist()  # FSDP2: all shards skip a tensor or none
        if all(finite):
            return params
        bad = finite.count(False)
        if self.nonfinite == "raise":
            raise FloatingPointError(f"{type(self).__name__}: non-finite gradient (NaN/Inf) in {bad} tensor(s); nothing "
                                     "was updated (nonfinite='raise'). Check the loss, or use nonfinite='skip'")
        _warn_caller(f"{type(self).__name__}: non-finite gradient (NaN/Inf) in {bad} tensor(s); skipped them this "
                     "step (their parameters and optimizer state are unchanged)")
        return [p for p, ok in zip(params, finite) if ok]

    def _note_nonfinite(self, counts: Tensor) -> None:
        """Keep the fused step's count of skipped tensors. On a GPU it travels to pinned host memory behind the
        step and a later ``step()`` reads it once it has arrived (never waiting); elsewhere it is read now."""
        if counts.device.type != "cuda":
            self._nonfinite_pending.append((counts, None))
            self._report_nonfinite()
            return
        host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
        host.copy_(counts, non_blocking=True)  # on the counts' device's current stream, behind the step
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(counts.device))
        self._nonfinite_pending.append((host, event))

    def _report_nonfinite(self) -> None:
        """Warn about the tensors the fused step skipped, for every count that has reached the host."""
        bad, steps, earlier = 0, 0, False
        while self._nonfinite_pending and (self._nonfinite_pending[0][1] is None
                                           or self._nonfinite_pending[0][1].query()):
            counts, event = self._nonfinite_pending.popleft()
            skipped = int(counts.sum())
            bad, steps, earlier = bad + skipped, steps + (skipped > 0), earlier or event is not None
        if bad:
            when = f"in {steps} earlier step(s)" if earlier else "this step"
            _warn_caller(f"{type(self).__name__}: non-finite gradient (NaN/Inf) in {bad} tensor(s); skipped them "
                         f"{when} (their parameters and optimizer state are unchanged)")

    def _step_whole_group(self, group: dict, params: list[Tensor]) -> None:
        """A rule with per-tensor and global RNNs (L2O-Scale), through its stages: a pre-pass sum, then its
        per-coordinate stage over chunks of at most ``chunk_size`` coordinates (state updated in place, the
        unnormalised update kept, per-tensor sums accumulated), its tensor stage on the sums, and each
        tensor's update divided by its normaliser. For DTensors the sums are all-reduced across shards."""
        lr, sign = group["lr"], (-1.0 if group["maximize"] else 1.0)
        rule = self._rule_on(params[0].device)
        key = {kind: k for k, kind in rule.state_kinds().items()}
        ck, tk, gk = key["coord"], key["tensor"], f"group_{key['global']}"
        owner = self.state[group["params"][0]]
        device = params[0].device
        torch._foreach_add_([self.state[p]["step"] for p in params], 1.0)
        step = host_to_device(self.state[params[0]]["step"], device)  # once, not at every chunk
        numels = host_to_device(torch.tensor([p.numel() * (2 if p.is_complex() else 1) for p in params]),
                                device)  # whole tensors (a DTensor's global size)
        pre = rule.pre_sums([self.state[p][ck] for p in params])
        pre = _dist.all_reduce_columns(pre, params).sum(1)
        tensor_h = torch.cat([self.state[p][tk] for p in params], dim=-1).to(torch.float32)
        glob_h = owner[gk].to(torch.float32)
        context = rule.prepare(tensor_h, glob_h, pre / numels.sum())
        flats = {p: self._flat_pair(p) for p in params}
        chunks = list(self._plan_chunks([_real_view(p).numel() for p in params]))
        # every piece's tensor index and length, moved to the device once and sliced chunk by chunk
        pieces = host_to_device(torch.tensor([[i, n] for chunk in chunks for i, _, n in chunk]), device)
        pieces = pieces.reshape(-1, 2).t()
        sums = torch.zeros(rule.SUM_ROWS, len(params), device=device)
        raws, first = [], 0  # per chunk: its unnormalised update (one float per coordinate) and its pieces
        for chunk in chunks:
            grads = [flats[params[i]][0][s: s + n] for i, s, n in chunk]
            g = (grads[0] if len(grads) == 1 else torch.cat(grads)).to(torch.float32)
            if sign < 0:
                g = -g
            parts = [self.state[params[i]][ck][:, s: s + n] for i, s, n in chunk]
            coord = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).to(torch.float32)
            columns, first = pieces[:, first: first + len(chunk)], first + len(chunk)
            raw, new_coord, part_sums = rule.coord_stage(g, coord, context, step, columns[0],
                                                         [n for _, _, n in chunk])
            sums.index_add_(1, columns[0], part_sums)
            # one multi-tensor copy per chunk (the pieces are row slices, so on a GPU still a copy per piece)
            torch._foreach_copy_([self.state[params[i]][ck][:, s: s + n] for i, s, n in chunk],
                                 new_coord.split([n for _, _, n in chunk], dim=1))
            raws.append((raw, columns))
        sums = _dist.all_reduce_columns(sums, params)
        norm, tensor_new, glob_new = rule.tensor_stage(sums, numels, tensor_h, glob_h)
        for chunk, (raw, columns) in zip(chunks, raws):
            if len(chunk) == 1:
                raw.div_(norm[chunk[0][0]])
            else:
                raw.div_(norm.index_select(0, columns[0]).repeat_interleave(columns[1], output_size=raw.numel()))
            _add_pieces([flats[params[i]][1][s: s + n] for i, s, n in chunk], raw.split([n for _, _, n in chunk]), lr)
        # dense pieces on both sides, so that on a GPU this is one multi-tensor launch
        torch._foreach_copy_([self.state[p][tk].view(-1) for p in params], tensor_new.t().contiguous().unbind(0))
        for p in params:
            buffer = flats[p][2]
            if buffer is not None:
                _real_view(p).add_(buffer.view(_real_view(p).shape))
        owner[gk].copy_(glob_new)

    def _plan_chunks(self, sizes: list[int]):
        """Pieces (tensor index, start, length) packed into chunks of at most ``chunk_size`` coordinates."""
        chunk, room = [], self.chunk_size
        for i, n in enumerate(sizes):
            start = 0
            while start < n:
                take = min(room, n - start)
                chunk.append((i, start, take))
                start += take
                room -= take
                if room == 0:
                    yield chunk
                    chunk, room = [], self.chunk_size
        if chunk:
            yield chunk


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Invalid {name}: {value!r} is a {type(value).__name__}, expected a float")


_WARNED_UNTRAINED: set[str] = set()


def _warn_untrained(cls_name: str, rule_name: str) -> None:
    """``weights=None``: say once per class that the optimizer runs an untrained rule."""
    if cls_name in _WARNED_UNTRAINED:
        return
    _WARNED_UNTRAINED.add(cls_name)
    from .weights import available_weights

    names = ", ".join(repr(n) for n in available_weights(rule_name)) or "none bundled"
    warnings.warn(f"{cls_name} was given no weights=: its {rule_name!r} rule is the untrained initialisation "
                  f"(what meta-training starts from), not a trained optimizer. Pass weights=NAME (bundled: {names}) "
                  "or a .safetensors file", UserWarning, stacklevel=3)


# ---------------------------------------------------------------------- load_state_dict hooks
def _remember_loaded_state(optimizer: LearnedOptimizer, state_dict: dict) -> None:
    """Refuse state from another rule (before anything changes); torch casts floating state to each
    parameter's dtype, so keep the originals to restore them."""
    _check_loaded_rule(optimizer, state_dict)
    # the saved ids in parameter order, as torch matches them: ints, or names (torch.distributed.checkpoint)
    ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
    optimizer._pending_state = (ids, state_dict["state"])


def _add_rule_identity(optimizer: LearnedOptimizer, state_dict: dict) -> dict:
    """``state_dict()`` records which rule (name and config) the recurrent state belongs to."""
    state_dict["learned_optim"] = {"rule": optimizer.rule.name, "config": optimizer.rule.config()}
    return state_dict


def _check_loaded_rule(optimizer: LearnedOptimizer, state_dict: dict) -> None:
    name = type(optimizer).__name__
    rule = optimizer.rule
    saved = state_dict.get("learned_optim")
    if saved is not None:
        if saved.get("rule") != rule.name or saved.get("config") != rule.config():
            raise ValueError(f"{name}.load_state_dict: this state belongs to a {saved.get('rule')!r} rule with config "
                             f"{saved.get('config')}, not to this optimizer's {rule.name!r} rule with config "
                             f"{rule.config()}; load it into an optimizer built with the same rule (nothing was "
                             "changed)")
    # also for state dicts written before the identity was recorded: the state's keys and widths must fit
    expected = {key: tuple(t.shape[:-1]) for key, t in rule.init_state([(1,)]).items()
                if rule.state_kinds().get(key) in ("coord", "tensor")}
    for index, entry in state_dict.get("state", {}).items():
        keys = {k for k in entry if k != "step" and not k.startswith("group_")}
        if not keys:
            continue
        widths = {k: tuple(v.shape[:1] if _dist.is_dtensor(v) else v.shape[:-1])  # DTensor: (features, *shape)
                  for k, v in entry.items() if k in expected and isinstance(v, Tensor)}
        if keys != set(expected) or widths != expected:
            got = {k: tuple(v.shape) for k, v in entry.items() if isinstance(v, Tensor)}
            raise ValueError(f"{name}.load_state_dict: the state of parameter {index} ({got}) is not the recurrent "
                             f"state of a {rule.name!r} rule (expects {sorted(expected)} with leading sizes "
                             f"{expected}); it comes from another optimizer or rule config (nothing was changed)")


def _restore_loaded_state(optimizer: LearnedOptimizer) -> None:
    pending, optimizer._pending_state = optimizer._pending_state, None
    if pending is None:
        return
    ids, saved = pending
    params = [p for group in optimizer.param_groups for p in group["params"]]
    kinds = optimizer.rule.state_kinds()
    for pid, p in zip(ids, params):
        for key, value in saved.get(pid, {}).items():
            if not isinstance(value, Tensor):
                continue
            if key == "step":  # a private copy: the caller's dict must not advance with us
                optimizer.state[p][key] = value.detach().to(torch.float32, copy=True)
            else:
                if _dist.is_dtensor(value) or (kinds.get(key) == "coord" and _dist.is_dtensor(p)):
                    value = _dist.local_state(value, p)  # FSDP2: this rank's coordinates
                optimizer.state[p][key] = value.detach().to(device=p.device, dtype=optimizer.state_dtype, copy=True)


def _shard_state_dict(optimizer: LearnedOptimizer, state_dict: dict) -> dict:
    """FSDP2: the per-coordinate state of a DTensor parameter appears in ``state_dict()`` as a DTensor of
    shape (features, *param.shape) sharded like the parameter (a view of this rank's state), so that
    ``torch.distributed.checkpoint`` saves and loads it sharded."""
    if _dist.dtensor_class() is None:
        return state_dict
    kinds = optimizer.rule.state_kinds()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, p in enumerate(params):
        entry = state_dict["state"].get(index)
        if entry is not None and _dist.is_dtensor(p):  # a new dict: the packed entries are the live state dicts
            state_dict["state"][index] = {k: _dist.sharded_state(v, p) if kinds.get(k) == "coord" else v
                                          for k, v in entry.items()}
    return state_dict


# ---------------------------------------------------------------------- the three named optimizers
def _with_args(summary: str) -> str:
    """A named optimizer's docstring: its summary, then the arguments of :class:`LearnedOptimizer`."""
    doc = LearnedOptimizer.__doc__
    return summary + "\n\n" + doc[doc.index("    Args:"):]


class L2ODM(LearnedOptimizer):
    __doc__ = _with_args("""L2O-DM (Andrychowicz et al. 2016): a coordinate-wise 2-layer LSTM on LogAndSign gradients.

    80 floats of recurrent state per parameter coordinate. Bundled weights: ``learned_optim.available_weights("dm")``.

    Example::

        opt = learned_optim.L2ODM(model.parameters(), weights="dm-cl-il")
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()""")

    rule_name = "dm"


class RNNprop(LearnedOptimizer):
    __doc__ = _with_args("""RNNprop (Lv et al. 2017): a coordinate-wise LSTM on bias-corrected Adam statistics.

    82 floats of recurrent state per parameter coordinate. Bundled weights:
    ``learned_optim.available_weights("rnnprop")``.

    Example::

        opt = learned_optim.RNNprop(model.parameters(), weights="rnnprop-cl-il")
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()""")

    rule_name = "rnnprop"


class L2OScale(LearnedOptimizer):
    __doc__ = _with_args("""L2O-Scale (Wichrowska et al. 2017): hierarchical per-coordinate / per-tensor / global GRUs.

    21 floats of state per coordinate plus 20 per tensor and 20 per param group; its per-tensor statistics need
    whole tensors. Bundled weights: ``learned_optim.available_weights("scale")``.

    Example::

        opt = learned_optim.L2OScale(model.parameters(), weights="scale")""")

    rule_name = "scale"
