"""Algorithm 1 (curriculum over the unroll horizon) as a small state machine with no I/O.

The trainer validates every ``T_period`` epochs and reports the validation loss to
:meth:`Curriculum.observe`, which answers what to do:

- ``IMPROVED``: new best of the stage; keep this model as the stage's best.
- ``CONTINUE``: nothing to do; keep training.
- ``ADVANCE``: at least ``min_evals`` validations happened in the stage and it improved: restore the
  stage's best model, move to the next horizon, validate that model at the new validation horizon
  and report the value with :meth:`set_baseline` (the new stage's baseline, not infinity).
- ``STOP``: a stage brought no improvement over its baseline (export the previous stage's best),
  or the last stage finished.

Validation horizon N_valid of stage i is the next stage's training horizon; the last stage
validates at its own horizon (the original code crashes there with an IndexError).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

IMPROVED, CONTINUE, ADVANCE, STOP = "improved", "continue", "advance", "stop"


@dataclass
class Curriculum:
    horizons: list[int] = field(default_factory=lambda: [100, 200, 500, 1000, 1500, 2000, 2500, 3000])
    min_evals: int = 3
    stage: int = 0
    num_evals: int = 0
    best: float = float("inf")
    improved: bool = False
    done: bool = False
    awaiting_baseline: bool = False

    def __post_init__(self):
        if not self.horizons or any(h <= 0 for h in self.horizons):
            raise ValueError(f"Invalid curriculum horizons: {self.horizons}")
        if self.min_evals < 1:
            raise ValueError(f"Invalid min_evals: {self.min_evals}")

    @property
    def train_horizon(self) -> int:
        return self.horizons[self.stage]

    @property
    def valid_horizon(self) -> int:
        return self.horizons[min(self.stage + 1, len(self.horizons) - 1)]

    @property
    def last_stage(self) -> bool:
        return self.stage == len(self.horizons) - 1

    def observe(self, val_loss: float) -> str:
        if self.done:
            raise RuntimeError("the curriculum has finished")
        if self.awaiting_baseline:
            raise RuntimeError("call set_baseline() with the new stage's baseline first")
        self.num_evals += 1
        if val_loss < self.best:
            self.best, self.improved = val_loss, True
            return IMPROVED
        if self.num_evals < self.min_evals:
            return CONTINUE
        if not self.improved or self.last_stage:
            self.done = True
            return STOP
        self.stage += 1
        self.num_evals, self.improved, self.best = 0, False, float("inf")
        self.awaiting_baseline = True
        return ADVANCE

    def extend(self, horizons: list[int]) -> str:
        """Append stages to the schedule (resuming a run with a longer ``--horizons`` list).

        Returns what the trainer must do next: ``"advance"`` when the old last stage had finished with
        an improvement (restore the stage's best, then :meth:`set_baseline` at the new validation
        horizon), ``"rebaseline"`` when training is still in the old last stage, whose validation
        horizon has just grown (re-measure the stage's best there and pass it to :meth:`set_baseline`),
        ``"stopped"`` when the run had stopped for lack of improvement (extending changes nothing), and
        ``"none"`` otherwise.
        """
        horizons = [int(h) for h in horizons]
        if len(horizons) <= len(self.horizons) or horizons[:len(self.horizons)] != self.horizons:
            raise ValueError(f"can only append stages to the curriculum {self.horizons}, got {horizons}")
        if any(h <= 0 for h in horizons):
            raise ValueError(f"Invalid curriculum horizons: {horizons}")
        was_last = self.last_stage
        self.horizons = horizons
        if self.done:
            if not (was_last and self.improved):
                return "stopped"
            self.done = False
            self.stage += 1
            self.num_evals, self.improved, self.best = 0, False, float("inf")
            self.awaiting_baseline = True
            return "advance"
        if was_last and not self.awaiting_baseline:
            self.awaiting_baseline = True
            return "rebaseline"
        return "none"

    def set_baseline(self, val_loss: float) -> None:
        """The stage's reference value after ADVANCE (or after :meth:`extend` re-measured it), or the first
        stage's when the run starts from trained weights (constructed with ``awaiting_baseline=True``)."""
        if not self.awaiting_baseline:
            raise RuntimeError("set_baseline() is only valid right after ADVANCE or extend()")
        self.best, self.awaiting_baseline = val_loss, False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Curriculum":
        return cls(**d)
