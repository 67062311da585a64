"""Truncated, differentiable unrolls of a rule on a task, and no-grad trajectories.

First order, as in the paper's code: the gradient fed to the rule is detached, while
``theta_{t+1} = theta_t + update_t`` stays in the graph, so the meta-gradient reaches the rule
through every later loss of the truncation.

Meta-losses (``objective``):
- ``"sum"`` (L2O-DM, RNNprop): sum of the optimizee losses at the ``unroll + 1`` points of the
  truncation, each on a fresh batch (the gradient of step t comes from the batch of loss t);
- ``"log_ratio"`` (L2O-Scale): mean over the truncation of ``log(f_t / (f_0 + 1e-6) + 1e-6)`` with
  ``f_0`` the loss at the start of the trajectory (minibatch losses; the original evaluates f on a
  10k-sample subset).

Populations (``population_*``): K optimizees advance together, ``theta`` of shape (K, n). Their forward
and backward run once through ``torch.func.vmap`` (:meth:`Task.population_loss`); the rule sees K times
the coordinates. The population's state is that of K copies of the layout (every key concatenated along
its last dimension: (F, K*n) per coordinate, (F, K*T) per tensor, (F, K) global). A coordinate-wise rule
(L2O-DM, RNNprop) is called once on the flat (K*n,) gradient, or on the CPU once per block of
``POPULATION_BLOCK`` coordinates (:func:`population_blocks`; the state then travels through the truncation as
per-block views, :func:`split_state`, joined once at its end); L2O-Scale runs its per-coordinate stage once
on the K*n coordinates and its tensor and global stage under ``vmap`` over the members, so every member
keeps its own per-tensor and global statistics (:func:`population_step`). Member k
draws its initialisation, random scaling and batches from ``generators[k]`` with exactly the calls one
optimizee makes (:func:`start`, :func:`start_scaled`), so a member computes what one optimizee computes on
that generator, to float rounding. A population's meta-loss is the mean of its members' meta-losses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.func import vmap

from learned_optim.rules import Rule, State
from learned_optim.rules.base import as_step

from .tasks import Task


def detach_state(state: State) -> State:
    return {k: v.detach() for k, v in state.items()}


@dataclass
class Trajectory:
    """Where an optimizee is along its trajectory (carried from one truncation to the next)."""

    theta: Tensor  # (n,) one optimizee; (K, n) a population
    state: State
    step: int = 0  # steps taken so far
    f0: float | Tensor | None = None  # loss at the start (log-ratio objective); (K,) for a population


def start(rule: Rule, task: Task, generator: torch.Generator) -> Trajectory:
    theta = task.init_params(generator)
    with torch.no_grad():
        state = rule.init_state(task.layout, device=theta.device, generator=generator)
    return Trajectory(theta, detach_state(state))


def draw_scale(num_params: int, bound: float, generator: torch.Generator) -> Tensor:
    """Random scaling factors r = exp(U(-bound, bound)), one per coordinate, drawn on the CPU from ``generator``."""
    return torch.empty(num_params).uniform_(-bound, bound, generator=generator).exp_()


def start_scaled(rule: Rule, task: Task, generator: torch.Generator, bound: float) -> tuple[Trajectory, Task]:
    """A fresh trajectory on a randomly scaled copy of ``task`` (the paper code's ``if_scale``).

    With factors r = exp(U(-bound, bound)) per coordinate the optimizee starts at theta_0 / r and its loss is
    f(theta * r): the same function at the same starting point, but the rule sees the gradients r * grad f of a
    badly scaled problem. ``bound == 0`` is the plain task and draws nothing from ``generator``.
    """
    traj = start(rule, task, generator)
    if bound <= 0:
        return traj, task
    scale = draw_scale(task.num_params, bound, generator).to(traj.theta.device)
    return Trajectory(traj.theta / scale, traj.state, traj.step, traj.f0), task.scaled(scale)


def meta_unroll(rule: Rule, task: Task, traj: Trajectory, unroll: int, generator: torch.Generator, *,
                objective: str = "sum", step_override: Callable[[int, Tensor, Tensor], Tensor | None] | None = None
                ) -> tuple[Tensor, Trajectory, list[float]]:
    """One truncation of ``unroll`` steps; returns (meta-loss with graph, next trajectory, losses).

    ``step_override(t, theta, grad)`` may return an update to apply instead of the rule's (used by
    self-improving training); the rule still consumes the gradient so its state stays in sync.
    """
    theta = traj.theta.detach().requires_grad_(True)
    state = traj.state
    losses: list[Tensor] = []
    for t in range(unroll):
        loss, grad = task.loss_and_grad(theta, task.sample_batch(generator), keep_graph=True)
        losses.append(loss)
        step = traj.step + t + 1
        update, state = rule(grad, state, step)
        if step_override is not None:
            forced = step_override(step, theta, grad)
            if forced is not None:
                update = forced
        theta = theta + update
    if objective == "sum":
        losses.append(task.loss(theta, task.sample_batch(generator)))
        meta_loss = torch.stack(losses).sum()
    elif objective == "log_ratio":
        f0 = traj.f0 if traj.f0 is not None else float(losses[0].detach())
        meta_loss = torch.log(torch.stack(losses) / (f0 + 1e-6) + 1e-6).mean()
    else:
        raise ValueError(f"Unknown objective {objective!r}")
    values = torch.stack(losses).detach().tolist()
    f0 = traj.f0 if traj.f0 is not None else values[0]
    return meta_loss, Trajectory(theta.detach(), detach_state(state), traj.step + unroll, f0), values


@torch.no_grad()
def rollout(rule: Rule, task: Task, steps: int, generator: torch.Generator, check_every: int = 100) -> list[float]:
    """Train a fresh optimizee with ``rule`` for ``steps`` steps (no graph); per-step losses, ending at the first
    NaN/Inf. The losses stay on the device and are checked every ``check_every`` steps (on a GPU, reading each
    one back would wait for the stream at every step)."""
    traj = start(rule, task, generator)
    theta, state, recorded = traj.theta, traj.state, []
    for step in range(1, steps + 1):
        loss, grad = task.loss_and_grad(theta, task.sample_batch(generator))
        recorded.append(loss)
        if step % check_every == 0 and not bool(torch.isfinite(torch.stack(recorded[-check_every:])).all()):
            break  # diverged: the rest would only be NaN
        update, state = rule(grad, state, step)
        theta = theta + update
    losses = torch.stack(recorded).tolist()
    end = next((i + 1 for i, v in enumerate(losses) if not math.isfinite(v)), len(losses))
    return losses[:end]


# ------------------------------------------------------------------------------------------------ compiled
class CompileError(RuntimeError):
    """torch.compile could not compile the rule (``--compile``)."""


class CompiledRule:
    """``rule`` with its forward compiled by ``torch.compile`` (``meta_train --compile``): the unroll functions take
    it in place of the rule. Its parameters, state layout and every other attribute are the rule's own (the
    compiled code reads the module's tensors: no copy of the weights); only ``rule(grad, state, step)`` runs the
    compiled graph, forward and backward, with ``step`` passed as a 0-d tensor so that a new step number does not
    compile again. Different float rounding than the eager rule: a run resumes bit-identical with the same flag.
    Coordinate-wise rules only (L2O-Scale runs its stages eagerly)."""

    def __init__(self, rule: Rule, backend: str = "inductor"):
        if not rule.coordinatewise:
            raise ValueError(f"--compile supports the coordinate-wise rules (dm, rnnprop), not {rule.name!r}")
        self.rule, self.backend = rule, backend
        self._forward = torch.compile(rule, backend=backend, dynamic=None)

    def __call__(self, grad: Tensor, state: State, step) -> tuple[Tensor, State]:
        step = as_step(step, grad)
        try:
            return self._forward(grad, state, step)
        except torch._dynamo.exc.BackendCompilerFailed as exc:  # e.g. no C++ compiler for inductor's CPU code
            inner = getattr(exc, "inner_exception", None) or exc
            raise CompileError(f"--compile: torch.compile of the {self.rule.name!r} rule failed "
                               f"({type(inner).__name__}: {str(inner).strip().splitlines()[0][:200]}); run without "
                               "--compile") from exc

    def __getattr__(self, name: str):
        return getattr(self.rule, name)


# ---------------------------------------------------------------------------------------------- populations
def keep_freed_memory() -> bool:
    """Ask the C library's allocator (glibc) to keep freed memory for reuse rather than return it to the system.

    A population's unroll on the CPU allocates tensors of tens to hundreds of MB at every step. By default glibc
    serves each from fresh pages (mmap: page-faulted and zeroed by the kernel) and unmaps them when freed: on
    MLP-orig with K = 64, a meta-step then spends more time in the kernel than in the maths (3x slower for L2O-DM).
    Same as ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=68719476736``; the process keeps its peak
    memory. Returns False (and changes nothing) where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 36))
    except (OSError, AttributeError):
        return False


