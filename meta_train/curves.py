"""Loss curves as stored in result files: every ``EVERY``-th step plus the last ``TAIL`` steps.

A full curve has one loss per step (``None`` once a run hit NaN/Inf, which ends it). Stored results keep every
number the protocol's summaries use, and a thinned curve for the figures:

- the loss at step 0 (the initial loss: "diverged" compares the final loss with it), and at every ``EVERY``-th step;
- the last ``TAIL`` losses of the curve, whole (the final loss is their mean, so it is exact);
- the curve's ``length`` (a run stopped by NaN/Inf is shorter than ``steps``; its last stored value is ``None``).

A result file says how its curves are stored in ``"curves"``: ``{"every": 20, "tail": 100, "lengths": [...]}``;
files without that key hold full curves (every step). :func:`points` gives (steps, values) of a stored curve either
way, so readers never need to know which.
"""
from __future__ import annotations

from typing import Any, Sequence

EVERY = 20
TAIL = 100


def kept_steps(length: int, every: int = EVERY, tail: int = TAIL) -> list[int]:
    """The steps a thinned curve of ``length`` losses keeps, in order."""
    head = range(0, max(0, length - tail), every)
    return sorted(set(head) | set(range(max(0, length - tail), length)))


def thin(curve: Sequence[float | None], every: int = EVERY, tail: int = TAIL) -> list[float | None]:
    """The values of ``curve`` at :func:`kept_steps`."""
    return [curve[i] for i in kept_steps(len(curve), every, tail)]


def is_thinned(result: dict[str, Any]) -> bool:
    return "curves" in result


def lengths(result: dict[str, Any]) -> list[int]:
    """The full length of each seed's curve."""
    if is_thinned(result):
        return list(result["curves"]["lengths"])
    return [len(c) for c in result["losses"]]


def points(result: dict[str, Any], index: int) -> tuple[list[int], list[float | None]]:
    """(steps, losses) of seed number ``index`` of a result, thinned or full."""
    values = result["losses"][index]
    if not is_thinned(result):
        return list(range(len(values))), list(values)
    spec = result["curves"]
    return kept_steps(spec["lengths"][index], spec["every"], spec["tail"]), list(values)


def tail_values(result: dict[str, Any], index: int, tail: int) -> list[float | None]:
    """The last ``tail`` losses of seed ``index`` (a thinned curve keeps them all when ``tail`` <= its TAIL)."""
    if is_thinned(result) and tail > result["curves"]["tail"]:
        raise ValueError(f"this result keeps only the last {result['curves']['tail']} losses whole, not {tail}")
    values = result["losses"][index]
    return list(values[-tail:]) if tail else []


def thin_result(result: dict[str, Any], every: int = EVERY, tail: int = TAIL) -> dict[str, Any]:
    """A result dict with thinned curves (unchanged if they are thinned already)."""
    if is_thinned(result):
        return result
    curves = result["losses"]
    return {**result, "losses": [thin(c, every, tail) for c in curves],
            "curves": {"every": every, "tail": tail, "lengths": [len(c) for c in curves]}}


def values_between(result: dict[str, Any], index: int, start: int, stop: int) -> list[float | None]:
    """The stored losses of seed ``index`` at steps ``start <= t < stop`` (all of them for a full curve; every
    ``every``-th one, and the whole tail, for a thinned one)."""
    steps, values = points(result, index)
    return [v for t, v in zip(steps, values) if start <= t < stop]


def matches(result: dict[str, Any], index: int, curve: Sequence[float | None]) -> bool:
    """Whether a freshly computed full ``curve`` agrees with the stored one at every stored step it covers."""
    steps, values = points(result, index)
    return all(curve[t] == v for t, v in zip(steps, values) if t < len(curve))
