"""Optimizees: ordinary ``nn.Module``s with their data, run through ``torch.func.functional_call``.

A :class:`Task` owns the architecture and the dataset (one tensor on the device); parameters
live outside it as one flat vector, so the unroll and the evaluation can treat them exactly as a
learned optimizer does: ``task.loss(flat_params, batch)``. Parameters are initialised N(0, 0.01)
(weights and biases alike, as in the paper's code), except normalisation layers, which start as the
identity (scale 1, shift 0), as ``tf.layers.batch_normalization`` does in the paper's Conv-MNIST;
batches of 128 are drawn with replacement.

Populations: K optimizees of one task are a (K, n) matrix of flat parameter vectors. ``sample_batches``
draws member k's batch from its own generator exactly as ``sample_batch`` would, and ``population_loss``
runs the module once for all members through ``torch.func.vmap`` over ``functional_call`` (batch norm
keeps per-member batch statistics), so member k computes what one optimizee computes, to float rounding.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from learned_optim.rules.base import host_to_device

from ..data import load_dataset
from .models import ConvNet, LeNet, MLP, NASCellNet

# name -> (model factory given (in_channels, image_size), dataset)
TASKS = {
    "mlp-orig": (lambda c, s: MLP(c * s * s, (20,), nn.Sigmoid), "mnist"),
    "mlp-relu": (lambda c, s: MLP(c * s * s, (20,), nn.ReLU), "mnist"),
    "mlp-deeper": (lambda c, s: MLP(c * s * s, (20, 20), nn.Sigmoid), "mnist"),
    "conv-mnist": (lambda c, s: ConvNet(c, s, stride=1), "mnist"),
    "conv-cifar": (lambda c, s: ConvNet(c, s, stride=2), "cifar10"),
    "lenet": (lambda c, s: LeNet(c, s), "mnist"),
    "lenet-cifar": (lambda c, s: LeNet(c, s), "cifar10"),
    "nas-cell": (lambda c, s: NASCellNet(c), "mnist"),
    "nas-cifar": (lambda c, s: NASCellNet(c), "cifar10"),
    "mlp-fashion": (lambda c, s: MLP(c * s * s, (20,), nn.Sigmoid), "fashion-mnist"),
}


IMAGE_SHAPES = {"mnist": (1, 28), "fashion-mnist": (1, 28), "cifar10": (3, 32)}  # (channels, size)
PLAIN_INIT = "normal(0.01)"


def init_scheme(name: str, init_std: float = 0.01) -> str:
    """:attr:`Task.init_scheme` of task ``name``, without loading its data."""
    factory, dataset = TASKS[name]
    return _scheme_name(init_std, bool(identity_init_slices(factory(*IMAGE_SHAPES[dataset]))))


def _scheme_name(init_std: float, identity: bool) -> str:
    return f"normal({init_std:g})" + ("+norm-identity" if identity else "")


@dataclass
class Batch:
    x: Tensor
    y: Tensor


class Task:
    """An optimizee family: architecture + data; parameters are a flat vector."""

    def __init__(self, name: str, *, train: bool, data_root=None, device="cpu", batch_size: int = 128,
                 data: tuple[Tensor, Tensor] | None = None, init_std: float = 0.01):
        if name not in TASKS:
            raise ValueError(f"Unknown task {name!r}; known tasks: {sorted(TASKS)}")
        factory, dataset = TASKS[name]
        self.name, self.dataset, self.batch_size, self.init_std = name, dataset, batch_size, init_std
        self.device = torch.device(device)
        self.x, self.y = data if data is not None else load_dataset(dataset, train=train, root=data_root,
                                                                     device=self.device)
        self.x, self.y = self.x.to(self.device), self.y.to(self.device)
        channels, size = self.x.shape[1], self.x.shape[-1]
        self.module = factory(channels, size).to(self.device)
        self.names = [n for n, _ in self.module.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in self.module.named_parameters()]
        self.numels = [math.prod(s) for s in self.shapes]
        self.num_params = sum(self.numels)
        self.identity_init = identity_init_slices(self.module)
        self.scale: Tensor | None = None  # random scaling: the loss is f(theta * scale) (see :meth:`scaled`)

    def scaled(self, scale: Tensor) -> "Task":
        """This task seen through per-coordinate factors ``scale`` (random scaling, Lv et al. 2017): same
        architecture, data and batches, loss ``f(theta * scale)``, so its gradient is ``scale * grad f``.
        ``scale`` is (n,) for one optimizee or (K, n) for a population (one row per member).
        A shallow copy: the data tensors are shared."""
        if scale.shape[-1:] != (self.num_params,) or scale.dim() not in (1, 2):
            raise ValueError(f"scale must have shape ({self.num_params},) or (K, {self.num_params}), "
                             f"got {tuple(scale.shape)}")
        task = copy.copy(self)
        task.scale = scale.to(self.device)
        return task

    @property
    def init_scheme(self) -> str:
        """How :meth:`init_params` draws a vector (recorded with evaluations so results of another scheme are
        never mixed in)."""
        return _scheme_name(self.init_std, bool(self.identity_init))

    @property
    def layout(self) -> list[tuple[int, ...]]:
        return list(self.shapes)

    def init_params(self, generator: torch.Generator) -> Tensor:
        """A fresh flat parameter vector, N(0, init_std), drawn from ``generator`` (on the CPU for
        reproducibility across devices); normalisation layers' scales are then set to 1 and shifts to 0
        (the draw is the same, so tasks without such layers get exactly the N(0, init_std) vector)."""
        flat = torch.randn(self.num_params, generator=generator) * self.init_std
        for start, stop, value in self.identity_init:
            flat[start:stop] = value
        return flat.to(self.device)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.numels), self.shapes)}

    def sample_batch(self, generator: torch.Generator) -> Batch:
        # drawn on the CPU (its generator), moved without a stream sync: this runs at every unrolled step
        idx = host_to_device(torch.randint(len(self.y), (self.batch_size,), generator=generator), self.device)
        return Batch(self.x[idx], self.y[idx])

    def loss(self, flat: Tensor, batch: Batch) -> Tensor:
        if self.scale is not None:
            flat = flat * self.scale
        logits = functional_call(self.module, self.unflatten(flat), (batch.x,))
        return F.cross_entropy(logits, batch.y)

    # ------------------------------------------------------------------ populations
    def sample_batches(self, generators: list[torch.Generator]) -> Batch:
        """One batch per member, stacked: x (K, B, ...), y (K, B); member k's batch is the one
        ``sample_batch(generators[k])`` draws (same calls on the same generator)."""
        idx = torch.stack([torch.randint(len(self.y), (self.batch_size,), generator=g) for g in generators])
        idx = host_to_device(idx, self.device)
        return Batch(self.x[idx], self.y[idx])

    def _member_loss(self, flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(self.module, self.unflatten(flat), (x,)), y)

    def population_loss(self, theta: Tensor, batch: Batch) -> Tensor:
        """Losses (K,) of the K optimizees ``theta`` (K, n) on their batches (from :meth:`sample_batches`)."""
        if theta.dim() != 2 or theta.shape[1] != self.num_params:
            raise ValueError(f"a population's parameters must have shape (K, {self.num_params}), "
                             f"got {tuple(theta.shape)}")
        if self.scale is not None:
            theta = theta * self.scale
        return vmap(self._member_loss)(theta, batch.x, batch.y)

    def population_loss_and_grad(self, theta: Tensor, batch: Batch, *,
                                 keep_graph: bool = False) -> tuple[Tensor, Tensor]:
        """Losses (K,) and gradients (K, n) of a population, each member's gradient its own (the gradient of
        the sum of the losses); detached as in :meth:`loss_and_grad`."""
        if keep_graph:
            losses = self.population_loss(theta, batch)
            (grad,) = torch.autograd.grad(losses.sum(), theta, retain_graph=True)
            return losses, grad.detach()
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)
            losses = self.population_loss(leaf, batch)
            (grad,) = torch.autograd.grad(losses.sum(), leaf)
        return losses.detach(), grad

    def loss_and_grad(self, flat: Tensor, batch: Batch, *, keep_graph: bool = False) -> tuple[Tensor, Tensor]:
        """Loss at ``flat`` and its gradient (detached: first-order, as in the paper's code).

        ``keep_graph``: ``flat`` is part of a meta-graph and the loss will be back-propagated again.
        """
        if keep_graph:
            loss = self.loss(flat, batch)
            (grad,) = torch.autograd.grad(loss, flat, retain_graph=True)
            return loss, grad.detach()
        with torch.enable_grad():
            leaf = flat.detach().requires_grad_(True)
            loss = self.loss(leaf, batch)
            (grad,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), grad


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def identity_init_slices(module: nn.Module) -> list[tuple[int, int, float]]:
    """(start, stop, value) of the flat parameter vector for every normalisation layer's scale (1) and
    shift (0), in ``module.parameters()`` order."""
    value = {id(p): 1.0 if n == "weight" else 0.0 for m in module.modules() if isinstance(m, NORM_LAYERS)
             for n, p in m.named_parameters(recurse=False)}
    slices, offset = [], 0
    for p in module.parameters():
        if id(p) in value:
            slices.append((offset, offset + p.numel(), value[id(p)]))
        offset += p.numel()
    return slices


__all__ = ["TASKS", "Task", "Batch", "identity_init_slices", "init_scheme", "PLAIN_INIT"]
