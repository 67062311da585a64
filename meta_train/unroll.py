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
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from learned_optim.rules import Rule, State

from .tasks import Task


def detach_state(state: State) -> State:
    return {k: v.detach() for k, v in state.items()}


@dataclass
class Trajectory:
    """Where an optimizee is along its trajectory (carried from one truncation to the next)."""

    theta: Tensor
    state: State
    step: int = 0  # steps taken so far
    f0: float | None = None  # loss at the start (for the log-ratio objective)


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
def rollout(rule: Rule, task: Task, steps: int, generator: torch.Generator) -> list[float]:
    """Train a fresh optimizee with ``rule`` for ``steps`` steps (no graph); per-step losses."""
    traj = start(rule, task, generator)
    theta, state, losses = traj.theta, traj.state, []
    for step in range(1, steps + 1):
        loss, grad = task.loss_and_grad(theta, task.sample_batch(generator))
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            break
        update, state = rule(grad, state, step)
        theta = theta + update
    return losses
