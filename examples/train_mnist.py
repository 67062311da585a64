"""Train a small MNIST MLP with a learned optimizer beside Adam and plot both loss curves.

    python examples/train_mnist.py --weights rnnprop-cl-il --steps 2000 --data-root /path/to/data --out curves.png

``--weights`` takes a bundled name (``python -c "import learned_optim; print(learned_optim.available_weights())"``),
a path to a .safetensors file, or ``hf://org/repo[/file][@revision]``. MNIST is read with torchvision from
``--data-root`` (default ``$LEARNED_OPTIM_DATA``), downloaded there if missing and online.
"""
from __future__ import annotations

import argparse
import math
import os

import torch
from torch import nn

import learned_optim

CLASSES = {"dm": learned_optim.L2ODM, "rnnprop": learned_optim.RNNprop, "scale": learned_optim.L2OScale}


def load_mnist(root: str, device: str):
    from torchvision import datasets

    try:
        ds = datasets.MNIST(root, train=True, download=False)
    except RuntimeError:
        ds = datasets.MNIST(root, train=True, download=True)
    x = ds.data.float().div(255).view(-1, 784).to(device)
    return x, ds.targets.to(device)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 20), nn.Sigmoid(), nn.Linear(20, 10))
    for p in model.parameters():  # the paper's N(0, 0.01) initialisation
        nn.init.normal_(p, std=0.01)
    return model


def train(model, opt, x, y, steps: int, seed: int, name: str) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    report = max(1, steps // 10)
    for step in range(1, steps + 1):
        idx = torch.randint(len(y), (128,), generator=gen).to(x.device)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % report == 0 or step == steps:
            recent = losses[-min(100, len(losses)):]
            print(f"{name}: step {step}/{steps}, ln loss (last {len(recent)} steps) "
                  f"{math.log(sum(recent) / len(recent)):.3f}", flush=True)
    return losses


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="bundled name, .safetensors path or hf:// reference "
                                                    "(default: the bundled rnnprop-cl-il)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=1.0, help="the learned optimizer's lr (multiplies its update)")
    ap.add_argument("--adam-lr", type=float, default=1e-2)
    ap.add_argument("--data-root", default=os.environ.get("LEARNED_OPTIM_DATA", "data"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="learned_vs_adam.png")
    args = ap.parse_args(argv)

    weights = args.weights
    if weights is None:
        names = learned_optim.available_weights("rnnprop") + learned_optim.available_weights("dm")
        names.sort(key=lambda n: not n.endswith("cl-il"))  # the curriculum + imitation weights first
        if not names:
            raise SystemExit("no bundled weights in this install: pass --weights PATH or hf://org/repo")
        weights = names[0]
    rule_name = learned_optim.read_metadata(learned_optim.resolve_weights(weights))["rule"]
    cls = CLASSES[rule_name]
    print(f"loading MNIST from {args.data_root}", flush=True)
    x, y = load_mnist(args.data_root, args.device)

    curves = {}
    model = make_model(args.seed).to(args.device)
    name = f"{cls.__name__}(weights={weights!r}" + (f", lr={args.lr:g})" if args.lr != 1.0 else ")")
    curves[name] = train(model, cls(model.parameters(), weights=weights, lr=args.lr), x, y, args.steps, args.seed,
                         name)
    model = make_model(args.seed).to(args.device)
    name = f"Adam(lr={args.adam_lr:g})"
    curves[name] = train(model, torch.optim.Adam(model.parameters(), lr=args.adam_lr), x, y, args.steps, args.seed,
                         name)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, losses in curves.items():
        smooth = [sum(losses[max(0, i - 49): i + 1]) / len(losses[max(0, i - 49): i + 1]) for i in range(len(losses))]
        ax.plot([math.log(v) for v in smooth], label=label)
        tail = losses[-min(100, len(losses)):]
        print(f"{label}: final ln loss (mean of the last {len(tail)} steps) = {math.log(sum(tail) / len(tail)):.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("ln training loss (50-step moving average)")
    ax.set_title("MNIST MLP 784-20-10 (sigmoid)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
