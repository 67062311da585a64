"""python -m meta_train.evaluate --optimizer NAME|PATH|adam|rmsprop|sgd --task TASK [--lr LR | --lr-grid [a,b,...]]
                                --steps 10000 --seeds 10 --out DIR [--data-root PATH] [--workers N] [--threads 1]
                                [--device cpu] [--label LABEL]

The paper's evaluation protocol (Chen et al. 2020, Section 5; docs/reproduction.md), run the way users run them:
for every seed a real ``nn.Module`` of the task is built, a fresh N(0, 0.01) initialisation is copied
into it, and ``torch.optim``-style ``zero_grad() / loss.backward() / step()`` runs for ``--steps``
steps on batches of 128 drawn with replacement from the *test* split (as the paper's code does).
Learned optimizers are ``learned_optim.L2ODM / RNNprop / L2OScale(params, weights=..., lr=...)``
(class picked from the weight file's ``rule``); baselines are ``torch.optim.Adam / RMSprop / SGD``.
One ``torch.Generator`` seeded with the seed draws the initialisation and then every batch, so all
optimizers see the same initialisations and batches.

Recorded per seed: the loss of every step (the loss at the parameters *before* that step's update,
so ``losses[0]`` is the initial loss), rounded to 6 significant digits. Summaries:

- ``final_ln_loss`` of a seed: ln of the mean loss over the last ``min(100, steps)`` steps. A run
  whose loss becomes NaN/Inf is stopped there (its curve ends with ``null``) and its final value is
  ``null`` (read: +inf).
- ``final_ln_loss_mean`` / ``final_ln_loss_std``: mean and population std (ddof=0) over the seeds
  with a finite final value; ``nonfinite`` says how many seeds were left out (``null`` if all were).
- ``diverged``: seeds that hit NaN/Inf or whose final mean loss is above their initial loss (finite
  diverged seeds do count in the mean).

Learning rates: learned optimizers default to ``lr=1.0`` (the rule as trained); baselines given
neither ``--lr`` nor ``--lr-grid`` are evaluated on the default grid (half-decades 1e-4 .. 1).

Outputs in ``--out``: ``{label}__{task}.json`` (grid points: ``{label}__{task}__lr{lr:g}.json``, plus
``{label}__{task}__grid.json`` with every point and the best lr: lowest mean among points without
divergence, else fewest NaN/Inf seeds then lowest mean), and ``{task}.png`` (ln loss vs step,
mean +- std over seeds, every non-grid run of the task plus the best point of every grid).

Resume: each finished seed is written at once to ``.partial/{run}/seed{k}.json``; rerunning the same
command skips finished seeds (partials whose settings differ are ignored). When a run is complete
its JSON holds every curve and the partial files are removed; a later rerun reuses the seeds stored
in that JSON (e.g. ``--seeds 20`` after ``--seeds 10`` only runs seeds 10-19).

Batched seeds (``--batch-seeds [N]``; the default on CUDA): the seeds of a point train as one population
(:func:`train_seeds`): the same initialisation and batches per seed, the same optimizer classes and
per-coordinate maths, the module run on all seeds at once through ``torch.func.vmap``. Curves equal the
sequential path's to float rounding (which, like any rounding difference, grows along a long trajectory);
results are keyed and stored exactly as the sequential path's, so either reuses the other's seeds.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import multiprocessing
import os
import re
import shlex
import shutil
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from . import curves as curve_store
from .cli import ArgumentParser

TAIL = 100  # steps averaged for the final loss
DEFAULT_LR_GRID = tuple(float(f"{10 ** (k / 2 - 4):.6g}") for k in range(9))  # 1e-4, 3.16e-4, ..., 1
BASELINES = ("adam", "rmsprop", "sgd")
LEARNED_CLASSES = {"dm": "L2ODM", "rnnprop": "RNNprop", "scale": "L2OScale"}
LN_FLOOR_LOSS = 1e-45  # float32's smallest positive value: ln of an exactly-zero mean loss uses this
PLOT_POINTS = 500  # curves are averaged over windows of ceil(steps / PLOT_POINTS) steps in the PNG


# ----------------------------------------------------------------------------------- run description
class EvaluationError(ValueError):
    """An evaluation request that cannot run (unknown task, missing lr, bad steps)."""


@dataclass(frozen=True)
class RunSpec:
    """One evaluation point: an optimizer at one lr on one task, over ``seeds``."""

    optimizer: str  # as given: bundled name, path, hf://..., or adam/rmsprop/sgd
    task: str
    lr: float
    steps: int
    seeds: tuple[int, ...]
    label: str
    grid_point: bool = False
    rule: str | None = None  # learned optimizers: dm / rnnprop / scale
    weights_path: str | None = None  # learned optimizers: the resolved local file
    weights_sha256: str | None = None  # of the file: refuses a file replaced during the run
    weights_digest: str | None = None  # of its rule, config and tensors (learned_optim.weights_digest): the key
    data_root: str | None = None
    device: str = "cpu"
    data_tag: str = ""  # the dataset name, or "injected" when tensors were passed in
    state_dtype: str = "float32"  # learned optimizers: dtype of the recurrent state
    init: str = "normal(0.01)"  # Task.init_scheme: how the optimizee's parameters are drawn

    @property
    def run_id(self) -> str:
        base = f"{self.label}__{self.task}"
        return f"{base}__lr{self.lr:g}" if self.grid_point else base

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a stored seed to be reused (not the label, seeds or paths). ``init`` is recorded
        only for tasks whose init is not plain N(0, 0.01) (normalisation layers start as the identity): results
        made before that fix, when every parameter was N(0, 0.01), then never match. Learned weights are keyed on
        their digest (a model card rewritten later changes the file's sha256, not the digest); baselines keep the
        ``weights_sha256: null`` their stored results were made with."""
        from .tasks import PLAIN_INIT

        weights = {"weights_digest": self.weights_digest} if self.weights_digest else {"weights_sha256": None}
        return {"optimizer": self.rule or self.optimizer, **weights, "task": self.task,
                "lr": self.lr, "steps": self.steps, "device": self.device, "data": self.data_tag, "split": "test",
                "state_dtype": self.state_dtype, **({} if self.init == PLAIN_INIT else {"init": self.init})}


