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
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

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


def results_markdown(results_dir: str | os.PathLike) -> str:
    """The markdown table and the list of commands behind it."""
    runs, grids = load_results(results_dir)
    cells = select_cells(runs, grids)
    if not cells:
        return f"_No evaluation results in `{results_dir}`._\n"
    protocols = Counter((r["steps"], len(r["seeds"])) for r in cells.values())
    protocol = protocols.most_common(1)[0][0]
    tasks = _order_tasks({t for t, _ in cells})
    labels = _order_labels(cells)
    lines = [f"Final training loss, ln of the mean over the last {min(100, protocol[0])} steps, after {protocol[0]} "
             f"steps; mean ± std "
             f"over {protocol[1]} seeds (test split, batch 128, init N(0, 0.01)). Optimizers evaluated on an lr grid "
             "are shown at their best lr; \"diverged\": NaN/Inf, or final loss above the initial loss.", "",
             "| task | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for task in tasks:
        row = [format_cell(cells[(task, label)], protocol) if (task, label) in cells else "–" for label in labels]
        lines.append(f"| {task} | " + " | ".join(row) + " |")
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
    return "\n".join(lines + seen) + "\n"


def replace_between_markers(text: str, block: str) -> str:
    """``text`` with everything between the results markers replaced by ``block``; ValueError if missing."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"the markers {START} ... {END} are missing (or out of order)")
    return text[:start + len(START)] + "\n" + block.rstrip("\n") + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m meta_train.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results_dir")
    ap.add_argument("--readme", default=None, help="replace the results section of this markdown file")
    args = ap.parse_args(argv)
    table = results_markdown(args.results_dir)
    print(table, end="")
    if args.readme:
        path = Path(args.readme)
        try:
            new = replace_between_markers(path.read_text(), table)
        except (OSError, ValueError) as exc:
            print(f"error: {path}: {exc}; file left untouched", file=sys.stderr)
            return 1
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(new)
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