def _shared(rule: Rule) -> set[str]:
    """State keys derived from the layout: one copy for the whole population."""
    return {k for k, kind in rule.state_kinds().items() if kind == "layout"}


def stack_states(rule: Rule, states: Sequence[State]) -> State:
    """The population state of K members' states: every key concatenated along its last dimension, member after
    member (coordinates (F, K*n), per-tensor state (F, K*T), global state (F, K)): the state of K copies of the
    layout, except the layout keys, shared."""
    shared = _shared(rule)
    return {k: states[0][k] if k in shared else torch.cat([s[k] for s in states], dim=-1) for k in states[0]}


def select_members(rule: Rule, traj: Trajectory, keep: Tensor) -> Trajectory:
    """The trajectory of the members ``keep`` (indices into the population)."""
    k = traj.theta.shape[0]
    shared = _shared(rule)
    state = {key: v if key in shared else v.unflatten(-1, (k, -1)).index_select(-2, keep.to(v.device)).flatten(-2)
             for key, v in traj.state.items()}
    f0 = traj.f0.index_select(0, keep.to(traj.f0.device)) if isinstance(traj.f0, Tensor) else traj.f0
    return Trajectory(traj.theta.index_select(0, keep.to(traj.theta.device)), state, traj.step, f0)


STAGES = ("pre_sums", "prepare", "coord_stage", "tensor_stage")

