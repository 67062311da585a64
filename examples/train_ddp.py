"""Data-parallel training with a learned optimizer: DDP, or FSDP2 with ``--fsdp``.

    torchrun --standalone --nproc_per_node 2 examples/train_ddp.py --steps 200
    torchrun --standalone --nproc_per_node 2 examples/train_ddp.py --fsdp --bf16 --weights scale-cl-il

Nothing about the optimizer changes under torch.distributed: build it on ``model.parameters()`` after
wrapping the model. Under DDP every rank gets the same averaged gradients, so every rank's optimizer
takes the same step and holds the same recurrent state. Under FSDP2 (``fully_shard``) the parameters
are DTensor shards: each rank steps its own shard and keeps the recurrent state of that shard only
(L2O-Scale's per-tensor statistics are all-reduced across the shards); ``--bf16`` computes in bfloat16
through ``MixedPrecisionPolicy`` while parameters and optimizer state stay float32.

Data: MNIST read with torchvision from ``--data-root`` (default ``$LEARNED_OPTIM_DATA``) when given, a
synthetic 10-class problem otherwise. Each rank draws its own batches. Runs on the GPU (nccl) when
one is available, on the CPU (gloo) otherwise.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import learned_optim

CLASSES = {"dm": learned_optim.L2ODM, "rnnprop": learned_optim.RNNprop, "scale": learned_optim.L2OScale}


def load_data(root: str | None, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if root:
        from torchvision import datasets

        try:
            ds = datasets.MNIST(root, train=True, download=False)
        except RuntimeError as exc:
            raise SystemExit(f"train_ddp.py: no MNIST under {root!r} ({exc}); unset LEARNED_OPTIM_DATA to train "
                             "on synthetic data") from None
        return ds.data.float().div(255).view(-1, 784).to(device), ds.targets.to(device)
    gen = torch.Generator().manual_seed(seed)  # the same problem on every rank
    x = torch.randn(8192, 784, generator=gen)
    teacher = torch.randn(784, 10, generator=gen)
    return x.to(device), (x @ teacher).argmax(1).to(device)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="rnnprop-cl-il", help="bundled name, .safetensors path or hf:// reference")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=128, help="per rank")
    ap.add_argument("--lr", type=float, default=1.0, help="multiplies the learned update (1: as trained)")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    ap.add_argument("--bf16", action="store_true", help="with --fsdp: bfloat16 compute (MixedPrecisionPolicy)")
    ap.add_argument("--data-root", default=os.environ.get("LEARNED_OPTIM_DATA"))
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.bf16 and not args.fsdp:
        ap.error("--bf16 goes with --fsdp (MixedPrecisionPolicy)")

    cuda = torch.cuda.is_available()
    own_group = not dist.is_initialized()
    if own_group:
        if "RANK" in os.environ:  # launched by torchrun
            dist.init_process_group("nccl" if cuda else "gloo")
        else:  # plain `python examples/train_ddp.py`: one process
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    x, y = load_data(args.data_root, device, args.seed)
    torch.manual_seed(args.seed)  # the same initial model on every rank
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if args.bf16 else None)
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh, mp_policy=policy)
        wrapped = fully_shard(model, mesh=mesh, mp_policy=policy)
    else:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)

    rule = learned_optim.load_rule(learned_optim.resolve_weights(args.weights))
    opt = CLASSES[rule.name](wrapped.parameters(), weights=args.weights, lr=args.lr)
    if rank == 0:
        print(f"{'FSDP2' if args.fsdp else 'DDP'} on {world} process(es), {device.type}: {type(opt).__name__} "
              f"({args.weights}), {'MNIST' if args.data_root else 'synthetic data'}", flush=True)

    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)  # each rank its own batches
    start, loss = time.perf_counter(), torch.zeros((), device=device)
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(y), (args.batch_size,), generator=gen).to(device)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(wrapped(x[idx]), y[idx])
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == args.steps:
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                print(f"step {step:5d}  loss {mean.item() / world:.4f}  ({time.perf_counter() - start:.1f} s)",
                      flush=True)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    states = [None] * world
    dist.all_gather_object(states, state)
    if rank == 0:
        print(f"done: {args.steps} steps, final loss {loss.item():.4f} (rank 0), optimizer state per rank: "
              + ", ".join(f"{s / 2**20:.2f} MiB" for s in states), flush=True)
        if not math.isfinite(loss.item()):
            raise SystemExit("the loss diverged")
    if own_group:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
