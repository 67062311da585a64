"""Every bundled file meta-trained with random scaling against the file it replaced (the same recipe without
it, kept in ``results/superseded/NAME-unscaled__TASK.json``) on every task, with the tuned baselines of the results
table, one table per name; then every other random-scaling run measured on MLP-orig
(``results/diagnostics/random_scaling/RUN__mlp-orig.json``) against the bundled file of its name; then each
candidate measured on more tasks and not bundled (``results/candidates/``) against the file bundled under its name
now. Prints the markdown tables for docs/findings.md:

    python scripts/experiments/random_scaling.py [--results results]

Per task: mean ± std of the ln final loss over the seeds; "better" counts the seeds (same initialisation and
batches) on which the new file ends lower than the old one; "wins A/R/S" the seeds on which it ends lower than the
tuned Adam / RMSprop / SGD shown in the README's results. The last line of each table is the mean over the tasks
other than MLP-orig (the bundling rule). In the last table the bundled file's mean is taken over the seeds the run
was measured on.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from learned_optim.weights import WeightsError, read_metadata, recipe_summary, weights_digest  # noqa: E402
from meta_train import report  # noqa: E402


def _minus(text: str) -> str:
    return text.replace("-", "\u2212")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results")
    args = ap.parse_args(argv)
    results = Path(args.results)
    cells = report.select_cells(*report.load_results(results))
    names = sorted({p.name.split("-unscaled__")[0] for p in (results / "superseded").glob("*-unscaled__*.json")})
    for name in names:
        print("\n".join(_replaced(results, cells, name)))
        print()
    print("\n".join(_other_runs(results, cells)))
    for lines in _candidates(results, cells):
        print()
        print("\n".join(lines))
    return 0


def _replaced(results: Path, cells: dict, name: str) -> list[str]:
    bound = report._random_scale(name)
    lines = [f"| task | `{name}`, random scaling B = {bound:g} | before (B = 0) | better | wins A/R/S | tuned Adam / RMSprop / SGD |",
             "|---|---|---|---|---|---|"]
    others_new, others_old = [], []
    for task in report._order_tasks({t for t, _ in cells}):
        new = cells.get((task, name))
        old_path = results / "superseded" / f"{name}-unscaled__{task}.json"
        if new is None or not old_path.exists():
            continue
        old = json.loads(old_path.read_text())
        if task != "mlp-orig":
            others_new.append(new["final_ln_loss_mean"])
            others_old.append(old["final_ln_loss_mean"])
        tuned = [cells.get((task, b)) for b in report.BASELINE_ORDER]
        wins = " / ".join(report._seeds_won(new, t).split("/")[0] if t else "–" for t in tuned)
        values = " / ".join(_minus(f"{t['final_ln_loss_mean']:.2f}") if t else "–" for t in tuned)
        lines.append(f"| {task} | {_minus(report._short(new))} | {_minus(report._short(old))} | "
                     f"{report._seeds_won(new, old)} | {wins} | {values} |")
    if others_new:
        lines.append(f"| mean of the other {len(others_new)} tasks | {_mean(others_new)} | {_mean(others_old)} | | | |")
    return lines


def _mean(values: list[float]) -> str:
    return _minus(f"{sum(values) / len(values):.2f}")


def _other_runs(results: Path, cells: dict) -> list[str]:
    """The other random-scaling runs on MLP-orig, each against the bundled file its run name starts with."""
    lines = ["| run | recipe | seeds | ln loss, per seed | mean | bundled file, same seeds | better |",
             "|---|---|---|---|---|---|---|"]
    for path in sorted((results / "diagnostics" / "random_scaling").glob("*__mlp-orig.json")):
        run = json.loads(path.read_text())
        name = path.name.split("__")[0]
        bundled_name = name.split("-rs")[0]
        bundled = cells.get(("mlp-orig", bundled_name))
        if bundled is not None and run.get("weights_digest") and bundled.get("weights_digest") == run["weights_digest"]:
            continue  # the bundled file itself: in the table of its name above
        finals = run["final_ln_loss"]
        per_seed = ", ".join(_minus(f"{v:.2f}") for v in finals) if len(finals) <= 3 else f"{len(finals)} seeds"
        weights = _evaluated_file(Path(run["weights_path"]), run.get("weights_digest"))
        try:
            recipe = recipe_summary(read_metadata(weights)["recipe"]) if weights else "–"
        except (OSError, KeyError, WeightsError):
            recipe = "–"
        if bundled is None:
            against, better = f"no bundled `{bundled_name}`", "–"
        else:
            theirs = dict(zip(bundled["seeds"], bundled["final_ln_loss"]))
            against = f"`{bundled_name}` {_mean([theirs[s] for s in run['seeds']])}"
            better = report._seeds_won(run, bundled)
        lines.append(f"| `{name}` | {recipe} | {len(finals)} | {per_seed} | {_mean(finals)} | {against} | {better} |")
    return lines


def _candidates(results: Path, cells: dict) -> list[list[str]]:
    """One table per candidate measured beyond MLP-orig and not bundled (``results/candidates[/DIR]/NAME__TASK.json``,
    evaluated under the name it would be bundled as) against the file bundled under that name now and, where that name
    was replaced since, against the file it replaced (the one the candidate was judged against); its MLP-orig result is
    the random-scaling diagnostic of the same weights where the candidate folder has none."""
    diagnostics = {}
    for path in sorted((results / "diagnostics" / "random_scaling").glob("*__mlp-orig.json")):
        run = json.loads(path.read_text())
        diagnostics.setdefault(run.get("weights_digest"), run)
    groups: dict[tuple, dict] = {}
    for path in sorted((results / "candidates").rglob("*__*.json")):
        if ".partial" in path.parts:
            continue
        run = json.loads(path.read_text())
        groups.setdefault((run["label"], run.get("weights_digest"), run["weights_path"]), {})[run["task"]] = run
    tables = []
    for (name, digest, weights), by_task in groups.items():
        if any(n == name and c.get("weights_digest") == digest for (_, n), c in cells.items()):
            continue  # bundled since: in the table of its name above
        if "mlp-orig" not in by_task and digest in diagnostics:
            by_task["mlp-orig"] = diagnostics[digest]
        before = {task: json.loads(p.read_text()) for task in by_task
                  if (p := results / "superseded" / f"{name}-unscaled__{task}.json").exists()}
        header = f"| task | `{weights}` | `{name}` bundled | better |"
        if before:  # the name was replaced since: also against the file this candidate was judged against
            header += f" `{name}` before random scaling | better |"
        lines = [header, "|---" * header[1:].count("|") + "|"]
        ours, theirs, olds = [], [], []
        for task in report._order_tasks(set(by_task)):
            new, now = by_task[task], cells.get((task, name))
            if now is None:
                continue
            if task != "mlp-orig":
                ours.append(new["final_ln_loss_mean"])
                theirs.append(now["final_ln_loss_mean"])
            row = f"| {task} | {_minus(report._short(new))} | {_minus(report._short(now))} | {report._seeds_won(new, now)} |"
            if before:
                old = before.get(task)
                row += f" {_minus(report._short(old))} | {report._seeds_won(new, old)} |" if old else " – | – |"
                if old and task != "mlp-orig":
                    olds.append(old["final_ln_loss_mean"])
            lines.append(row)
        if ours:
            mean_row = f"| mean of the other {len(ours)} tasks | {_mean(ours)} | {_mean(theirs)} | |"
            if before:
                mean_row += f" {_mean(olds) if len(olds) == len(ours) else '–'} | |"
            lines.append(mean_row)
        tables.append(lines)
    return tables


def _evaluated_file(path: Path, digest: str | None) -> Path | None:
    """The weight file that was evaluated: ``path`` if its tensors are unchanged, else a snapshot beside it
    (a run's ``weights.safetensors`` moves on with its best model; ``epoch-E.safetensors`` keep earlier ones)."""
    for candidate in [path, *sorted(path.parent.glob("*.safetensors"))]:
        try:
            if candidate.exists() and weights_digest(candidate) == digest:
                return candidate
        except (OSError, WeightsError):
            continue
    return None


if __name__ == "__main__":
    raise SystemExit(main())