#: coordinates per call of a coordinate-wise rule in a population's steps on the CPU (the optimizer's default
#: ``chunk_size``): the rule's temporaries of one block stay in the CPU's caches, so K members cost no more per
#: coordinate than one (benchmarks/meta_step.py). On a GPU the population is one call: width is what it needs.
POPULATION_BLOCK = 8192


def population_blocks(rule: Rule, theta: Tensor) -> list[int] | None:
    """How a population ``theta`` (K, n) runs ``rule``: the sizes of the coordinate blocks of the flat K*n
    coordinates, one rule call each (a coordinate-wise rule on the CPU, more than one block), or None (one call)."""
    if not rule.coordinatewise or theta.device.type != "cpu" or theta.numel() <= POPULATION_BLOCK:
        return None
    full, rest = divmod(theta.numel(), POPULATION_BLOCK)
    return [POPULATION_BLOCK] * full + ([rest] if rest else [])


def split_state(state: State, blocks: Sequence[int] | None) -> State | list[State]:
    """A coordinate-wise population state as the per-block states :func:`population_step` takes with ``blocks``
    (views, no copy); the state itself where ``blocks`` is None."""
    if blocks is None:
        return state
    parts = {key: v.split(list(blocks), dim=-1) for key, v in state.items()}
    return [{key: parts[key][i] for key in state} for i in range(len(blocks))]


def join_state(state: State | list[State]) -> State:
    """The inverse of :func:`split_state`: one state (F, K*n) per key."""
    if isinstance(state, dict):
        return state
    return {key: torch.cat([s[key] for s in state], dim=-1) for key in state[0]}


def population_step(rule: Rule, grad: Tensor, state: State | list[State], step,
                    blocks: Sequence[int] | None = None) -> tuple[Tensor, State | list[State]]:
    """``rule`` on a population's gradients (K, n) and state (:func:`stack_states`): the updates (K, n) and the
    new state.

    A coordinate-wise rule runs once on the K*n coordinates, or with ``blocks`` (:func:`population_blocks`) once
    per block of coordinates on the per-block states of :func:`split_state`, returning per-block states. A rule
    with per-tensor and global state that exposes its stages (L2O-Scale: ``pre_sums``, ``prepare``,
    ``coord_stage``, ``tensor_stage``, as the optimizer runs them) runs its per-coordinate stage once on the K*n
    coordinates of the K*T tensors, and its tensor and global stage under ``vmap`` over the members, so each
    member's global statistics are its own. Any other rule runs under ``vmap`` over the members."""
    if blocks is not None:
        out = [rule(g, s, step) for g, s in zip(grad.reshape(-1).split(list(blocks)), state)]
        return torch.cat([u for u, _ in out]).view_as(grad), [s for _, s in out]
    if rule.coordinatewise:
        update, state = rule(grad.reshape(-1), state, step)
        return update.view_as(grad), state
    if all(hasattr(rule, name) for name in STAGES):
        return _staged_population_step(rule, grad, state, step)
    k, shared = grad.shape[0], _shared(rule)
    dims = {key: None if key in shared else -2 for key in state}
    members = {key: v if key in shared else v.unflatten(-1, (k, -1)) for key, v in state.items()}
    update, new = vmap(lambda g, st: rule(g, st, step), in_dims=(0, dims), out_dims=(0, dims))(grad, members)
    return update, {key: v if key in shared else v.flatten(-2) for key, v in new.items()}


