"""Algorithm 2 (imitation of analytical optimizers) and the self-improving baseline (Section 4.2).

Teachers are the real ``torch.optim`` classes, run on a leaf copy of the optimizee parameters.
Imitation is off-policy (teacher forcing): the trajectory follows the teacher from a fresh
initialisation; the rule sees the teacher's gradients with its own recurrent state and is trained
to reproduce the teacher's updates, loss per step ``0.5 * sum((delta_teacher - delta_rule)^2) / n``,
summed over each truncation of ``unroll`` steps.

Populations: the teacher steps all K members at once (``theta`` of shape (K, n); the analytical
optimizers are element-wise, so this is K independent teachers) and the loss divides by K*n, i.e. it is
the mean over the members of each member's imitation loss.
"""
from __future__ import annotations

import torch
from torch import Tensor

from learned_optim.rules import Rule

from .tasks import Task
from .unroll import Trajectory, detach_state, join_state, population_blocks, population_step, split_state

TEACHERS = {
    "adam": (torch.optim.Adam, {"lr": 0.01}),
    "sgd": (torch.optim.SGD, {"lr": 0.01}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.01}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.01}),
}


class Teacher:
    """An analytical optimizer stepping a flat parameter vector; ``step(theta, grad) -> update``."""

    def __init__(self, name: str, theta: Tensor, lr: float | None = None):
        if name not in TEACHERS:
            raise ValueError(f"Unknown teacher {name!r}; known: {sorted(TEACHERS)}")
        cls, kwargs = TEACHERS[name]
        if lr is not None:
            kwargs = {**kwargs, "lr": lr}
        self.name = name
        self.param = theta.detach().clone().requires_grad_(True)
        self.opt = cls([self.param], **kwargs)

    def select(self, keep: Tensor) -> None:
        """Keep only the population members ``keep`` (rows of a (K, n) teacher), with their optimizer state."""
        old = self.param
        self.param = old.detach().index_select(0, keep.to(old.device)).requires_grad_(True)
        state = {k: v.index_select(0, keep.to(v.device)) if torch.is_tensor(v) and v.shape[:1] == old.shape[:1]
                 and v.dim() == old.dim() else v for k, v in self.opt.state.get(old, {}).items()}
        self.opt = type(self.opt)([self.param], **self.opt.defaults)
        if state:
            self.opt.state[self.param] = state

    @torch.no_grad()
    def step(self, theta: Tensor, grad: Tensor) -> Tensor:
        self.param.copy_(theta.detach())
        self.param.grad = grad.detach().clone()
        self.opt.step()
        return self.param.detach() - theta.detach()


def imitation_unroll(rule: Rule, task: Task, traj: Trajectory, teacher: Teacher, unroll: int,
                     generator: torch.Generator) -> tuple[Tensor, Trajectory]:
    """One truncation of imitation: returns (loss with graph, next trajectory along the teacher)."""
    theta, state = traj.theta, traj.state
    total = theta.new_zeros(())
    for t in range(unroll):
        _, grad = task.loss_and_grad(theta, task.sample_batch(generator))
        step = traj.step + t + 1
        target = teacher.step(theta, grad)
        predicted, state = rule(grad, state, step)
        total = total + 0.5 * ((target - predicted) ** 2).sum() / theta.numel()
        theta = theta + target
    return total, Trajectory(theta, detach_state(state), traj.step + unroll, traj.f0)


def population_imitation_unroll(rule: Rule, task: Task, traj: Trajectory, teacher: Teacher, unroll: int,
                                generators) -> tuple[Tensor, Trajectory]:
    """:func:`imitation_unroll` for a population (``traj.theta`` (K, n), member k's batches from
    ``generators[k]``): the loss is the mean over the members of their imitation losses."""
    theta, blocks = traj.theta, population_blocks(rule, traj.theta)
    state = split_state(traj.state, blocks)
    total = theta.new_zeros(())
    for t in range(unroll):
        _, grad = task.population_loss_and_grad(theta, task.sample_batches(generators))
        step = traj.step + t + 1
        target = teacher.step(theta, grad)
        predicted, state = population_step(rule, grad, state, step, blocks)
        total = total + 0.5 * ((target - predicted) ** 2).sum() / theta.numel()
        theta = theta + target
    return total, Trajectory(theta, detach_state(join_state(state)), traj.step + unroll, traj.f0)


class SelfImproving:
    """Mix teacher steps into the rule's own trajectory: at each step an auxiliary optimizer is
    chosen with probability ``p_aux`` (split equally among the teachers), decaying linearly from
    k/(k+1) to 0 over ``anneal_epochs`` epochs; the rule's probability grows to 1."""

    def __init__(self, teachers: list[str], anneal_epochs: int = 100):
        self.teacher_names, self.anneal_epochs = list(teachers), anneal_epochs
        self.teachers: list[Teacher] = []

    def p_aux(self, epoch: int) -> float:
        k = len(self.teacher_names)
        return k / (k + 1) * max(0.0, 1.0 - epoch / self.anneal_epochs)

    def begin_epoch(self, theta: Tensor) -> None:
        self.teachers = [Teacher(name, theta) for name in self.teacher_names]

    def select(self, keep: Tensor) -> None:
        """Keep only the population members ``keep`` (see :meth:`Teacher.select`)."""
        for teacher in self.teachers:
            teacher.select(keep)

    def override(self, epoch: int, rng) -> callable:
        p = self.p_aux(epoch)

        def choose(step: int, theta: Tensor, grad: Tensor):
            # every teacher sees every gradient, so its moments are those of the mixed trajectory
            updates = [teacher.step(theta, grad) for teacher in self.teachers]
            u = rng.random()
            if u < p:
                return updates[min(int(u / p * len(updates)), len(updates) - 1)]
            return None

        return choose
