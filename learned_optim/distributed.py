"""The learned optimizers on sharded parameters (DTensor, as ``torch.distributed.fsdp.fully_shard`` makes them).

Under DDP nothing here is used: every rank holds whole tensors and the same all-reduced gradients, so
every rank steps identically. Under FSDP2 a parameter and its gradient are DTensors; the optimizer works
on each rank's local shard (``to_local()``, the very storage the DTensor wraps), so each rank keeps the
recurrent state of its own coordinates only, stored as plain feature-major tensors (features, local
coordinates) like any other parameter's state. The functions below provide the rest:

- ``state_dict()`` shows that state as DTensors of shape (features, *param.shape), sharded on dimension
  ``d + 1`` where the parameter is sharded on ``d`` (a view of the local state, no copy), which is what
  ``torch.distributed.checkpoint`` needs to save and load it sharded; ``load_state_dict`` takes the
  local shard back.
- L2O-Scale's per-tensor and global statistics are sums over whole tensors: ``all_reduce_columns``
  adds up the shards' partial sums (one collective per step and param group, on a few floats per tensor).
- ``local_coordinates`` tells where a shard's coordinates sit in the whole tensor, so that a rule with a
  random initial state (L2O-Scale's log learning rates) starts every coordinate where the unsharded
  optimizer would.

Nothing here imports ``torch.distributed.tensor``: no DTensor can exist before that module is loaded, so a
plain run pays one dictionary lookup per check.
"""
from __future__ import annotations

import inspect
import math
import sys

import torch
from torch import Tensor


def dtensor_class():
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_dtensor(t) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (its own storage, so in-place updates reach the parameter); ``t`` itself
    otherwise."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


def _real_shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape) + ((2,) if t.is_complex() else ())


def check_sharded(p: Tensor) -> None:
    """Refuse layouts where a rank's local gradient is not the gradient of its local coordinates."""
    for placement in p.placements:
        if not (placement.is_shard() or placement.is_replicate()):
            raise ValueError(f"learned optimizers: parameter placement {placement} is not supported (Shard or "
                             "Replicate)")
        if type(placement).__name__ != "Shard" and placement.is_shard():
            raise ValueError(f"learned optimizers: parameter placement {placement} is not supported (plain Shard)")
    if p.grad is not None and (not is_dtensor(p.grad) or tuple(p.grad.placements) != tuple(p.placements)):
        got = tuple(p.grad.placements) if is_dtensor(p.grad) else "a plain tensor"
        raise ValueError(f"learned optimizers: a DTensor parameter's gradient must be sharded like the parameter "
                         f"({tuple(p.placements)}), got {got}")


def shard_groups(p: Tensor) -> list:
    """The process groups across which ``p`` is sharded (one per sharded mesh dimension)."""
    return [p.device_mesh.get_group(i) for i, pl in enumerate(p.placements) if pl.is_shard()]


def all_reduce_columns(x: Tensor, params: list[Tensor]) -> Tensor:
    """Sum the column ``i`` of ``x`` (per-tensor partial sums over local coordinates) across the ranks that
    share ``params[i]``'s coordinates. Columns of unsharded tensors (plain tensors, or DTensors replicated
    over some mesh dimension) are whole on every rank and are kept as they are. Returns ``x`` reduced
    (in place) when any parameter is a DTensor, ``x`` untouched otherwise."""
    if dtensor_class() is None:
        return x
    sharded = [shard_groups(p) if is_dtensor(p) else [] for p in params]
    groups = []
    for gs in sharded:
        for g in gs:
            if all(g is not h for h in groups):
                groups.append(g)
    if not groups:
        return x
    import torch.distributed as dist

    for group in groups:
        if dist.get_rank(group) != 0:  # a column this group does not shard: only its first rank contributes
            keep = torch.tensor([any(g is group for g in gs) for gs in sharded], device=x.device)
            x.mul_(keep.to(x.dtype))
        dist.all_reduce(x, group=group)
    return x


