"""python -m meta_train --model {dm,rnnprop,scale} [--curriculum] [--imitation] ... --out DIR

Meta-trains a learned optimizer with the techniques of Chen et al. (NeurIPS 2020) and writes
DIR/weights.safetensors (loadable by learned_optim), DIR/log.jsonl, DIR/checkpoint.pt and
DIR/training.png. Several processes: torchrun --standalone --nproc_per_node N -m meta_train ...
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from learned_optim import WeightsError

from .cli import ArgumentParser, fail
from .trainer import MODEL_DEFAULTS, Config, RunError, main_train
from .unroll import CompileError


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"imitation ratios must lie in [0, 1], got {text!r}")
    return values


def _bound(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .tasks import TASKS

    ap = ArgumentParser(prog="python -m meta_train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=sorted(MODEL_DEFAULTS), help="which update rule to train")
    ap.add_argument("--curriculum", action="store_true",
                    help="Algorithm 1: grow the training horizon N_train through --horizons, validating at the next "
                         "stage's horizon; stop when a stage brings no improvement")
    ap.add_argument("--imitation", action="store_true",
                    help="Algorithm 2: with probability r an epoch imitates an analytical optimizer (--teacher) "
                         "off-policy instead of minimising the optimizee loss")
    ap.add_argument("--self-improving", action="store_true",
                    help="Section 4.2 baseline: mix Adam/SGD/Adagrad steps into the rule's trajectories with "
                         "probability annealed to 0 over 100 epochs")
    ap.add_argument("--aug", action="store_true",
                    help="Section 3.1 AUG: longer trajectories (N_train=500) and 5000 epochs of fresh optimizees")
    ap.add_argument("--task", default="mlp-orig", choices=sorted(TASKS), help="the training optimizee")
    ap.add_argument("--out", required=True, help="output directory (weights, log, checkpoint, plot)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the run in --out from its checkpoint.pt (a new run if --out holds none)")
    ap.add_argument("--overwrite", action="store_true",
                    help="start over in an --out that holds a run (deletes its checkpoint, log and weights); without "
                         "it, or --resume, such an --out is refused")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--data-root", default=None,
                    help="torchvision dataset root (default $LEARNED_OPTIM_DATA, else ~/.cache/learned_optim/data)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the rule init, optimizees, batches and coin flips")
    ap.add_argument("--epochs", type=int, default=None,
                    help="cap on the total number of epochs of the run (default: the paper's, per model)")
    ap.add_argument("--horizons", type=_ints, default=None,
                    help="N_train per stage, e.g. 100,200,500 (curriculum) or the single horizon without it")
    ap.add_argument("--unroll", type=int, default=20, help="truncation length of the unrolled BPTT")
    ap.add_argument("--eval-every", type=int, default=None, help="epochs between validations (T_period)")
    ap.add_argument("--eval-runs", type=int, default=None, help="fresh optimizees per validation")
    ap.add_argument("--imitation-ratio", type=_floats, default=None,
                    help="probability r of an imitation epoch; comma list = one value per curriculum stage "
                         "(last one reused)")
    ap.add_argument("--teacher", default="adam", choices=["adam", "sgd", "adagrad", "rmsprop"],
                    help="the analytical optimizer imitated")
    ap.add_argument("--teacher-lr", type=float, default=0.01, help="learning rate of the teacher")
    ap.add_argument("--meta-lr", type=float, default=None,
                    help="meta-optimizer learning rate (default Adam 1e-3 for dm/rnnprop, RMSprop 1e-6 for scale)")
    ap.add_argument("--random-scale", type=_bound, default=0.0, metavar="B",
                    help="random scaling (Lv et al. 2017; the paper code's if_scale, rd_scale_bound=3): each training "
                         "epoch draws r = exp(U(-B, B)) per optimizee coordinate, starts at theta0/r and trains on "
                         "f(theta*r), imitation included; validation is never scaled (default 0: off)")
    ap.add_argument("--population", type=int, default=1, metavar="K",
                    help="optimizees per meta-step, advanced together in one vectorized unroll (torch.func.vmap), "
                         "each with its own initialisation, batches and random scaling; the meta-loss is their "
                         "mean. Split evenly across torchrun processes; validation then runs its --eval-runs "
                         "optimizees as one population too (default 1: one optimizee per process)")
    ap.add_argument("--min-evals", type=int, default=3, help="N_period: validations per stage at least")
    ap.add_argument("--fixed-validation", action="store_true",
                    help="validate on the same --eval-runs optimizees (initialisation and batches) every time "
                         "instead of fresh ones (the paper's code), so that the curriculum's improved / no "
                         "improvement decisions compare rules, not draws")
    ap.add_argument("--valid-horizon", type=int, default=None, metavar="N",
                    help="validate at N optimizee steps in every stage, e.g. the evaluation horizon 10000 "
                         "(default: the next stage's N_train, Algorithm 1; N_train without --curriculum)")
    ap.add_argument("--valid-examples", type=int, default=None, metavar="M",
                    help="validation optimizees train on a fixed subset of M examples of the training split, e.g. "
                         "10000, the size of the evaluation's data (default: the whole training split)")
    ap.add_argument("--init", default=None, metavar="WEIGHTS",
                    help="start the rule from trained weights (a bundled name, a .safetensors path or "
                         "hf://org/repo[/file][@revision]) instead of a fresh initialisation, to fine-tune them; "
                         "they are validated first and stay the exported model until training beats them (with "
                         "--curriculum: the first stage's baseline)")
    ap.add_argument("--compile", action="store_true",
                    help="run the rule's forward and backward through torch.compile (dm, rnnprop): fused "
                         "element-wise work, 1.1x faster per meta-step on one CPU core after 10-30 s of compilation "
                         "(cached on disk for later runs); float rounding differs from the eager rule, so resume a "
                         "run with the flag it ran with")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return ap


def main(argv=None) -> None:
    ap = build_parser()
    args = ap.parse_args(argv)
    for name in ("epochs", "unroll", "eval_every", "eval_runs", "min_evals", "population", "valid_horizon",
                 "valid_examples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.population > 1 and args.population % world:
        ap.error(f"--population {args.population} must be a multiple of the number of processes ({world})")
    if args.meta_lr is not None and not (args.meta_lr > 0 and math.isfinite(args.meta_lr)):
        ap.error(f"--meta-lr must be a positive number, got {args.meta_lr}")
    if not (args.teacher_lr > 0 and math.isfinite(args.teacher_lr)):
        ap.error(f"--teacher-lr must be a positive number, got {args.teacher_lr}")
    if args.horizons is not None and (not args.horizons or min(args.horizons) < 1):
        ap.error(f"--horizons must be positive integers, got {args.horizons}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            ap.error(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    if args.compile and args.model == "scale":
        ap.error("--compile supports --model dm and rnnprop (L2O-Scale's per-tensor statistics run eagerly)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = Config(model=args.model, out=args.out, curriculum=args.curriculum, imitation=args.imitation,
                 self_improving=args.self_improving, aug=args.aug, task=args.task, device=args.device,
                 data_root=args.data_root, seed=args.seed, epochs=args.epochs, horizons=args.horizons,
                 unroll=args.unroll, eval_every=args.eval_every, eval_runs=args.eval_runs,
                 imitation_ratio=args.imitation_ratio, teacher=args.teacher, teacher_lr=args.teacher_lr,
                 meta_lr=args.meta_lr, min_evals=args.min_evals, random_scale=args.random_scale,
                 fixed_validation=args.fixed_validation, valid_horizon=args.valid_horizon,
                 valid_examples=args.valid_examples,
                 population=args.population, compile=args.compile, init=args.init,
                 progress=not args.no_progress, resume=args.resume, overwrite=args.overwrite)
    try:
        path = main_train(cfg)
    except (RunError, WeightsError, FileNotFoundError, CompileError) as exc:
        fail(f"python -m meta_train: error: {exc}")
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun: rank 0 reports
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
