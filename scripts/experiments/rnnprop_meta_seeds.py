"""Summarise scripts/experiments/rnnprop_meta_seeds.sh: per meta-training seed, the selected epoch and its
validation loss (N=100, 10 runs) and the MLP-orig curve of evaluation seed 0 (ln of the 100-step mean loss at
steps 1,000 / 3,000 / 10,000). Meta-seed 0 is the bundled ``rnnprop`` (runs/rnnprop, results/rnnprop__mlp-orig.json).
Writes results/diagnostics/rnnprop_meta_seeds.json and prints it."""
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from meta_train import curves  # noqa: E402


def ln_window(result, index, end, width=100):
    """ln of the mean stored loss over steps [end - width, end) (a thinned curve keeps every 20th step there)."""
    window = curves.values_between(result, index, end - width, end)
    if not window or any(x is None for x in window):
        return None
    return round(math.log(sum(window) / len(window)), 3)


def best_eval(log_path):
    evals = [json.loads(l) for l in log_path.read_text().splitlines() if '"type": "eval"' in l]
    best = min(evals, key=lambda e: e["val_loss"])  # what the trainer keeps (first best on ties)
    return best["epoch"], round(best["val_loss"], 4), evals[-1]["epoch"]


def row(seed, run_dir, result, index=0):
    epoch, val, last = best_eval(run_dir / "log.jsonl")
    res = json.loads(result.read_text())
    return {"meta_seed": seed, "run": str(run_dir.relative_to(ROOT)), "epochs": last, "selected_epoch": epoch,
            "val_loss_N100": val, "eval_seed": res["seeds"][index],
            "ln_loss_1000": ln_window(res, index, 1000), "ln_loss_3000": ln_window(res, index, 3000),
            "ln_loss_10000": round(res["final_ln_loss"][index], 3), "weights_digest": res["weights_digest"][:8]}


def main():
    rows = [row(0, ROOT / "runs/rnnprop", ROOT / "results/rnnprop__mlp-orig.json")]
    for run_dir in sorted((ROOT / "runs/rnnprop-seeds").glob("s*"), key=lambda p: int(p.name[1:])):
        result = ROOT / f"results/diagnostics/rnnprop_meta_seeds/rnnprop-{run_dir.name}__mlp-orig.json"
        if result.exists():
            rows.append(row(int(run_dir.name[1:]), run_dir, result))
    finals = [r["ln_loss_10000"] for r in rows]
    summary = {"what": __doc__.strip(), "command": "bash scripts/experiments/rnnprop_meta_seeds.sh SEEDS; "
               "python scripts/experiments/rnnprop_meta_seeds.py", "runs": rows,
               "ln_loss_10000_mean": round(statistics.mean(finals), 3),
               "ln_loss_10000_std": round(statistics.pstdev(finals), 3),
               "ln_loss_10000_min": min(finals), "ln_loss_10000_max": max(finals)}
    out = ROOT / "results/diagnostics/rnnprop_meta_seeds.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