def all_across_shards(flags: Tensor, params: list[Tensor]) -> Tensor:
    """Boolean ``flags`` (one per parameter) AND-ed across every rank that shards any of ``params``: the
    ranks must agree on which tensors they skip (their statistics and collectives depend on it). Also
    checks that each DTensor's gradient is sharded like it."""
    if dtensor_class() is None:
        return flags
    groups = []
    for p in params:
        if is_dtensor(p):
            check_sharded(p)
            for g in shard_groups(p):
                if all(g is not h for h in groups):
                    groups.append(g)
    if not groups:
        return flags
    import torch.distributed as dist

    values = flags.to(torch.float32)
    for group in groups:
        dist.all_reduce(values, op=dist.ReduceOp.MIN, group=group)
    return values > 0


def init_state(rule, params: list[Tensor], layout, *, device, generator):
    """``rule.init_state(layout)`` for ``params`` whose (local) shapes are ``layout``. When some are DTensors
    and the rule's initial state depends on the position (``init_state`` takes ``select``), the state is
    drawn for the whole tensors and kept for this rank's coordinates: the same start as unsharded."""
    if (dtensor_class() is None or not any(is_dtensor(p) for p in params)
            or "select" not in inspect.signature(rule.init_state).parameters):
        return rule.init_state(layout, device=device, generator=generator)
    whole = [_real_shape(p) for p in params]
    select = [local_coordinates(p) if is_dtensor(p) else None for p in params]
    return rule.init_state(whole, device=device, generator=generator, select=select)


def local_coordinates(p: Tensor) -> Tensor:
    """Indices of a DTensor's local coordinates in its whole flattened (real) tensor, in local order."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape = _real_shape(p)
    placements = tuple(p.placements)
    local_shape, offset = compute_local_shape_and_global_offset(tuple(p.shape), p.device_mesh, placements)
    if p.is_complex():
        local_shape, offset = tuple(local_shape) + (2,), tuple(offset) + (0,)
    index = torch.zeros((), dtype=torch.long)
    stride = math.prod(shape)
    for size, start, dim in zip(local_shape, offset, shape):
        stride //= dim
        index = index[..., None] + (torch.arange(start, start + size) * stride)
    return index.reshape(-1)


def sharded_state(value: Tensor, p: Tensor) -> Tensor:
    """A coordinate state (features, local coordinates) of DTensor ``p`` as a DTensor of shape
    (features, *p.shape), sharded like ``p`` one dimension further (a view of ``value``)."""
    from torch.distributed.tensor import DTensor

    features = value.shape[0]
    local_shape = _real_shape(local(p))
    placements = [_state_placement(pl) for pl in p.placements]
    shape = (features,) + _real_shape(p)
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(value.view((features,) + local_shape), p.device_mesh, placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)


def local_state(value: Tensor, p: Tensor) -> Tensor:
    """The inverse of ``sharded_state``: the local (features, local coordinates) view of a loaded state."""
    n = local(p).numel() * (2 if p.is_complex() else 1)
    if is_dtensor(value):
        if tuple(value.placements) != tuple(_state_placement(pl) for pl in p.placements):
            raise ValueError(f"load_state_dict: a recurrent state sharded as {tuple(value.placements)} does not "
                             f"match its parameter's placements {tuple(p.placements)}")
        value = local(value)
        return value.reshape(value.shape[0], -1)
    if value.dim() >= 1 and value.shape[-1] == n:  # already the local layout
        return value.reshape(value.shape[0], -1) if value.dim() > 2 else value
    raise ValueError(f"load_state_dict: a recurrent state of shape {tuple(value.shape)} is neither a DTensor nor "
                     f"the local state of this rank's {n} coordinates of the parameter")


def _state_placement(placement):
    """The placement of a coordinate state (features first) for a parameter placed as ``placement``."""
    from torch.distributed.tensor import Shard

    return Shard(placement.dim + 1) if placement.is_shard() else placement
