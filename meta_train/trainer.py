"""The meta-training loop: meta-optimizer, curriculum, imitation, checkpoints/resume, logging,
``torch.distributed``.

One epoch = one fresh optimizee trained for ``N_train`` steps, cut into truncations of ``unroll``
steps, one meta-step per truncation (or, with probability r, the same for imitation). Every
``eval_every`` epochs the rule is validated on fresh optimizees at ``N_valid`` steps.

Resume contract: everything random comes from streams stored in the checkpoint (the data/init
generator of each rank, the imitation coin flips) or derived from counters (validation), so a
run of E epochs and a run of E1 < E epochs followed by ``--resume`` to E end bit-identical.

Populations (``population`` K > 1): each epoch K fresh optimizees advance together through every
truncation in one vectorized unroll (``meta_train.unroll.population_*``), split evenly across the
processes; the meta-loss is the mean of the members' meta-losses. A rank's member 0 draws from the
rank's generator (what its one optimizee draws with K = 1), member j > 0 from a generator seeded from
(seed, rank, j); all of them are stored in the checkpoint. A member whose meta-loss is not finite leaves
the population for the rest of the epoch and that truncation takes no meta-step, on any rank (as one
diverged optimizee ends its epoch); the epoch ends when a rank has no member left. Self-improving mixes
the same teacher step into every member. Validation then runs its ``eval_runs`` optimizees as one
population too.
K = 1 is the one-optimizee code path, unchanged.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from learned_optim.rules import Rule, build_rule, stored_config
from learned_optim.weights import load_rule, read_metadata, recipe_summary, resolve_weights, weights_digest

from .curriculum import ADVANCE, IMPROVED, STOP, Curriculum
from .export import export_weights
from .imitation import SelfImproving, Teacher, imitation_unroll, population_imitation_unroll
from .tasks import Task
from .unroll import (CompiledRule, keep_freed_memory, meta_unroll, population_meta_unroll, population_rollout,
                     rollout, select_members, start_population, start_scaled)

# the paper's defaults per model (its training scripts and README)
MODEL_DEFAULTS = {
    "dm": dict(meta_optimizer="adam", meta_lr=1e-3, objective="sum", horizon=100, epochs=10000, eval_every=100,
               eval_runs=20, horizons=[100, 200, 500, 1000, 1500, 2000, 2500, 3000],
               imitation_ratios_cl=[0.0, 0.1, 0.3], imitation_ratio=0.3),
    "rnnprop": dict(meta_optimizer="adam", meta_lr=1e-3, objective="sum", horizon=100, epochs=100, eval_every=10,
                    eval_runs=20, horizons=[100, 200, 500, 1000, 1500, 2000, 2500, 3000],
                    imitation_ratios_cl=[0.3], imitation_ratio=0.3),
    "scale": dict(meta_optimizer="rmsprop", meta_lr=1e-6, objective="log_ratio", horizon=100, epochs=100,
                  eval_every=1, eval_runs=5,
                  horizons=[100, 200, 500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 4500, 5000],
                  imitation_ratios_cl=[0.1], imitation_ratio=0.1),
}
GRAD_CLIP_SCALE = 1e4  # L2O-Scale: meta-gradients made finite, then value-clipped


class RunError(Exception):
    """A run that cannot start or continue as asked (the message says what to do); the CLI prints it as one line."""


RUN_FILES = ("checkpoint.pt", "checkpoint.pt.tmp", "log.jsonl", "weights.safetensors", "weights.safetensors.tmp",
             "training.png")


def prepare_out_dir(cfg: "Config", rank: int = 0, world: int = 1) -> None:
    """Never lose a run: an ``--out`` that holds files is refused unless ``--resume`` (continue it) or
    ``--overwrite`` (delete the run's own files and start over; other files are left alone)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder")
    if cfg.init is not None:
        start = Path(cfg.init).expanduser()
        if start.name in RUN_FILES and start.exists() and out.is_dir() and start.resolve().parent == out.resolve():
            raise RunError(f"--init {cfg.init} is a file of the run in --out {out}, which the run rewrites; copy it "
                           "out of --out first, or choose another --out")
    if cfg.resume and (out / "checkpoint.pt").exists():
        return
    if cfg.resume and not cfg.overwrite:  # nothing to resume: a new run, unless that would replace a run's files
        present = sorted(p.name for p in out.iterdir() if p.name in RUN_FILES) if out.is_dir() else []
        if present:
            raise RunError(f"--out {out} holds {', '.join(present)} but no checkpoint.pt to resume from; pass "
                           "--overwrite to start over there, or choose another --out")
        return
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            what = "a run" if (out / "checkpoint.pt").exists() else "files"
            raise RunError(f"--out {out} already holds {what}: add --resume to continue it, --overwrite to start "
                           "over (deletes its checkpoint, log and weights), or choose another --out")
        if world > 1:
            dist.barrier()  # every rank has checked before rank 0 deletes
        if rank == 0:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        if world > 1:
            dist.barrier()


@dataclass
class Config:
    model: str
    out: str
    curriculum: bool = False
    imitation: bool = False
    self_improving: bool = False
    aug: bool = False
    task: str = "mlp-orig"
    device: str = "cpu"
    data_root: str | None = None
    seed: int = 0
    epochs: int | None = None
    horizons: list[int] | None = None
    unroll: int = 20
    eval_every: int | None = None
    eval_runs: int | None = None
    imitation_ratio: list[float] | None = None
    teacher: str = "adam"
    teacher_lr: float = 0.01
    teachers_self_improving: list[str] = field(default_factory=lambda: ["adam", "sgd", "adagrad"])
    meta_lr: float | None = None
    min_evals: int = 3
    random_scale: float = 0.0
    fixed_validation: bool = False
    valid_horizon: int | None = None
    valid_examples: int | None = None
    population: int = 1
    compile: bool = False
    init: str | None = None
    overwrite: bool = False
    progress: bool = True
    resume: bool = False

    def resolved(self) -> dict:
        d = MODEL_DEFAULTS[self.model]
        horizons = self.horizons or (d["horizons"] if self.curriculum else [500 if self.aug else d["horizon"]])
        if self.imitation_ratio is not None:
            ratios = self.imitation_ratio
        else:
            ratios = d["imitation_ratios_cl"] if self.curriculum else [d["imitation_ratio"]]
        epochs = self.epochs if self.epochs is not None else (5000 if self.aug else d["epochs"])
        return dict(horizons=list(horizons), imitation_ratios=list(ratios) if self.imitation else [0.0],
                    epochs=epochs, eval_every=self.eval_every or d["eval_every"],
                    eval_runs=self.eval_runs or d["eval_runs"], meta_lr=self.meta_lr or d["meta_lr"],
                    meta_optimizer=d["meta_optimizer"], objective=d["objective"])


def _git_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def member_seed(seed: int, rank: int, member: int) -> int:
    """Seed of the generator of population member ``member`` > 0 of ``rank`` (member 0 uses the rank's own)."""
    digest = hashlib.sha256(f"population member:{seed}:{rank}:{member}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def members_per_rank(population: int, world: int) -> int:
    """Optimizees each process unrolls: 1 for ``population == 1`` (one per process, as always), else the
    population split evenly across the processes."""
    if population < 1:
        raise ValueError(f"population must be >= 1, got {population}")
    if population == 1:
        return 1
    if population % world:
        raise ValueError(f"population {population} cannot be split evenly across {world} processes")
    return population // world


def _make_meta_optimizer(kind: str, params, lr: float):
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    # TF RMSProp with decay 0.9 and epsilon 1e-20 inside the square root
    return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-10)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.r = cfg.resolved()
        self.out = Path(cfg.out)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = torch.device(cfg.device)
        self.log_path, self.ckpt_path = self.out / "log.jsonl", self.out / "checkpoint.pt"
        # loaded on the CPU: the generators' states must stay CPU ByteTensors; the rule's and the meta-optimizers'
        # tensors move to the device when they are loaded into it
        self._ckpt = (torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
                      if cfg.resume and self.ckpt_path.exists() else None)
        torch.manual_seed(cfg.seed)  # the rule's fresh initialisation: identical on every rank
        # a resumed run keeps the rule config it started with (a checkpoint written before configs were
        # stored means the config keys of that time: stored_config fills in what their absence meant)
        rule_config = stored_config(cfg.model, self._ckpt.get("rule_config", {})) if self._ckpt else None
        # where the rule's starting weights came from (--init; None: a fresh initialisation)
        self.init: dict | None = self._ckpt.get("init") if self._ckpt else None
        if self._ckpt is None and cfg.init is not None:
            path = resolve_weights(cfg.init)
            self.rule: Rule = load_rule(path, rule=cfg.model).to(self.device)
            self.init = {"weights": cfg.init, "weights_digest": weights_digest(path),
                         "recipe": recipe_summary(read_metadata(path)["recipe"])}
        else:
            self.rule = build_rule(cfg.model, rule_config).to(self.device)
        # what the unrolls call: the rule itself, or its compiled forward (same parameters)
        self.step_rule = CompiledRule(self.rule) if cfg.compile else self.rule
        self.task = Task(cfg.task, train=True, data_root=cfg.data_root, device=self.device)
        self.valid_task = self._valid_task()
        self.meta_opt = _make_meta_optimizer(self.r["meta_optimizer"], self.rule.parameters(), self.r["meta_lr"])
        # imitation has its own meta-optimizer for DM/RNNprop; L2O-Scale shares its RMSprop (as the original)
        self.il_opt = (self.meta_opt if cfg.model == "scale"
                       else _make_meta_optimizer(self.r["meta_optimizer"], self.rule.parameters(), self.r["meta_lr"]))
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)
        self.members = members_per_rank(cfg.population, self.world)
        self.member_gens = [self.gen] + [torch.Generator().manual_seed(member_seed(cfg.seed, self.rank, j))
                                         for j in range(1, self.members)]
        if cfg.population > 1 and self.device.type == "cpu":
            keep_freed_memory()  # a population's large per-step tensors: reuse freed memory, no page faults
        self.coin = random.Random(cfg.seed)  # shared by all ranks: every rank takes the same kind of epoch
        # started from --init weights, the first stage's baseline is their validation (measured before training)
        self.curriculum = (Curriculum(self.r["horizons"], min_evals=cfg.min_evals,
                                      awaiting_baseline=self.init is not None) if cfg.curriculum else None)
        self.best_state = {k: v.detach().clone() for k, v in self.rule.state_dict().items()}
        self.best_val = math.inf
        self.epoch = 0
        self.num_evals = 0
        self.elapsed = 0.0
        self.stop_reason = ""
        self.self_improving = SelfImproving(cfg.teachers_self_improving) if cfg.self_improving else None
        self._signal = None
        self.history: list[dict] = []

    # ------------------------------------------------------------------ helpers
    def _valid_task(self) -> Task:
        """The validation optimizees' task: the training task, or with ``valid_examples`` the same architecture
        on a fixed subset of that many examples of the training split (drawn once, the same for every run), e.g.
        the size of the evaluation's data (10,000 for MNIST's test split), so that a long validation sees the loss
        regime the evaluation does rather than the larger training set's."""
        n = self.cfg.valid_examples
        if n is None:
            return self.task
        total = len(self.task.x)
        if not 1 <= n <= total:
            raise RunError(f"--valid-examples {n}: the {self.task.dataset} training split has {total} examples; "
                           f"give a number from 1 to {total}")
        pick = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n].sort().values.to(self.device)
        return Task(self.cfg.task, train=True, device=self.device, data=(self.task.x[pick], self.task.y[pick]))

    @property
    def stage(self) -> int:
        return self.curriculum.stage if self.curriculum else 0

    @property
    def train_horizon(self) -> int:
        return self.curriculum.train_horizon if self.curriculum else self.r["horizons"][0]

    @property
    def valid_horizon(self) -> int:
        """N_valid: ``--valid-horizon`` where given, else the next stage's N_train (Algorithm 1), or N_train
        without a curriculum."""
        if self.cfg.valid_horizon is not None:
            return self.cfg.valid_horizon
        return self.curriculum.valid_horizon if self.curriculum else self.r["horizons"][0]

    def imitation_ratio(self) -> float:
        ratios = self.r["imitation_ratios"]
        return ratios[min(self.stage, len(ratios) - 1)]

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.rank == 0:
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _average_gradients(self) -> None:
        if self.world == 1:
            return
        for p in self.rule.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= self.world

    def _meta_step(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self._average_gradients()
        if self.cfg.model == "scale":
            for p in self.rule.parameters():
                if p.grad is not None:
                    p.grad.nan_to_num_(0.0, GRAD_CLIP_SCALE, -GRAD_CLIP_SCALE).clamp_(-GRAD_CLIP_SCALE,
                                                                                        GRAD_CLIP_SCALE)
        opt.step()

    # ------------------------------------------------------------------ epochs
    def run_epoch(self) -> dict:
        if self.members > 1:
            return self._run_population_epoch()
        horizon, unroll = self.train_horizon, self.cfg.unroll
        imitation = self.cfg.imitation and self.coin.random() < self.imitation_ratio()
        # random scaling (if enabled) holds for the whole epoch, imitation included; validation never sees it
        traj, task = start_scaled(self.rule, self.task, self.gen, self.cfg.random_scale)
        losses, meta_losses = [], []
        teacher, override = self._epoch_guides(traj.theta, imitation)
        for _ in range(math.ceil(horizon / unroll)):
            if imitation:
                loss, traj = imitation_unroll(self.step_rule, task, traj, teacher, unroll, self.gen)
                self._meta_step(self.il_opt, loss)
            else:
                loss, traj, values = meta_unroll(self.step_rule, task, traj, unroll, self.gen,
                                                 objective=self.r["objective"], step_override=override)
                losses.extend(values)
                # a diverged optimizee (on any rank: the ranks' meta-steps all-reduce together) ends the
                # trajectory on every rank; the rule is kept
                if not self._on_every_rank(math.isfinite(float(loss.detach()))):
                    break
                self._meta_step(self.meta_opt, loss)
            meta_losses.append(float(loss.detach()))
        return {"type": "epoch", "epoch": self.epoch + 1, "stage": self.stage, "horizon": horizon,
                "kind": "imitation" if imitation else "meta", "meta_loss": sum(meta_losses) / max(len(meta_losses), 1),
                "final_loss": losses[-1] if losses else None,
                "mean_ln_loss": (sum(math.log(max(v, 1e-30)) for v in losses) / len(losses)) if losses else None,
                "population": self.cfg.population}

    def _epoch_guides(self, theta, imitation: bool):
        """(the teacher of an imitation epoch or None, the self-improving step override or None)."""
        teacher = Teacher(self.cfg.teacher, theta, lr=self.cfg.teacher_lr) if imitation else None
        override = None
        if self.self_improving is not None and not imitation:
            self.self_improving.begin_epoch(theta)
            override = self.self_improving.override(self.epoch, self.coin)
        return teacher, override

    def _on_every_rank(self, flag: bool) -> bool:
        """``flag`` and-ed over the processes (so that every rank takes the same meta-steps)."""
        if self.world == 1:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def _run_population_epoch(self) -> dict:
        """:meth:`run_epoch` for this rank's members of a population: ``final_loss`` is the mean over the
        members of their last finite loss, ``mean_ln_loss`` the mean of ln over members and steps (finite
        losses)."""
        horizon, unroll = self.train_horizon, self.cfg.unroll
        imitation = self.cfg.imitation and self.coin.random() < self.imitation_ratio()
        gens = list(self.member_gens)
        traj, task = start_population(self.rule, self.task, gens, self.cfg.random_scale)
        ln_sum, ln_count, final, meta_losses = 0.0, 0, None, []
        teacher, override = self._epoch_guides(traj.theta, imitation)
        for _ in range(math.ceil(horizon / unroll)):
            if imitation:
                loss, traj = population_imitation_unroll(self.step_rule, task, traj, teacher, unroll, gens)
                self._meta_step(self.il_opt, loss)
                meta_losses.append(float(loss.detach()))
                continue
            member_losses, traj, values = population_meta_unroll(self.step_rule, task, traj, unroll, gens,
                                                                 objective=self.r["objective"],
                                                                 step_override=override)
            finite_values = values[torch.isfinite(values)]
            ln_sum += float(finite_values.clamp(min=1e-30).log().sum())
            ln_count += finite_values.numel()
            last = values[-1][torch.isfinite(values[-1])]
            final = float(last.mean()) if last.numel() else None
            finite = torch.isfinite(member_losses.detach())
            if not self._on_every_rank(bool(finite.all())):  # diverged members leave; no meta-step here
                keep = finite.nonzero().flatten()
                if not self._on_every_rank(keep.numel() > 0):
                    break
                if keep.numel() < finite.numel():
                    traj = select_members(self.rule, traj, keep)
                    gens = [gens[i] for i in keep.tolist()]
                    if task.scale is not None:
                        task = task.scaled(task.scale.index_select(0, keep.to(task.scale.device)))
                    if override is not None:
                        self.self_improving.select(keep)
                continue
            loss = member_losses.mean()
            self._meta_step(self.meta_opt, loss)
            meta_losses.append(float(loss.detach()))
        return {"type": "epoch", "epoch": self.epoch + 1, "stage": self.stage, "horizon": horizon,
                "kind": "imitation" if imitation else "meta", "meta_loss": sum(meta_losses) / max(len(meta_losses), 1),
                "final_loss": final, "mean_ln_loss": ln_sum / ln_count if ln_count else None,
                "population": self.cfg.population}

    def validate(self, horizon: int) -> float:
        """Mean over ``eval_runs`` optimizees of the mean loss of their last 10 steps (lower is better).

        The optimizees (initialisation and batches) are fresh at every validation, as in the paper's code, or,
        with ``fixed_validation``, the same ones every time, so that two validations compare two rules and not
        two draws of optimizees."""
        self.num_evals += 1
        runs = self.r["eval_runs"]
        mine = range(self.rank, runs, self.world)
        finals = []
        was_training = self.rule.training
        self.rule.eval()
        draw = 0 if self.cfg.fixed_validation else self.num_evals
        gens = [torch.Generator().manual_seed(10_000_019 * (self.cfg.seed + 1) + 7919 * draw + i) for i in mine]
        if self.cfg.population > 1:  # the rank's validation optimizees as one population
            curves = population_rollout(self.step_rule, self.valid_task, horizon, gens) if gens else []
        else:
            curves = (rollout(self.step_rule, self.valid_task, horizon, gen) for gen in gens)
        for losses in curves:
            tail = losses[-10:]
            finals.append(sum(tail) / len(tail) if len(losses) == horizon and all(map(math.isfinite, tail))
                          else math.inf)
        self.rule.train(was_training)
        total = torch.tensor([sum(finals), float(len(finals))], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1])

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self) -> None:
        gens = [self.gen.get_state()]
        members = [[g.get_state() for g in self.member_gens[1:]]]
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, self.gen.get_state())
            gens = gathered
            gathered = [None] * self.world
            dist.all_gather_object(gathered, members[0])
            members = gathered
        if self.rank != 0:
            return
        state = {
            "version": 1, "config": self.cfg.__dict__, "resolved": self.r, "epoch": self.epoch,
            "num_evals": self.num_evals, "elapsed": self.elapsed, "rule": self.rule.state_dict(),
            "rule_config": self.rule.config(),
            "meta_opt": self.meta_opt.state_dict(), "il_opt": self.il_opt.state_dict(),
            "best_state": self.best_state, "best_val": self.best_val,
            "curriculum": self.curriculum.to_dict() if self.curriculum else None,
            "generators": gens, "population_generators": members, "coin": self.coin.getstate(),
            "stop_reason": self.stop_reason, "init": self.init,
            "log_offset": self.log_path.stat().st_size if self.log_path.exists() else 0,
            "world_size": self.world,
        }
        tmp = self.ckpt_path.with_name(self.ckpt_path.name + ".tmp")
        torch.save(state, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.ckpt_path)

    def _restore(self) -> None:
        ckpt = self._ckpt if self._ckpt is not None else torch.load(self.ckpt_path, map_location="cpu",
                                                                     weights_only=False)
        self._ckpt = None
        if ckpt["world_size"] != self.world:
            raise RunError(f"{self.ckpt_path} was written by {ckpt['world_size']} process(es); resume with the same "
                               f"number (now {self.world})")
        not_recipe = ("epochs", "resume", "overwrite", "progress", "device", "data_root", "out", "compile")
        saved = {k: v for k, v in ckpt["config"].items() if k not in not_recipe}
        saved.setdefault("population", 1)  # a checkpoint written before populations: one optimizee
        saved.setdefault("fixed_validation", False)  # written before the option: fresh optimizees
        saved.setdefault("init", None)  # written before the option: a fresh initialisation
        saved.setdefault("valid_horizon", None)  # written before the option: Algorithm 1's N_valid
        saved.setdefault("valid_examples", None)  # written before the option: the whole training split
        now = {k: v for k, v in self.cfg.__dict__.items() if k in saved}
        extend = None
        if ckpt["curriculum"] is not None and self.curriculum is not None:
            old_h, new_h = ckpt["curriculum"]["horizons"], self.r["horizons"]
            if old_h != new_h and new_h[:len(old_h)] == old_h:  # appending stages is allowed
                extend = new_h
                saved.pop("horizons", None)
                now.pop("horizons", None)
        if saved != now:
            diff = {k: (saved[k], now[k]) for k in saved if saved[k] != now.get(k)}
            changes = ", ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in diff.items())
            raise RunError(f"--resume with a different recipe than {self.ckpt_path} ({changes}); rerun with the "
                           "checkpoint's options, or start a new run in another --out")
        self.rule.load_state_dict(ckpt["rule"])
        self.meta_opt.load_state_dict(ckpt["meta_opt"])
        if self.il_opt is not self.meta_opt:
            self.il_opt.load_state_dict(ckpt["il_opt"])
        self.best_state = {k: v.to(self.device) for k, v in ckpt["best_state"].items()}
        self.best_val, self.epoch, self.num_evals = ckpt["best_val"], ckpt["epoch"], ckpt["num_evals"]
        self.elapsed, self.stop_reason = ckpt["elapsed"], ckpt["stop_reason"]
        if ckpt["curriculum"] is not None:
            self.curriculum = Curriculum.from_dict(ckpt["curriculum"])
        self.gen.set_state(ckpt["generators"][self.rank])
        for gen, state in zip(self.member_gens[1:], ckpt.get("population_generators", [[]] * self.world)[self.rank]):
            gen.set_state(state)
        self.coin.setstate(ckpt["coin"])
        if self.rank == 0 and self.log_path.exists():  # drop log lines written after the checkpoint
            with open(self.log_path, "r+") as fh:
                fh.truncate(ckpt["log_offset"])
        if self.log_path.exists():
            self.history = [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]
        if extend is not None:
            self._extend_curriculum(extend)

    def _extend_curriculum(self, horizons: list[int]) -> None:
        """``--resume`` with a longer ``--horizons`` list: the curriculum continues into the new stages.

        A run that had finished its last stage with an improvement advances exactly as Algorithm 1 does
        (restore the stage's best, validate it at the new N_valid as the stage's baseline); a run still in
        its old last stage re-measures the stage's best at the longer validation horizon, so later
        validations compare like with like.
        """
        old = list(self.curriculum.horizons)
        action = self.curriculum.extend(horizons)
        self._log({"type": "extend", "epoch": self.epoch, "from": old, "horizons": list(horizons),
                   "action": action})
        if action == "advance":
            self.stop_reason = ""
            self.rule.load_state_dict(self.best_state)
        if action in ("advance", "rebaseline"):
            if self.cfg.fixed_validation and self.cfg.valid_horizon is not None and math.isfinite(self.best_val):
                self._baseline(self.best_val)  # N_valid and the optimizees stay: the best's value stands
                return
            current = {k: v.detach().clone() for k, v in self.rule.state_dict().items()}
            self.rule.load_state_dict(self.best_state)
            self._baseline()
            self.rule.load_state_dict(current)

    # ------------------------------------------------------------------ main loop
    def _on_signal(self, signum, frame):
        self._signal = signum

    def _after_validation(self, val: float) -> bool:
        """Model selection / curriculum bookkeeping; returns True when training should stop."""
        record = {"type": "eval", "epoch": self.epoch, "stage": self.stage, "horizon": self.valid_horizon,
                  "val_loss": val}
        if self.curriculum is None:
            if val < self.best_val:
                self.best_val = val
                self.best_state = {k: v.detach().clone() for k, v in self.rule.state_dict().items()}
                record["action"] = IMPROVED
            self._log(record)
            return False
        action = self.curriculum.observe(val)
        record["action"] = action
        self._log(record)
        if action == IMPROVED:
            self.best_val = val
            self.best_state = {k: v.detach().clone() for k, v in self.rule.state_dict().items()}
        elif action == ADVANCE:
            self.rule.load_state_dict(self.best_state)
            # the stage's best was validated at this N_valid on these optimizees already (fixed validation and
            # an N_valid that stays, as with --valid-horizon): its value is the baseline, not a second validation
            same = self.cfg.fixed_validation and self.valid_horizon == record["horizon"]
            self._baseline(self.best_val if same else None)
        elif action == STOP:
            self.stop_reason = (f"curriculum finished at stage {self.stage} (horizon {self.train_horizon})"
                                if self.curriculum.last_stage and self.curriculum.improved
                                else f"no improvement in stage {self.stage} (horizon {self.train_horizon})")
            return True
        return False

    def train(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.cfg.resume and self.ckpt_path.exists():
            self._restore()
            if self.finished():
                if self.rank == 0:
                    why = self.stop_reason or f"epoch cap {self.r['epochs']} reached"
                    print(f"{self.out}: nothing left to do, the run stopped at epoch {self.epoch} ({why}); its "
                          f"weights are in {self.out / 'weights.safetensors'}. Raise --epochs, or append stages to "
                          "--horizons, to continue it", file=sys.stderr)
                return self.out / "weights.safetensors"
        else:
            if self.rank == 0 and self.log_path.exists():
                self.log_path.unlink()
            if self.init is not None:  # the --init weights (best_state already) are the model to beat
                self._baseline()
        handlers = {}
        if threading_main():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._loop()
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
        return self.finish()

    def _baseline(self, known: float | None = None) -> None:
        """Validate the rule now loaded at the stage's N_valid and make the value the one to beat: after a
        curriculum ADVANCE or extension (the restored best), or before the first epoch of an ``--init`` run (the
        starting weights), so a run never exports weights that validate worse than those it started from.
        ``known``: that model's value from a validation that this one would repeat exactly (same optimizees,
        same horizon), taken instead of validating again."""
        val = self.validate(self.valid_horizon) if known is None else known
        if self.curriculum is not None:
            self.curriculum.set_baseline(val)
        self.best_val = val
        self._log({"type": "eval", "epoch": self.epoch, "stage": self.stage, "horizon": self.valid_horizon,
                   "val_loss": val, "action": "baseline", **({"reused": True} if known is not None else {})})

    def finished(self) -> bool:
        """True when the run has nothing left to do: its curriculum stopped, or it reached the epoch cap."""
        return (self.curriculum is not None and self.curriculum.done) or self.epoch >= self.r["epochs"]

    def _loop(self) -> None:
        from tqdm.auto import tqdm

        done = self.curriculum is not None and self.curriculum.done  # a raised --epochs cap resumes
        bar = tqdm(total=self.r["epochs"], initial=self.epoch, disable=not self.cfg.progress or self.rank != 0,
                   desc=f"meta-train {self.cfg.model}", dynamic_ncols=True)
        while not done and self.epoch < self.r["epochs"]:
            t0 = time.perf_counter()
            record = self.run_epoch()
            self.epoch += 1
            self.elapsed += time.perf_counter() - t0
            record["elapsed"] = round(self.elapsed, 3)
            self._log(record)
            bar.update(1)
            bar.set_postfix(stage=self.stage, N=self.train_horizon, kind=record["kind"][:4],
                            best=f"{self.best_val:.4g}")
            if self.epoch % self.r["eval_every"] == 0:
                t0 = time.perf_counter()
                done = self._after_validation(self.validate(self.valid_horizon))
                self.elapsed += time.perf_counter() - t0
                self._checkpoint()
                self.export()
            if self._signal is not None:
                self._checkpoint()
                bar.close()
                raise SystemExit(128 + int(self._signal))
        bar.close()
        self._checkpoint()

    def recipe(self) -> dict:
        return {"model": self.cfg.model, "task": self.cfg.task, "dataset": self.task.dataset + " (train split)",
                "curriculum": self.cfg.curriculum, "imitation": self.cfg.imitation,
                "self_improving": self.cfg.self_improving, "aug": self.cfg.aug, "seed": self.cfg.seed,
                "horizons": self.r["horizons"], "unroll": self.cfg.unroll, "epochs_cap": self.r["epochs"],
                "epochs_run": self.epoch, "eval_every": self.r["eval_every"], "eval_runs": self.r["eval_runs"],
                "imitation_ratios": self.r["imitation_ratios"], "teacher": self.cfg.teacher,
                "teacher_lr": self.cfg.teacher_lr, "random_scale": self.cfg.random_scale,
                "fixed_validation": self.cfg.fixed_validation,
                "population": self.cfg.population,
                "meta_optimizer": self.r["meta_optimizer"],
                "meta_lr": self.r["meta_lr"], "objective": self.r["objective"],
                "stage_reached": self.stage, "horizon_reached": self.train_horizon,
                "best_val_loss": self.best_val, "stop_reason": self.stop_reason or (
                    f"epoch cap {self.r['epochs']} reached" if self.epoch >= self.r["epochs"] else "running"),
                "world_size": self.world, "code_version": _git_version(),
                **({"valid_horizon": self.cfg.valid_horizon} if self.cfg.valid_horizon is not None else {}),
                **({"valid_examples": self.cfg.valid_examples} if self.cfg.valid_examples is not None else {}),
                **({"init": self.init} if self.init is not None else {})}
        # wall-clock is in log.jsonl and added when a run is bundled (meta_train.export): keeping it out of
        # the run's own weight file is what makes an interrupted-and-resumed run bit-identical to a straight one

    def export(self) -> Path | None:
        if self.rank != 0:
            return None
        best = build_rule(self.cfg.model, self.rule.config())
        best.load_state_dict({k: v.cpu() for k, v in self.best_state.items()})
        path = export_weights(best, self.out / "weights.safetensors", recipe=self.recipe())
        self.plot()
        return path

    def finish(self) -> Path:
        path = self.export()
        if self.world > 1:
            dist.barrier()
        return path or self.out / "weights.safetensors"

    def plot(self) -> None:
        from .plots import plot_training

        plot_training(self.history, self.out / "training.png", title=f"{self.cfg.model} on {self.cfg.task}")


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def setup_distributed(device: str) -> None:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)


def main_train(cfg: Config) -> Path:
    setup_distributed(cfg.device)
    if cfg.device.startswith("cuda") and dist.is_initialized():
        cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    try:
        trainer = Trainer(cfg)  # every option checked (--init weights, data) before --overwrite deletes anything
        prepare_out_dir(cfg, trainer.rank, trainer.world)
        path = trainer.train()
    except BaseException:
        if dist.is_initialized():  # no barrier here: another rank may be gone
            dist.destroy_process_group()
        raise
    if dist.is_initialized():
        # every rank tears the group down together: a rank whose peers exit while its own gloo threads still
        # run can abort at exit (SIGABRT after a finished run)
        dist.barrier()
        dist.destroy_process_group()
    return path


__all__ = ["Config", "RunError", "Trainer", "prepare_out_dir", "MODEL_DEFAULTS", "main_train", "setup_distributed", "sys"]