def parse_lr_grid(text: str) -> tuple[float, ...]:
    """``"default"`` -> :data:`DEFAULT_LR_GRID`; ``"a,b,c"`` -> those values (positive floats)."""
    if text.strip() == "default":
        return DEFAULT_LR_GRID
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'default' or comma-separated numbers, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise argparse.ArgumentTypeError(f"learning rates must be positive and finite, got {text!r}")
    return values


def sanitize_label(text: str) -> str:
    """A label usable in file names."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "optimizer"


def default_label(optimizer: str) -> str:
    """Baselines and bundled names as given; a file: its stem (its folder's name for ``weights.safetensors``);
    ``hf://org/repo[/file]``: the repo name."""
    if optimizer in BASELINES or "/" not in optimizer and not optimizer.endswith(".safetensors"):
        return sanitize_label(optimizer)
    if optimizer.startswith("hf://"):
        return sanitize_label(optimizer[len("hf://"):].split("@")[0].split("/")[1])
    path = Path(optimizer)
    return sanitize_label(path.parent.name if path.stem == "weights" and path.parent.name else path.stem)


def _as_seeds(seeds: int | Iterable[int]) -> tuple[int, ...]:
    return tuple(range(seeds)) if isinstance(seeds, int) else tuple(int(s) for s in seeds)


def make_spec(optimizer: str, task: str, *, lr: float | None = None, steps: int = 10000,
              seeds: int | Iterable[int] = 10, label: str | None = None, grid_point: bool = False,
              data_root: str | None = None, device: str = "cpu", injected_data: bool = False,
              state_dtype: str = "float32") -> RunSpec:
    """Validate and resolve one evaluation point (learned weights are resolved and hashed here, once)."""
    from learned_optim import read_metadata, resolve_weights, weights_digest
    from learned_optim.weights import sha256_file

    from .tasks import TASKS, init_scheme

    if task not in TASKS:
        raise EvaluationError(f"Unknown task {task!r}; known tasks: {sorted(TASKS)}")
    if steps < 1:
        raise EvaluationError(f"steps must be >= 1, got {steps}")
    rule = weights_path = sha = digest = None
    if state_dtype not in ("float32", "bfloat16", "float16"):
        raise EvaluationError(f"Invalid state dtype {state_dtype!r} (float32, bfloat16 or float16)")
    if optimizer in BASELINES:
        if lr is None:
            raise EvaluationError(f"{optimizer} needs an lr (or evaluate a grid)")
    else:
        path = resolve_weights(optimizer)
        rule, weights_path, sha = read_metadata(path)["rule"], str(Path(path).resolve()), sha256_file(path)
        digest = weights_digest(path)
        lr = 1.0 if lr is None else lr
    return RunSpec(optimizer=str(optimizer), task=task, lr=float(lr), steps=int(steps), seeds=_as_seeds(seeds),
                   label=sanitize_label(label) if label else default_label(str(optimizer)), grid_point=grid_point,
                   rule=rule, weights_path=weights_path, weights_sha256=sha, weights_digest=digest,
                   data_root=None if data_root is None else str(data_root), device=str(device),
                   data_tag="injected" if injected_data else TASKS[task][1], state_dtype=state_dtype,
                   init=init_scheme(task))


# ----------------------------------------------------------------------------------- one seed
def load_task_data(spec: RunSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation split (test) of the task's dataset."""
    from . import data as data_module
    from .tasks import TASKS

    return data_module.load_dataset(TASKS[spec.task][1], train=False, root=spec.data_root, device=spec.device)


def build_model(task, flat: torch.Tensor) -> torch.nn.Module:
    """A fresh copy of the task's ``nn.Module`` holding the flat parameter vector ``flat``."""
    model = copy.deepcopy(task.module).train()
    torch.nn.utils.vector_to_parameters(flat.detach().clone(), model.parameters())
    return model


def build_optimizer(spec: RunSpec, params, **options) -> torch.optim.Optimizer:
    """The optimizer exactly as a user builds it (``options``: more keyword arguments of a learned optimizer)."""
    if spec.rule is None:
        cls = {"adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop, "sgd": torch.optim.SGD}[spec.optimizer]
        return cls(params, lr=spec.lr)
    import learned_optim

    # the digest, not the file's sha256: a card refreshed mid-run (export --refresh) changes only the metadata
    if spec.weights_digest is not None and learned_optim.weights_digest(spec.weights_path) != spec.weights_digest:
        raise EvaluationError(
            f"{spec.weights_path} changed after this evaluation resolved it (weights digest "
            f"{spec.weights_digest[:12]}...): the seeds would mix two sets of weights. Rerun the command to evaluate "
            "the new file.")
    return getattr(learned_optim, LEARNED_CLASSES[spec.rule])(params, weights=spec.weights_path, lr=spec.lr,
                                                              state_dtype=getattr(torch, spec.state_dtype), **options)


def round6(value: float) -> float | None:
    """6 significant digits; ``None`` for NaN/Inf (strict JSON)."""
    return float(f"{value:.6g}") if math.isfinite(value) else None


def train_seed(spec: RunSpec, seed: int,
               data: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.nn.Module, list[float | None]]:
    """Train one optimizee for ``spec.steps`` steps: the trained model and the loss of every step (stops at the
    first NaN/Inf)."""
    from .tasks import Task

    torch.manual_seed(seed)  # anything drawing from the global stream is seeded too
    task = Task(spec.task, train=False, device=spec.device, data=data if data is not None else load_task_data(spec))
    generator = torch.Generator().manual_seed(seed)
    model = build_model(task, task.init_params(generator))
    opt = build_optimizer(spec, model.parameters())
    losses: list[float | None] = []
    for _ in range(spec.steps):
        batch = task.sample_batch(generator)
        opt.zero_grad()
        loss = F.cross_entropy(model(batch.x), batch.y)
        value = round6(float(loss.detach()))
        losses.append(value)
        if value is None:
            break
        loss.backward()
        opt.step()
    return model, losses


def run_seed(spec: RunSpec, seed: int, data: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """Train one optimizee for ``spec.steps`` steps; the loss of every step (stops at the first NaN/Inf)."""
    start = time.perf_counter()
    _, losses = train_seed(spec, seed, data)
    return {"seed": seed, "losses": losses, "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------- seeds as one population
BATCH_CHUNK = 100  # steps whose batch indices are drawn and moved to the device at once


def _population_losses(task, module):
    """``(params, x, y) -> losses (K,)``: the task's module on every member at once (``torch.func.vmap`` over
    ``functional_call``; batch norm keeps per-member statistics)."""
    from torch.func import functional_call, vmap

    def member_loss(params, x, y):
        return F.cross_entropy(functional_call(module, params, (x,)), y)

    return vmap(member_loss)


def train_seeds(spec: RunSpec, seeds: Sequence[int], data: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[list[list[float | None]], list[int]]:
    """Train the optimizees of ``seeds`` as one population, through the same optimizer classes as
    :func:`train_seed`: the loss of every step of every seed, and the seeds that must be rerun on their own.

    Seed k draws its initialisation and batches from its own ``torch.Generator`` exactly as :func:`train_seed`
    does. The parameters are stacked, one (K, *shape) leaf per tensor of the module, and the module runs on all
    members at once through ``vmap(functional_call)``; each member's gradient is its own. Element-wise and
    coordinate-wise optimizers (Adam, RMSprop, SGD, L2O-DM, RNNprop) then step the stacked tensors: one
    optimizer, the same per-coordinate maths as for one seed. L2O-Scale keeps per-tensor and global statistics,
    so every seed gets its own ``L2OScale`` over views of its rows of the stacked tensors (its state then starts
    exactly as it does for one seed). A seed stops counting at its first NaN/Inf loss (its gradient is zeroed
    from then on, so it cannot disturb the others). A coordinate-wise learned optimizer would skip a whole
    stacked tensor whose gradient holds a NaN/Inf, where one seed skips only its own tensor: a seed whose
    gradient turns NaN/Inf at a finite loss is therefore listed for a rerun on its own (rare).
    """
    from .tasks import Task

    torch.manual_seed(seeds[0])
    task = Task(spec.task, train=False, device=spec.device, data=data if data is not None else load_task_data(spec))
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    flats = [task.init_params(g) for g in generators]
    k, device = len(seeds), task.device
    module = copy.deepcopy(task.module).train()
    stacked = {name: torch.stack([task.unflatten(flat)[name] for flat in flats]).requires_grad_(True)
               for name in task.names}
    leaves = list(stacked.values())
    per_seed = spec.rule is not None and not _rule_is_coordinatewise(spec.rule)
    if per_seed:
        views = [[leaf.detach()[i] for leaf in leaves] for i in range(k)]
        optimizers = [build_optimizer(spec, member) for member in views]
    else:
        chunk = {"chunk_size": 8192 * k} if spec.rule is not None and device.type == "cuda" else {}
        optimizers = [build_optimizer(spec, leaves, **chunk)]
        views = None
    check_grads = spec.rule is not None and not per_seed
    losses_of = _population_losses(task, module)
    alive = torch.ones(k, dtype=torch.bool, device=device)
    rerun = torch.zeros(k, dtype=torch.bool, device=device)
    recorded: list[torch.Tensor] = []
    for t in range(spec.steps):
        if t % BATCH_CHUNK == 0:
            if t and not bool(alive.any()):
                break  # every seed has stopped
            steps = min(BATCH_CHUNK, spec.steps - t)
            idx = torch.stack([torch.stack([torch.randint(len(task.y), (task.batch_size,), generator=g)
                                            for g in generators]) for _ in range(steps)]).to(device)
        x, y = task.x[idx[t % BATCH_CHUNK]], task.y[idx[t % BATCH_CHUNK]]
        for leaf in leaves:
            leaf.grad = None
        losses = losses_of(stacked, x, y)
        recorded.append(losses.detach())
        alive &= torch.isfinite(losses.detach())
        losses.sum().backward()
        if check_grads:
            finite = torch.stack([torch.isfinite(leaf.grad).flatten(1).all(1) for leaf in leaves]).all(0)
            rerun |= alive & ~finite
            alive &= finite
        for leaf in leaves:
            leaf.grad = torch.where(alive.view(-1, *[1] * (leaf.dim() - 1)), leaf.grad, 0.0)
        if per_seed:
            for i, (opt, member) in enumerate(zip(optimizers, views)):
                for view, leaf in zip(member, leaves):
                    view.grad = leaf.grad[i]
                opt.step()
        else:
            optimizers[0].step()
    curves = []
    for column in torch.stack(recorded).T.tolist():
        curve = []
        for v in column:
            curve.append(round6(v))
            if curve[-1] is None:
                break
        curves.append(curve)
    return curves, [seed for seed, flag in zip(seeds, rerun.tolist()) if flag]


def _rule_is_coordinatewise(name: str) -> bool:
    from learned_optim.rules import RULES

    return RULES[name].coordinatewise


def run_seeds(spec: RunSpec, seeds: Sequence[int],
              data: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """:func:`run_seed` for several seeds at once (:func:`train_seeds`); the records in the order of ``seeds``.
    Each seed's ``seconds`` is its share of the population's time."""
    if len(seeds) == 1:
        return [run_seed(spec, seeds[0], data)]
    start = time.perf_counter()
    curves, rerun = train_seeds(spec, seeds, data)
    share = (time.perf_counter() - start) / len(seeds)
    records = [{"seed": seed, "losses": curve, "seconds": share} for seed, curve in zip(seeds, curves)]
    for i, seed in enumerate(seeds):
        if seed in rerun:
            records[i] = run_seed(spec, seed, data)
    return records


# ----------------------------------------------------------------------------------- summaries
def seed_final(losses: Sequence[float | None], steps: int, tail: int = TAIL,
               length: int | None = None) -> tuple[float | None, bool]:
    """(ln of the mean loss of the last ``min(tail, steps)`` steps or ``None`` for NaN/Inf, diverged?).

    ``losses`` is a full curve, or a thinned one (:mod:`meta_train.curves`: it keeps the initial loss and the
    last losses whole, and a NaN/Inf ends it) with ``length`` the full curve's length."""
    length = len(losses) if length is None else length
    if length < steps or any(v is None for v in losses):
        return None, True
    window = losses[-min(tail, steps):]
    mean = sum(window) / len(window)
    return math.log(max(mean, LN_FLOOR_LOSS)), mean > losses[0]


def summarize(curves: Sequence[Sequence[float | None]], steps: int, tail: int = TAIL,
              lengths: Sequence[int] | None = None) -> dict[str, Any]:
    """Per-seed final ln losses and their mean/std over seeds, divergence counts (``lengths``: of thinned
    curves)."""
    lengths = [len(c) for c in curves] if lengths is None else lengths
    finals, flags = zip(*(seed_final(c, steps, tail, n) for c, n in zip(curves, lengths))) if curves else ((), ())
    finite = [f for f in finals if f is not None]
    return {"final_ln_loss": list(finals),
            "final_ln_loss_mean": statistics.fmean(finite) if finite else None,
            "final_ln_loss_std": statistics.pstdev(finite) if finite else None,
            "nonfinite": len(finals) - len(finite), "diverged": sum(flags)}


def best_point(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Lowest ``final_ln_loss_mean`` among points without divergence; else fewest NaN/Inf seeds, then lowest mean."""
    def mean(p):
        return math.inf if p["final_ln_loss_mean"] is None else p["final_ln_loss_mean"]

    clean = [p for p in points if p["diverged"] == 0 and p["final_ln_loss_mean"] is not None]
    if clean:
        return min(clean, key=mean)
    return min(points, key=lambda p: (p["nonfinite"], mean(p)))


# ----------------------------------------------------------------------------------- files
def write_json_atomic(path: Path, obj: Any) -> None:
    """Strict JSON (no NaN/Infinity), written to a temporary file then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, allow_nan=False, separators=(",", ":")))
    os.replace(tmp, path)


def result_path(out: Path, spec: RunSpec) -> Path:
    return Path(out) / f"{spec.run_id}.json"


def grid_path(out: Path, label: str, task: str) -> Path:
    return Path(out) / f"{label}__{task}__grid.json"


def partial_dir(out: Path, spec: RunSpec) -> Path:
    return Path(out) / ".partial" / spec.run_id


def partial_path(out: Path, spec: RunSpec, seed: int) -> Path:
    return partial_dir(out, spec) / f"seed{seed}.json"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_finished(out: Path, spec: RunSpec) -> dict[int, dict[str, Any]]:
    """Seeds of ``spec`` already computed with the same settings: from its result JSON (or the result of the
    same point stored the other way, as a grid point or as a single run at that lr), then partial files."""
    done: dict[int, dict[str, Any]] = {}
    fp = spec.fingerprint()
    sibling = dataclasses.replace(spec, grid_point=not spec.grid_point)
    for path in (result_path(out, spec), result_path(out, sibling)):
        result = _read_json(path)
        if not result or result.get("fingerprint") != fp:
            continue
        for seed, losses, seconds, length in zip(result["seeds"], result["losses"], result["seconds_per_seed"],
                                                 curve_store.lengths(result)):
            if seed in spec.seeds and seed not in done:
                done[seed] = {"seed": seed, "losses": losses, "seconds": seconds, "length": length}
    for seed in spec.seeds:
        record = _read_json(partial_path(out, spec, seed))
        if seed not in done and record and record.get("fingerprint") == fp:
            done[seed] = record
    return done


def save_partial(out: Path, spec: RunSpec, record: dict[str, Any]) -> None:
    write_json_atomic(partial_path(out, spec, record["seed"]), {**record, "fingerprint": spec.fingerprint()})


def portable_path(path: str | None) -> str | None:
    """``path`` relative to the working directory when it lies under it (result files are committed and must not
    name the machine they were made on), else unchanged."""
    if path is None:
        return None
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path


def build_result(spec: RunSpec, records: dict[int, dict[str, Any]], *, wall_seconds: float,
                 command: str | None) -> dict[str, Any]:
    """The result JSON of a finished run (every seed in ``records``)."""
    import learned_optim

    # stored thinned (meta_train.curves): every 20th loss and the last 100 whole keep every number of the summary
    lengths = [records[s].get("length", len(records[s]["losses"])) for s in spec.seeds]
    thinned = [records[s]["losses"] if "length" in records[s] else curve_store.thin(records[s]["losses"])
               for s in spec.seeds]
    seconds = [records[s]["seconds"] for s in spec.seeds]
    summary = summarize(thinned, spec.steps, lengths=lengths)
    return {"type": "evaluation", "optimizer": spec.optimizer, "label": spec.label, "rule": spec.rule,
            "weights_path": portable_path(spec.weights_path), "weights_sha256": spec.weights_sha256,
            "weights_digest": spec.weights_digest, "task": spec.task,
            "dataset": spec.data_tag, "split": "test", "lr": spec.lr, "grid_point": spec.grid_point,
            "steps": spec.steps, "tail": min(TAIL, spec.steps), "seeds": list(spec.seeds), **summary,
            "diverged_seeds": [s for s, c, n in zip(spec.seeds, thinned, lengths) if seed_final(c, spec.steps,
                                                                                                  length=n)[1]],
            "seconds": sum(seconds), "seconds_per_seed": seconds, "wall_seconds": wall_seconds,
            "torch_version": torch.__version__, "learned_optim_version": learned_optim.__version__,
            "device": spec.device, "command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "fingerprint": spec.fingerprint(),
            "curves": {"every": curve_store.EVERY, "tail": curve_store.TAIL, "lengths": lengths}, "losses": thinned}


def finish_run(out: Path, spec: RunSpec, records: dict[int, dict[str, Any]], *, wall_seconds: float,
               command: str | None) -> dict[str, Any]:
    """Write the result JSON, then drop the partial files it supersedes."""
    result = build_result(spec, records, wall_seconds=wall_seconds, command=command)
    write_json_atomic(result_path(out, spec), result)
    shutil.rmtree(partial_dir(out, spec), ignore_errors=True)
    try:
        (Path(out) / ".partial").rmdir()
    except OSError:
        pass
    return result


# ----------------------------------------------------------------------------------- running
def _worker_init(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


@contextmanager
def torch_threads(threads: int | None):
    """Run with ``threads`` intra-op threads (``None``: unchanged), restoring the previous setting."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_workers(n_seeds: int) -> int:
    return max(1, min(n_seeds, os.cpu_count() or 1))


def batch_size_for(batch_seeds: int | None, device: str) -> int:
    """Seeds per population: ``None`` (auto) is every seed of a point on CUDA and one at a time on the CPU
    (where batching gains little: benchmarks/evaluate_speed.py); 0 is every seed of a point; N >= 1 at most N."""
    if batch_seeds is None:
        return 0 if str(device).startswith("cuda") else 1
    if batch_seeds < 0:
        raise EvaluationError(f"batch_seeds must be >= 0 (0: all the seeds of a point), got {batch_seeds}")
    return batch_seeds


def seed_groups(missing: dict[RunSpec, list[int]], size: int, workers: int) -> list[tuple[RunSpec, tuple[int, ...]]]:
    """The jobs: each point's missing seeds in groups of at most ``size`` (0: all of them, split into as many
    groups as it takes to keep ``workers`` processes busy)."""
    points = [spec for spec, seeds in missing.items() if seeds]
    jobs = []
    for spec in points:
        seeds = missing[spec]
        n = size or math.ceil(len(seeds) / max(1, workers // len(points)))
        jobs += [(spec, tuple(seeds[i:i + n])) for i in range(0, len(seeds), n)]
    return jobs


def run_job(spec: RunSpec, seeds: Sequence[int],
            data: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """One job of :func:`run_specs`: one seed on its own (:func:`run_seed`), or several as one population."""
    return [run_seed(spec, seeds[0], data)] if len(seeds) == 1 else run_seeds(spec, seeds, data)


def run_specs(specs: Sequence[RunSpec], out: str | os.PathLike, *, workers: int | None = None,
              data: tuple[torch.Tensor, torch.Tensor] | None = None, command: str | None = None,
              progress: bool = True, threads: int | None = 1, batch_seeds: int | None = None) -> list[dict[str, Any]]:
    """Evaluate several points (e.g. a grid) with one pool of workers; returns their result dicts.

    ``workers == 1`` runs in this process (no pool); otherwise a 'spawn' ProcessPoolExecutor.
    Either way each seed runs with ``threads`` torch threads (default 1: the optimizees are small,
    and several threads per process slow down badly when the cores are shared; ``None`` leaves
    torch's setting). Finished seeds are saved as they arrive, so an interrupted call resumes
    where it stopped. ``batch_seeds``: seeds per population (see :func:`batch_size_for`).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = {spec: load_finished(out, spec) for spec in specs}
    missing = {spec: [seed for seed in spec.seeds if seed not in done[spec]] for spec in specs}
    n_missing = sum(map(len, missing.values()))
    total = sum(len(spec.seeds) for spec in specs)
    if n_missing and data is None:
        load_task_data(specs[0])  # fail here, with the data module's message, if the dataset is missing
    workers = default_workers(n_missing) if workers is None else max(1, min(workers, max(n_missing, 1)))
    jobs = seed_groups(missing, batch_size_for(batch_seeds, specs[0].device), workers)
    workers = min(workers, max(len(jobs), 1))
    results: dict[RunSpec, dict[str, Any]] = {}

    def finished(spec: RunSpec, record: dict[str, Any]) -> None:
        save_partial(out, spec, record)
        done[spec][record["seed"]] = record
        bar.update(1)
        if len(done[spec]) == len(spec.seeds):
            results[spec] = finish_run(out, spec, done[spec], wall_seconds=time.perf_counter() - start,
                                       command=command)

    desc = specs[0].run_id if len(specs) == 1 else f"{specs[0].label}__{specs[0].task} ({len(specs)} lrs)"
    with tqdm(total=total, initial=total - n_missing, desc=desc, unit="seed", disable=not progress) as bar:
        for spec in specs:  # already complete: keep its result file unless it differs
            if len(done[spec]) == len(spec.seeds):
                existing = _read_json(result_path(out, spec))
                complete = existing and existing.get("fingerprint") == spec.fingerprint() and \
                    existing["seeds"] == list(spec.seeds) and existing["label"] == spec.label
                results[spec] = existing if complete else finish_run(
                    out, spec, done[spec], wall_seconds=time.perf_counter() - start, command=command)
        if workers == 1:
            with torch_threads(threads):
                for spec, seeds in jobs:
                    for record in run_job(spec, seeds, data):
                        finished(spec, record)
        elif jobs:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                     initargs=(threads,)) as pool:
                pending = {pool.submit(run_job, spec, seeds, data): spec for spec, seeds in jobs}
                try:
                    while pending:
                        ready, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in ready:
                            spec = pending.pop(fut)
                            for record in fut.result():
                                finished(spec, record)
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    return [results[spec] for spec in specs]


def evaluate(optimizer: str, task: str, *, lr: float | None = None, steps: int = 10000,
             seeds: int | Iterable[int] = 10, out: str | os.PathLike, label: str | None = None,
             data_root: str | None = None, device: str = "cpu", workers: int | None = None,
             data: tuple[torch.Tensor, torch.Tensor] | None = None, command: str | None = None,
             progress: bool = True, plot: bool = True, threads: int | None = 1,
             state_dtype: str = "float32", batch_seeds: int | None = None) -> dict[str, Any]:
    """Evaluate ``optimizer`` at one lr on ``task``; writes ``{label}__{task}.json`` and returns it.

    ``data=(x, y)`` replaces the task's dataset (tests); ``seeds`` is a count (0..n-1) or the seeds;
    ``batch_seeds``: seeds trained as one population (:func:`batch_size_for`).
    """
    spec = make_spec(optimizer, task, lr=lr, steps=steps, seeds=seeds, label=label, data_root=data_root,
                     device=device, injected_data=data is not None, state_dtype=state_dtype)
    (result,) = run_specs([spec], out, workers=workers, data=data, command=command, progress=progress,
                          threads=threads, batch_seeds=batch_seeds)
    if plot:
        plot_task(out, task)
    return result


def grid_summary(specs: Sequence[RunSpec], results: Sequence[dict[str, Any]],
                 command: str | None = None) -> dict[str, Any]:
    """The grid JSON: every lr point's summary and the best one (see :func:`best_point`)."""
    keys = ("lr", "final_ln_loss_mean", "final_ln_loss_std", "nonfinite", "diverged")
    points = [{**{k: r[k] for k in keys}, "file": f"{s.run_id}.json"} for s, r in zip(specs, results)]
    best = best_point(points)
    first = results[0]
    return {"type": "grid", "optimizer": first["optimizer"], "label": first["label"], "rule": first["rule"],
            "task": first["task"], "steps": first["steps"], "seeds": first["seeds"], "points": points,
            "best_lr": best["lr"], "best_file": best["file"], "best": best, "command": command,
            "torch_version": torch.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def evaluate_grid(optimizer: str, task: str, lrs: Sequence[float] = DEFAULT_LR_GRID, *, steps: int = 10000,
                  seeds: int | Iterable[int] = 10, out: str | os.PathLike, label: str | None = None,
                  data_root: str | None = None, device: str = "cpu", workers: int | None = None,
                  data: tuple[torch.Tensor, torch.Tensor] | None = None, command: str | None = None,
                  progress: bool = True, plot: bool = True, threads: int | None = 1,
                  state_dtype: str = "float32", batch_seeds: int | None = None) -> dict[str, Any]:
    """Evaluate ``optimizer`` at every lr of ``lrs``; writes each point and ``{label}__{task}__grid.json``."""
    specs = [make_spec(optimizer, task, lr=lr, steps=steps, seeds=seeds, label=label, grid_point=True,
                       data_root=data_root, device=device, injected_data=data is not None,
                       state_dtype=state_dtype) for lr in lrs]
    results = run_specs(specs, out, workers=workers, data=data, command=command, progress=progress,
                        threads=threads, batch_seeds=batch_seeds)
    summary = grid_summary(specs, results, command)
    write_json_atomic(grid_path(Path(out), specs[0].label, task), summary)
    if plot:
        plot_task(out, task)
    return summary


# ----------------------------------------------------------------------------------- plot
def runs_to_plot(out: str | os.PathLike, task: str) -> list[dict[str, Any]]:
    """Result dicts for the task's figure: every non-grid run, plus the best point of every grid."""
    out = Path(out)
    runs = []
    for path in sorted(out.glob(f"*__{task}*.json")):
        obj = _read_json(path)
        if not obj or obj.get("task") != task:
            continue
        if obj.get("type") == "evaluation" and not obj.get("grid_point"):
            runs.append(obj)
        elif obj.get("type") == "grid":
            best = _read_json(out / obj["best_file"])
            if best:
                runs.append(best)
    return runs


def ln_curve_stats(curves: Sequence[Sequence[float | None]], steps: int, window: int,
                   positions: Sequence[Sequence[int]] | None = None):
    """(x, mean, std) of ln loss over seeds, each curve first averaged over windows of ``window`` steps.
    Steps after a NaN/Inf are missing and ignored; so are the steps a thinned curve left out (``positions``: the
    steps of each curve's values, :func:`meta_train.curves.points`)."""
    import numpy as np

    arr = np.full((len(curves), steps), np.nan)
    for i, c in enumerate(curves):
        vals = np.array([np.nan if v is None else v for v in c], dtype=float)
        if positions is None:
            arr[i, :len(vals)] = vals
        else:
            arr[i, np.asarray(positions[i], dtype=int)] = vals
    with np.errstate(divide="ignore", invalid="ignore"):
        ln = np.log(np.maximum(arr, LN_FLOOR_LOSS))
    n_bins = math.ceil(steps / window)
    padded = np.full((len(curves), n_bins * window), np.nan)
    padded[:, :steps] = ln
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows (diverged) stay NaN
        binned = np.nanmean(padded.reshape(len(curves), n_bins, window), axis=2)
        mean, std = np.nanmean(binned, axis=0), np.nanstd(binned, axis=0)
    x = np.minimum(np.arange(n_bins) * window + (window - 1) / 2, steps - 1)
    return x, mean, std


def plot_window(result: dict[str, Any]) -> int:
    """Steps averaged per plotted point: ``steps / PLOT_POINTS``, at least the spacing of a thinned curve."""
    every = result["curves"]["every"] if curve_store.is_thinned(result) else 1
    return max(1, math.ceil(result["steps"] / PLOT_POINTS), every)


def plot_task(out: str | os.PathLike, task: str) -> Path | None:
    """``{out}/{task}.png``: ln loss vs step, mean +- std over seeds per optimizer (like the paper's Fig. 2)."""
    runs = runs_to_plot(out, task)
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours; baselines dashed
    for i, r in enumerate(sorted(runs, key=lambda r: (r["rule"] is None, r["label"]))):
        steps_of = [curve_store.points(r, i)[0] for i in range(len(r["losses"]))]
        x, mean, std = ln_curve_stats(r["losses"], r["steps"], plot_window(r), positions=steps_of)
        name = r["label"] + (f" (lr {r['lr']:g})" if r["rule"] is None or r["grid_point"] else "")
        if r["diverged"]:
            name += f" [{r['diverged']}/{len(r['seeds'])} diverged]"
        (line,) = ax.plot(x, mean, lw=1.2, label=name, color=colors[(2 * i + i // 10) % len(colors)],
                          ls="--" if r["rule"] is None else "-")
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("optimizee step")
    ax.set_ylabel("training loss (ln)")
    ax.set_title(f"{task}: ln training loss, mean ± std over seeds")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = Path(out) / f"{task}.png"
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from .tasks import TASKS

    ap = ArgumentParser(prog="python -m meta_train.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizer", required=True,
                    help="a bundled weights name, a .safetensors path, hf://org/repo[/file][@rev], or adam/rmsprop/sgd")
    lr = ap.add_mutually_exclusive_group()
    lr.add_argument("--lr", type=float, help="learning rate (learned optimizers: multiplies the update, default 1.0)")
    lr.add_argument("--lr-grid", type=parse_lr_grid, nargs="?", const=DEFAULT_LR_GRID, metavar="a,b,...|default",
                    help="evaluate every lr and pick the best; without values (or 'default'): half-decades 1e-4..1. "
                         "Baselines given neither --lr nor --lr-grid use the default grid")
    ap.add_argument("--task", required=True, choices=list(TASKS))
    ap.add_argument("--steps", type=int, default=10000, help="optimizee steps per seed (default 10000)")
    ap.add_argument("--seeds", type=int, default=10, help="number of seeds, 0..N-1 (default 10)")
    ap.add_argument("--out", required=True, help="results directory")
    ap.add_argument("--data-root", default=None, help="torchvision data folder (default: $LEARNED_OPTIM_DATA)")
    ap.add_argument("--workers", type=int, default=None, help="worker processes (default min(seeds, cpu count))")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per seed (default 1)")
    ap.add_argument("--batch-seeds", type=int, nargs="?", const=0, default=None, metavar="N",
                    help="train the seeds of a point as one population (stacked parameters through torch.func.vmap, "
                         "the same optimizer classes): the sequential path's per-seed curves to float rounding, "
                         "stored the same way. N: at most N seeds per population (1: one seed at a time); without N: "
                         "all the seeds of a point, split to keep --workers busy. Default: batched on CUDA, one "
                         "seed at a time on the CPU")
    ap.add_argument("--state-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="learned optimizers: dtype of the recurrent state (state_dtype=)")
    ap.add_argument("--label", default=None, help="name in files, plots and tables (default from --optimizer)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _fmt(result: dict[str, Any]) -> str:
    mean, std = result["final_ln_loss_mean"], result["final_ln_loss_std"]
    value = "NaN/Inf on every seed" if mean is None else f"{mean:.4f} ± {std:.4f}"
    return f"{result['label']} on {result['task']} (lr {result['lr']:g}): final ln loss {value}, " \
           f"{result['diverged']}/{len(result['seeds'])} diverged"


def main(argv: Sequence[str] | None = None) -> int:
    from learned_optim import WeightsError

    args = build_parser().parse_args(argv)
    command = "python -m meta_train.evaluate " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    grid = args.lr_grid if args.lr_grid is not None else (
        DEFAULT_LR_GRID if args.optimizer in BASELINES and args.lr is None else None)
    common = dict(steps=args.steps, seeds=args.seeds, out=args.out, label=args.label, data_root=args.data_root,
                  device=args.device, workers=args.workers, command=command, progress=not args.no_progress,
                  threads=args.threads, batch_seeds=args.batch_seeds)
    if args.state_dtype != "float32":
        common["state_dtype"] = args.state_dtype
    try:
        if grid is not None:
            summary = evaluate_grid(args.optimizer, args.task, grid, **common)
            for point in summary["points"]:
                print(_fmt(_read_json(Path(args.out) / point["file"])))
            print(f"best lr: {summary['best_lr']:g}")
        else:
            print(_fmt(evaluate(args.optimizer, args.task, lr=args.lr, **common)))
    except (WeightsError, EvaluationError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
