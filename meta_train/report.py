"""python -m meta_train.report RESULTS_DIR [--readme README.md]

Builds the markdown results table from the JSON files written by ``meta_train.evaluate``: one row
per task, one column per optimizer label; a cell is ``final_ln_loss_mean ± std`` (ln of the mean
training loss over the last 100 steps, mean and std over seeds), with the number of diverged seeds
when there are any. A label evaluated on an lr grid is shown at the grid's best lr (which is named),
otherwise its single run is shown. The commands that produced the numbers are listed under the
table.

``--readme FILE`` replaces the text between ``<!-- results:start -->`` and ``<!-- results:end -->``
in FILE; if the markers are missing the file is left untouched and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from . import curves as curve_store
from .cli import ArgumentParser

START, END = "<!-- results:start -->", "<!-- results:end -->"
BASELINE_ORDER = ("adam", "rmsprop", "sgd")


def load_results(results_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(evaluation results, grid summaries) found in ``results_dir``."""
    runs, grids = [], []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            obj = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        obj["_file"] = path.name
        if obj.get("type") == "evaluation":
            runs.append(obj)
        elif obj.get("type") == "grid":
            grids.append(obj)
    return runs, grids


def select_cells(runs: list[dict[str, Any]], grids: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(task, label) -> the result shown: the best point of the label's grid if there is one, else its run."""
    by_file = {r["_file"]: r for r in runs}
    cells = {(r["task"], r["label"]): r for r in runs if not r.get("grid_point")}
    for g in grids:
        best = by_file.get(g["best_file"])
        if best is not None:
            cells[(g["task"], g["label"])] = {**best, "_from_grid": True}
    return cells


def bundled_digests() -> dict[str, str]:
    """{bundled weights name: :func:`learned_optim.weights_digest` of its file}; empty, with a warning, where
    learned_optim cannot be imported (the table itself needs only the JSON files)."""
    try:
        from learned_optim.weights import available_weights, resolve_weights, weights_digest
    except ImportError as exc:
        print(f"warning: results not checked against the bundled weights ({exc})", file=sys.stderr)
        return {}
    return {name: weights_digest(resolve_weights(name)) for name in available_weights()}


def split_stale(cells: dict[tuple[str, str], dict[str, Any]], digests: dict[str, str]
                ) -> tuple[dict[tuple[str, str], dict[str, Any]], list[str]]:
    """(cells, left out): a learned optimizer's result whose label is a bundled name but whose weights digest is
    not that file's was measured on other weights (e.g. before a re-export that changed what they compute)."""
    kept, stale = {}, []
    for key, result in cells.items():
        bundled = digests.get(key[1])
        if result.get("rule") is not None and bundled is not None and result.get("weights_digest") != bundled:
            stale.append(f"{key[1]} on {key[0]} (`{result['_file']}`)")
        else:
            kept[key] = result
    return kept, stale


def _order_tasks(tasks: set[str]) -> list[str]:
    try:
        from .tasks import TASKS

        known = [t for t in TASKS if t in tasks]
    except ImportError:  # pragma: no cover - the tasks need torch only
        known = []
    return known + sorted(tasks - set(known))


def _order_labels(cells: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Learned optimizers (alphabetical), then the baselines (adam, rmsprop, sgd), then anything else."""
    kinds = {label: r.get("rule") for (_, label), r in cells.items()}

    def key(label: str):
        if kinds[label] is not None:
            return (0, label)
        if label in BASELINE_ORDER:
            return (1, f"{BASELINE_ORDER.index(label)}")
        return (2, label)

    return sorted(kinds, key=key)


def format_cell(result: dict[str, Any], protocol: tuple[int, int] | None = None) -> str:
    """``mean ± std``, then ``lr …`` (grids and baselines), diverged count and a protocol note if it differs."""
    mean, std = result["final_ln_loss_mean"], result["final_ln_loss_std"]
    text = "NaN/Inf" if mean is None else f"{mean:.2f} ± {std:.2f}"
    notes = []
    if result.get("_from_grid") or result.get("rule") is None:
        notes.append(f"lr {result['lr']:g}")
    elif result.get("lr", 1.0) != 1.0:
        notes.append(f"lr {result['lr']:g}")
    if result["diverged"]:
        notes.append(f"{result['diverged']}/{len(result['seeds'])} diverged")
    if protocol is not None and (result["steps"], len(result["seeds"])) != protocol:
        notes.append(f"{result['steps']} steps, {len(result['seeds'])} seeds")
    return text + (f" ({', '.join(notes)})" if notes else "")


def results_markdown(results_dir: str | os.PathLike, digests: dict[str, str] | None = None) -> str:
    """The markdown table and the list of commands behind it. ``digests``: {bundled name: weights digest}
    (default: the bundled files'); results of other weights under those names are left out and listed."""
    runs, grids = load_results(results_dir)
    cells, stale = split_stale(select_cells(runs, grids), bundled_digests() if digests is None else digests)
    if not cells:
        return f"_No evaluation results in `{results_dir}`._\n"
    protocols = Counter((r["steps"], len(r["seeds"])) for r in cells.values())
    protocol = protocols.most_common(1)[0][0]
    tasks = _order_tasks({t for t, _ in cells})
    labels = _order_labels(cells)
    lines = [f"Final training loss, ln of the mean over the last {min(100, protocol[0])} steps, after {protocol[0]} "
             f"steps; mean ± std "
             f"over {protocol[1]} seeds (test split, batch 128, init N(0, 0.01), batch norm at scale 1, shift 0). "
             "Baselines: the best lr of a "
             "half-decade grid 1e-4..1 at 2 seeds × 2,000 steps (`results/grid/`), then, where a full-budget grid "
             "around it exists (`scripts/baselines_fine.sh`, extended while its best is at an end), the best lr of "
             "that grid; \"diverged\": NaN/Inf, or final loss above the initial loss.", "",
             "| task | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for task in tasks:
        row = [format_cell(cells[(task, label)], protocol) if (task, label) in cells else "–" for label in labels]
        lines.append(f"| {task} | " + " | ".join(row) + " |")
    if stale:
        lines += ["", "Left out, measured on other weights than the bundled file of that name (rerun their "
                  "commands): " + "; ".join(stale) + "."]
    lines += ["", "Commands:", ""]
    seen = []
    for task in tasks:
        for label in labels:
            result = cells.get((task, label))
            if result is None:
                continue
            grid = next((g for g in grids if g["task"] == task and g["label"] == label), None)
            command = (grid or result).get("command") or result.get("command")
            entry = f"- `{command}`" if command else f"- {label} on {task}: Python API call (no command line stored)"
            if entry not in seen:
                seen.append(entry)
    return "\n".join(lines + seen) + "\n" + claims_markdown(cells)


# The paper's released weights, run through a faithful PyTorch port on this protocol (MLP-orig, 10k steps):
# reference values, not measured here.
RELEASED_MLP_ORIG = {"dm": 0.1, "dm-cl": -4.3, "dm-il": -3.2, "dm-cl-il": -5.6, "rnnprop": -11.0,
                     "rnnprop-cl-il": -9.8}


def _value(cells, task: str, label: str) -> float | None:
    result = cells.get((task, label))
    return None if result is None else result.get("final_ln_loss_mean")


def _better(cells, task: str, a: str, b: str) -> bool:
    """``a`` beats ``b`` on ``task`` by more than the larger of their seed std (a difference inside the
    seed-to-seed spread is not counted as an improvement)."""
    ra, rb = cells[(task, a)], cells[(task, b)]
    margin = max(ra.get("final_ln_loss_std") or 0.0, rb.get("final_ln_loss_std") or 0.0)
    return ra["final_ln_loss_mean"] < rb["final_ln_loss_mean"] - margin


def _fmt(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.2f}"


def _verdict(ok: bool | None) -> str:
    return "**not checked** (missing results)" if ok is None else ("**held**" if ok else "**did not hold**")


STALL_NATS = 0.1  # claim (e): a seed that ends less than this far below its initial ln loss did not train
DEGRADE_NATS = 0.5  # claim (a): how far above its lowest point a smoothed curve must end to count as degrading
# claim (e): the paper's CL+IL models, the ones its transfer experiments (Section 5, Fig. 3) run beyond MLP-orig
TRANSFER_MODELS = ("dm-cl-il", "rnnprop-cl-il", "scale-cl-il")


def smoothed_ln_curve(result: dict[str, Any], window: int = 100) -> list[tuple[int, float]]:
    """(step, mean over seeds of ln(mean loss of the window ending at step)) at every full window that all
    seeds reached with finite losses (the window shrinks to the curve length for short curves). A thinned curve
    (:mod:`meta_train.curves`) averages the losses it kept in each window."""
    seeds = [curve_store.points(result, i) for i in range(len(result["losses"]))]
    length = min(curve_store.lengths(result))
    window = max(1, min(window, length))
    out = []
    for end in range(window, length + 1, window):
        values = []
        for steps, losses in seeds:
            chunk = [v for t, v in zip(steps, losses) if end - window <= t < end]
            if not chunk or any(x is None or not math.isfinite(x) for x in chunk):
                return out
            values.append(math.log(max(sum(chunk) / len(chunk), LN_FLOOR_LOSS)))
        out.append((end, sum(values) / len(values)))
    return out


def _random_scale(name: str) -> float | None:
    """The random-scaling bound in the recipe of the bundled file ``name`` (0: off); None if it cannot be read."""
    from learned_optim.weights import WeightsError, read_metadata, resolve_weights

    try:
        return float(read_metadata(resolve_weights(name))["recipe"].get("random_scale") or 0)
    except WeightsError:  # not bundled here, or unreadable: no caveat rather than a wrong one
        return None


def _with_scaling(name: str, bound: float) -> str:
    return f"`{name}` with random scaling B = {bound:g}" if bound else f"`{name}` without"


def _scaling_caveat(pairs: list[tuple[str, str]], technique: str = "CL+IL") -> str:
    """A note for the pairs of bundled files whose recipes differ in random scaling as well as in ``technique``."""
    notes = []
    for a, b in pairs:
        ra, rb = _random_scale(a), _random_scale(b)
        if ra is not None and rb is not None and ra != rb:
            notes.append(f"{_with_scaling(a, ra)}, {_with_scaling(b, rb)}")
    if not notes:
        return ""
    which = "this pair differs" if len(notes) == 1 else "these pairs differ"
    it = "it does" if len(notes) == 1 else "they do"
    return f" (meta-trained {'; '.join(notes)}: {which} in random scaling too, so {it} not isolate {technique})"


def claims_markdown(cells: dict[tuple[str, str], dict[str, Any]]) -> str:
    """The paper's claims, each with the measured numbers and whether it held."""
    def v(label: str, task: str = "mlp-orig") -> float | None:
        return _value(cells, task, label)

    lines = ["", "### The paper's claims, checked on our weights", ""]
    # (a) vanilla L2O-DM degrades or diverges at long horizons: its smoothed curve (mean over seeds of the ln of
    # 100-step window means) ends more than DEGRADE_NATS above its own minimum, or a seed diverges
    dm = cells.get(("mlp-orig", "dm"))
    if dm is None:
        lines.append(f"- (a) vanilla L2O-DM degrades or diverges at long horizons: {_verdict(None)}")
    else:
        curve = smoothed_ln_curve(dm)
        if curve:
            low = min(range(len(curve)), key=lambda i: curve[i][1])
            held = dm["diverged"] > 0 or curve[-1][1] - curve[low][1] > DEGRADE_NATS
            lines.append(f"- (a) vanilla L2O-DM degrades or diverges at long horizons on MLP-orig: smoothed ln loss "
                         f"lowest {curve[low][1]:.2f} at step {curve[low][0]}, {curve[-1][1]:.2f} at step "
                         f"{curve[-1][0]} (degrading = more than {DEGRADE_NATS} above its lowest), "
                         f"{dm['diverged']}/{len(dm['seeds'])} seeds diverged: {_verdict(held)}")
        else:
            lines.append(f"- (a) vanilla L2O-DM degrades or diverges at long horizons on MLP-orig: the curves hit "
                         f"NaN/Inf in their first window: {_verdict(True)}")
    # (b) CL and IL each improve L2O-DM, CL+IL most
    vals = {k: v(k) for k in ("dm", "dm-cl", "dm-il", "dm-cl-il")}
    ok = None if None in vals.values() else (
        _better(cells, "mlp-orig", "dm-cl", "dm") and _better(cells, "mlp-orig", "dm-il", "dm")
        and _better(cells, "mlp-orig", "dm-cl-il", "dm-cl") and _better(cells, "mlp-orig", "dm-cl-il", "dm-il"))
    lines.append("- (b) CL and IL each improve L2O-DM, CL+IL most (MLP-orig; an improvement must exceed the seed "
                 "std): "
                 + ", ".join(f"{k} {_fmt(x)}" for k, x in vals.items()) + f": {_verdict(ok)}"
                 + _scaling_caveat([("dm", "dm-cl"), ("dm", "dm-il"), ("dm-cl", "dm-cl-il"), ("dm-il", "dm-cl-il")],
                                   technique="CL or IL"))
    # (c) dm-cl-il beats the tuned baselines on MLP-orig and Conv-MNIST with no diverged seed
    parts, oks = [], []
    for task in ("mlp-orig", "conv-mnist"):
        ours = cells.get((task, "dm-cl-il"))
        base = {b: v(b, task) for b in BASELINE_ORDER}
        known = [x for x in base.values() if x is not None]
        if ours is None or not known:
            oks.append(None)
        else:
            mean = ours["final_ln_loss_mean"]
            oks.append(mean is not None and mean < min(known) and ours["diverged"] == 0)
        parts.append(f"{task}: dm-cl-il {_fmt(v('dm-cl-il', task))} vs "
                     + ", ".join(f"{b} {_fmt(x)}" for b, x in base.items()))
    ok = False if False in oks else (None if None in oks else True)  # one measured failure decides
    lines.append("- (c) dm-cl-il beats grid-tuned Adam, RMSprop and SGD with no diverged seed: " + "; ".join(parts)
                 + f": {_verdict(ok)}")
    # (d) CL+IL improves RNNprop and L2O-Scale
    pairs = [("rnnprop", "rnnprop-cl-il"), ("scale", "scale-cl-il")]
    ok = None if any(v(a) is None or v(b) is None for a, b in pairs) else all(
        _better(cells, "mlp-orig", b, a) for a, b in pairs)
    lines.append("- (d) CL+IL improves RNNprop and L2O-Scale (MLP-orig; beyond the seed std): "
                 + ", ".join(f"{a} {_fmt(v(a))} → {b} {_fmt(v(b))}" for a, b in pairs) + f": {_verdict(ok)}"
                 + _scaling_caveat(pairs))
    # (e) transfer to the other optimizees and to Fashion-MNIST: it transfers where it trains the optimizee: every
    # seed ends at least STALL_NATS below its own initial ln loss (so none diverged or stayed where it started)
    rows, oks, beats = [], [], 0
    for label in TRANSFER_MODELS:
        for task in _order_tasks({t for t, _ in cells} - {"mlp-orig"}):
            ours = cells.get((task, label))
            if ours is None:
                continue
            final = ours.get("final_ln_loss_mean")  # None: a seed hit NaN/Inf
            start = sum(math.log(c[0]) for c in ours["losses"]) / len(ours["losses"])
            stalled = sum(f is None or f > math.log(c[0]) - STALL_NATS
                          for f, c in zip(ours["final_ln_loss"], ours["losses"]))
            trains = stalled == 0  # implies finite and not diverged (each seed ends below its start)
            adam = v("adam", task)
            beats += trains and adam is not None and final < adam
            oks.append(trains)
            rows.append(f"{label} on {task} {'NaN/Inf' if final is None else _fmt(final)} from ln {start:.2f}, "
                        f"{ours['diverged']}/{len(ours['seeds'])} diverged, {stalled}/{len(ours['seeds'])} not "
                        f"{STALL_NATS} below their start (tuned Adam {_fmt(adam)})")
    verdict = _verdict(None) if not oks else (
        f"{_verdict(all(oks))}: trains on {sum(oks)} of {len(oks)} measured task/optimizer pairs, "
        f"beats tuned Adam on {beats}")
    lines.append("- (e) the CL+IL optimizers transfer beyond MLP-orig (every seed ends at least "
                 f"{STALL_NATS} below its own initial ln loss): "
                 + ("; ".join(rows) if rows else "not measured") + f": {verdict}")
    # (f) at least as good as the paper's released weights of the same name
    rows, oks = [], []
    for name, released in RELEASED_MLP_ORIG.items():
        ours = v(name)
        if ours is not None:
            oks.append(ours <= released)
        rows.append(f"{name} {_fmt(ours)} vs released {released:+.1f}")
    lines.append("- (f) each of our weights at least as good as the paper's released weights of the same name "
                 "(released values measured with a PyTorch port of the paper's code, not re-measured here): "
                 + "; ".join(rows) + ": "
                 + (_verdict(None) if not oks else f"**held for {sum(oks)} of {len(oks)} measured**"))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- README, docs, figure
FIGURE_LEARNED = ("rnnprop", "rnnprop-cl-il", "dm-cl-il")  # the learned optimizers drawn in the figure
LN_FLOOR_LOSS = 1e-45  # as meta_train.evaluate: ln of an exactly-zero mean loss uses float32's smallest value
FIGURE_WINDOW = 200  # steps per plotted point: ln of the window's mean loss (as the final loss), mean over seeds


def _rank_key(result: dict[str, Any]) -> tuple:
    """Sort key of "best": no diverged seed first, then the lowest mean final ln loss."""
    mean = result.get("final_ln_loss_mean")
    return (result.get("diverged", 0) > 0, math.inf if mean is None else mean)


def best_per_task(cells: dict[tuple[str, str], dict[str, Any]]) -> dict[str, tuple[dict | None, dict | None]]:
    """{task: (best learned result, best tuned baseline result)}: learned = bundled names evaluated at lr 1."""
    out = {}
    for task in _order_tasks({t for t, _ in cells}):
        learned = [r for (t, _), r in cells.items() if t == task and r.get("rule") is not None and r.get("lr") == 1.0]
        tuned = [r for (t, label), r in cells.items() if t == task and label in BASELINE_ORDER]
        out[task] = (min(learned, key=_rank_key) if learned else None, min(tuned, key=_rank_key) if tuned else None)
    return out


def _seeds_won(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """``k/n``: seeds (same initialisation and batches) on which ``ours`` ends below ``theirs``."""
    mine = dict(zip(ours["seeds"], ours["final_ln_loss"]))
    other = dict(zip(theirs["seeds"], theirs["final_ln_loss"]))
    common = [s for s in mine if s in other]
    wins = sum(mine[s] is not None and (other[s] is None or mine[s] < other[s]) for s in common)
    return f"{wins}/{len(common)}"


def _short(result: dict[str, Any] | None, baseline: bool = False) -> str:
    if result is None:
        return "–"
    mean, std = result["final_ln_loss_mean"], result["final_ln_loss_std"]
    text = "NaN/Inf" if mean is None else f"{mean:.2f} ± {std:.2f}"
    if result["diverged"]:
        text += f" ({result['diverged']}/{len(result['seeds'])} diverged)"
    return text


def summary_markdown(cells: dict[tuple[str, str], dict[str, Any]], figure: str | None) -> str:
    """The README's results: the figure and, per task, the best learned optimizer against the best tuned one."""
    protocol = Counter((r["steps"], len(r["seeds"])) for r in cells.values()).most_common(1)[0][0]
    lines = []
    if figure:
        lines += [f"![ln training loss of learned optimizers and grid-tuned baselines on every task]({figure})", ""]
    lines += [f"ln of the final training loss (mean of the last 100 of {protocol[0]:,} steps), mean ± std over "
              f"{protocol[1]} seeds; lower is better. Learned optimizers at `lr=1`; baselines at the best lr of a "
              "grid search on the same protocol. \"Seeds won\": seeds (same initialisation and batches) on which "
              "the learned optimizer ends lower.", "",
              "| task | best learned optimizer | ln loss | best tuned baseline | ln loss | seeds won |",
              "|---|---|---|---|---|---|"]
    for task, (ours, theirs) in best_per_task(cells).items():
        won = _seeds_won(ours, theirs) if ours and theirs else "–"
        name = f"`{ours['label']}`" if ours else "–"
        base = f"{theirs['label']} (lr {theirs['lr']:g})" if theirs else "–"
        lines.append(f"| {task} | {name} | {_short(ours)} | {base} | {_short(theirs)} | {won} |")
    lines += ["", recipes_sentence()]
    return "\n".join(lines) + "\n"


def recipes_sentence() -> str:
    """One sentence on the bundled files' recipes: which had random scaling (``--random-scale``) on."""
    from learned_optim.weights import registry

    scaled = {name: bound for name in sorted(registry()) if (bound := _random_scale(name))}
    if not scaled:
        on = "was off in the recipe of every bundled file"
    else:
        names = [f"`{n}` (B = {b:g})" for n, b in scaled.items()]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]},"
        on = f"was on in the recipe of {listed} and off for the other bundled files"
    return ("Random scaling of the optimizee during meta-training (`--random-scale`, the paper code's `if_scale`) "
            f"{on}; [docs/weights.md](docs/weights.md) has each file's recipe.")


def results_figure(cells: dict[tuple[str, str], dict[str, Any]], path: str | os.PathLike,
                   learned: tuple[str, ...] = FIGURE_LEARNED) -> Path:
    """One panel per task: ln of the mean loss of each window of FIGURE_WINDOW steps (what the final loss is
    for the last 100), mean over seeds, of ``learned`` (solid) and of the selected tuned baselines (dashed).
    A curve stops where a seed hit NaN/Inf."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _order_tasks({t for t, _ in cells})
    cols = 4
    rows = math.ceil((len(tasks) + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    labels = [*learned, *BASELINE_ORDER]
    colors = dict(zip(labels, plt.get_cmap("tab10").colors))
    handles = {}
    for ax, task in zip(axes.flat, tasks):
        for label in labels:
            result = cells.get((task, label))
            if result is None:
                continue
            curve = smoothed_ln_curve(result, window=FIGURE_WINDOW)
            if not curve:
                continue
            x, mean = [t - FIGURE_WINDOW / 2 for t, _ in curve], [v for _, v in curve]
            name = label if result.get("rule") is not None else f"{label} (tuned)"
            (line,) = ax.plot(x, mean, lw=1.3, color=colors[label], ls="-" if result.get("rule") else "--")
            handles[name] = line
        ax.set_title(task, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("ln training loss", fontsize=8)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    list(axes.flat)[-1].legend(handles.values(), handles.keys(), loc="center", fontsize=9, frameon=False)
    fig.suptitle("Learned optimizers (lr=1) against grid-tuned baselines: ln training loss, mean over seeds",
                 fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=90, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)
    return path


def weights_markdown(cells: dict[tuple[str, str], dict[str, Any]]) -> str:
    """docs/weights.md: every bundled name, its recipe, and the tasks on which it is the best learned optimizer."""
    from learned_optim.weights import read_metadata, recipe_summary, registry, resolve_weights

    best = {task: ours["label"] for task, (ours, _) in best_per_task(cells).items() if ours}
    wins: dict[str, list[str]] = {}
    for task, label in best.items():
        wins.setdefault(label, []).append(task)
    names = sorted(registry())
    recommended = max(names, key=lambda n: (len(wins.get(n, [])), -(_value(cells, "mlp-orig", n) or math.inf)))
    cls = {"dm": "L2ODM", "rnnprop": "RNNprop", "scale": "L2OScale"}
    lines = ["# Bundled weights", "",
             "<!-- Generated by `python -m meta_train.report results --docs docs`: edit the generator, not this "
             "file. -->", "",
             "Every file was meta-trained by this repository's `meta_train` on MNIST (MLP-orig, training split); "
             "the model card next to it (`pretrained/NAME.md`, or `learned_optim.model_card(NAME)`) has the exact "
             "recipe, the stage reached and the evaluation summaries. Numbers: ln of the final training loss, "
             "10,000 steps, mean over 10 seeds, at `lr=1` (docs/reproduction.md has every task and optimizer).", "",
             f"**Start with `{recommended}`**: it is the best learned optimizer on the most tasks "
             f"({', '.join(wins.get(recommended, [])) or 'none measured'}).", "",
             "| name | class | recipe | meta-training | MLP-orig | best learned optimizer on |",
             "|---|---|---|---:|---|---|"]
    for name in names:
        meta = read_metadata(resolve_weights(name))
        value = _value(cells, "mlp-orig", name)
        lines.append(f"| `{name}` | `{cls[meta['rule']]}` | {recipe_summary(meta['recipe'])} | "
                     f"{_hours(meta['recipe'].get('wall_clock_s'))} | {_fmt(value)} | "
                     f"{', '.join(wins.get(name, [])) or '–'} |")
    lines += ["", "Meta-training: wall-clock time of the run up to its export (`wall_clock_s` of the recipe, validation "
                  "included), on one core of this project's 2-core CPU machine (`--threads 1`), often beside another "
                  "run, so an upper bound."]
    return "\n".join(lines) + "\n"


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


REPRODUCTION_HEAD = """# Reproduction: the paper's protocol on our weights

<!-- Generated by `python -m meta_train.report results --docs docs`: edit the generator, not this file. -->

*Training Stronger Baselines for Learning to Optimize* (Chen et al., NeurIPS 2020) evaluates each learned optimizer
by training a fresh optimizee for 10,000 steps (batches of 128 drawn with replacement from the MNIST test split,
parameters drawn N(0, 0.01)) over 10 seeds and reporting the ln of the final training loss.
`python -m meta_train.evaluate` runs exactly that with the optimizers as users run them; the tuned baselines are
Adam, RMSprop and SGD at the best learning rate of a grid search on the same protocol
(`scripts/baselines.sh`, `scripts/baselines_fine.sh`). Every number below is read from the JSON files in
`results/` (curves kept at every 20th step plus the last 100 steps, which hold every number used here);
`python -m meta_train.report results --readme README.md --docs docs` regenerates this page, the README's
table and figure and docs/weights.md. Longer analyses of single tasks are in [findings.md](findings.md).

## Results

"""


def replace_between_markers(text: str, block: str) -> str:
    """``text`` with everything between the results markers replaced by ``block``; ValueError if missing."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"the markers {START} ... {END} are missing (or out of order)")
    return text[:start + len(START)] + "\n" + block.rstrip("\n") + "\n" + text[end:]


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    if path.exists():
        shutil.copymode(path, tmp)
    os.replace(tmp, path)


def thin_results(results_dir: str | os.PathLike) -> int:
    """Rewrite every result file under ``results_dir`` (sub-folders too, not partial seeds) with thinned curves
    (:mod:`meta_train.curves`); returns how many changed. Summaries are unchanged: they use only kept losses."""
    changed = 0
    for path in sorted(Path(results_dir).rglob("*.json")):
        if ".partial" in path.parts:
            continue
        try:
            obj = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(obj, dict) or obj.get("type") != "evaluation" or curve_store.is_thinned(obj):
            continue
        _write_text(path, json.dumps(curve_store.thin_result(obj), allow_nan=False, separators=(",", ":")))
        changed += 1
    return changed


def current_cells(results_dir: str | os.PathLike) -> dict[tuple[str, str], dict[str, Any]]:
    runs, grids = load_results(results_dir)
    return split_stale(select_cells(runs, grids), bundled_digests())[0]


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m meta_train.report", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results_dir")
    ap.add_argument("--readme", default=None,
                    help="replace the results section of this markdown file (the figure and the best-per-task table)")
    ap.add_argument("--docs", default=None,
                    help="write DOCS/reproduction.md (full table, claims, commands), DOCS/weights.md and the figure "
                         "DOCS/figures/results.png")
    ap.add_argument("--thin", action="store_true",
                    help="first rewrite the result files with thinned curves (every 20th step + the last 100)")
    args = ap.parse_args(argv)
    if args.thin:
        print(f"thinned {thin_results(args.results_dir)} result file(s)", file=sys.stderr)
    table = results_markdown(args.results_dir)
    print(table, end="")
    if not args.readme and not args.docs:
        return 0
    cells = current_cells(args.results_dir)
    figure = None
    if args.docs:
        docs = Path(args.docs)
        _write_text(docs / "reproduction.md", REPRODUCTION_HEAD + table)
        _write_text(docs / "weights.md", weights_markdown(cells))
        if cells:
            figure = results_figure(cells, docs / "figures" / "results.png")
    if args.readme:
        path = Path(args.readme)
        rel = os.path.relpath(figure, path.parent).replace(os.sep, "/") if figure else None
        block = summary_markdown(cells, rel) if cells else table
        try:
            new = replace_between_markers(path.read_text(), block)
        except (OSError, ValueError) as exc:
            print(f"error: {path}: {exc}; file left untouched", file=sys.stderr)
            return 1
        _write_text(path, new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