def _staged_population_step(rule: Rule, grad: Tensor, state: State, step) -> tuple[Tensor, State]:
    k, n = grad.shape
    numels = state["numels"]
    t = numels.numel()
    sizes = rule.host_sizes(numels) if hasattr(rule, "host_sizes") else numels.tolist()
    coord, tensor_h, glob_h = state["coord"], state["tensor"], state["glob"]
    # what each coordinate needs from its own member as a whole (the member's mean log-lr): (P, K*n)
    pre_sums = vmap(lambda member: rule.pre_sums([member])[:, 0], in_dims=1, out_dims=1)
    pre_means = pre_sums(coord.unflatten(1, (k, n))) / n
    context = rule.prepare(tensor_h, glob_h.repeat_interleave(t, dim=1), pre_means.repeat_interleave(n, dim=1))
    raw_update, new_coord, sums = rule.coord_stage(grad.reshape(-1), coord, context, step, None, sizes * k)
    norm, tensor_new, glob_new = vmap(rule.tensor_stage, in_dims=(1, None, 1, 1), out_dims=(0, 1, 1))(
        sums.unflatten(1, (k, t)), numels, tensor_h.unflatten(1, (k, t)), glob_h.unflatten(1, (k, 1)))
    update = raw_update / norm.flatten().repeat_interleave(numels.repeat(k), output_size=k * n)
    return update.view(k, n), {"coord": new_coord, "tensor": tensor_new.flatten(1), "glob": glob_new.flatten(1),
                               "numels": numels}


def start_population(rule: Rule, task: Task, generators: Sequence[torch.Generator],
                     bound: float = 0.0) -> tuple[Trajectory, Task]:
    """Fresh trajectories for ``len(generators)`` members, member k exactly as
    ``start_scaled(rule, task, generators[k], bound)`` (so member 0 of a run is its one optimizee)."""
    members = [start_scaled(rule, task, g, bound) for g in generators]
    theta = torch.stack([traj.theta for traj, _ in members])
    state = stack_states(rule, [traj.state for traj, _ in members])
    if bound > 0:
        task = task.scaled(torch.stack([member_task.scale for _, member_task in members]))
    return Trajectory(theta, state), task


def population_meta_unroll(rule: Rule, task: Task, traj: Trajectory, unroll: int,
                           generators: Sequence[torch.Generator], *, objective: str = "sum",
                           step_override: Callable[[int, Tensor, Tensor], Tensor | None] | None = None
                           ) -> tuple[Tensor, Trajectory, Tensor]:
    """:func:`meta_unroll` for a population: returns (each member's meta-loss (K,) with graph, next trajectory,
    losses (steps, K) detached). The population's meta-loss is their mean; a member whose meta-loss is not
    finite has to leave the population before the mean is back-propagated (its NaNs reach the shared rule)."""
    theta = traj.theta.detach().requires_grad_(True)
    blocks = population_blocks(rule, theta)
    state = split_state(traj.state, blocks)
    losses: list[Tensor] = []
    for t in range(unroll):
        loss, grad = task.population_loss_and_grad(theta, task.sample_batches(generators), keep_graph=True)
        losses.append(loss)
        step = traj.step + t + 1
        update, state = population_step(rule, grad, state, step, blocks)
        if step_override is not None:
            forced = step_override(step, theta, grad)
            if forced is not None:
                update = forced
        theta = theta + update
    if objective == "sum":
        losses.append(task.population_loss(theta, task.sample_batches(generators)))
        member_losses = torch.stack(losses).sum(0)
    elif objective == "log_ratio":
        f0 = traj.f0 if traj.f0 is not None else losses[0].detach()
        member_losses = torch.log(torch.stack(losses) / (f0 + 1e-6) + 1e-6).mean(0)
    else:
        raise ValueError(f"Unknown objective {objective!r}")
    values = torch.stack(losses).detach()
    f0 = traj.f0 if traj.f0 is not None else values[0]
    return member_losses, Trajectory(theta.detach(), detach_state(join_state(state)), traj.step + unroll, f0), values


@torch.no_grad()
def population_rollout(rule: Rule, task: Task, steps: int, generators: Sequence[torch.Generator],
                       check_every: int = 100) -> list[list[float]]:
    """:func:`rollout` for ``len(generators)`` fresh optimizees at once; member k's losses are those of
    ``rollout(rule, task, steps, generators[k])`` (to float rounding), ending at its first NaN/Inf."""
    traj = start_population(rule, task, generators)[0]
    theta, blocks = traj.theta, population_blocks(rule, traj.theta)
    state = split_state(traj.state, blocks)
    recorded: list[Tensor] = []
    finite = torch.ones(theta.shape[0], dtype=torch.bool, device=theta.device)
    for step in range(1, steps + 1):
        loss, grad = task.population_loss_and_grad(theta, task.sample_batches(generators))
        recorded.append(loss)
        finite &= torch.isfinite(loss)
        if step % check_every == 0 and not bool(finite.any()):
            break  # every member has diverged: the rest would only be NaN
        update, state = population_step(rule, grad, state, step, blocks)
        theta = theta + update
    curves = []
    for column in torch.stack(recorded).T.tolist():
        end = next((i + 1 for i, v in enumerate(column) if not math.isfinite(v)), len(column))
        curves.append(column[:end])
    return curves
