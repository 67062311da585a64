#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: the `cuda` tests, then the step() benchmark at 1M, 10M and
# 100M parameters (one matrix and many tensors; L2O-DM, RNNprop, L2O-Scale next to Adam; the torch and the
# Triton backends, the torch backend of DM/RNNprop skipped at 100M), a sweep of the fused kernel's launch
# configuration at 10M, the meta-training step with populations of 1, 8 and 64 optimizees, the batched
# evaluation against one seed at a time, and the fused step's host cost on this machine's CPU. The meta-step
# runs L2O-DM and RNNprop twice, with the fused LSTM cell kernels (the default on a GPU) and with the cell as
# torch ops (+torchcell). Everything lands in one folder (default benchmarks/results/gpu): a log per stage,
# the JSON of each benchmark, junit XML
# of the tests and summary.json (the bars: DM/RNNprop step within 2x the bandwidth floor at 10M and 3x at 1M,
# many tensors within 1.5x one matrix; a K = 64 meta-step within 2x K = 1; 10 x 10,000 evaluation steps < 60 s). Each stage has a time cap so that the whole run stays under 8 minutes
# on an H200;
# META_COMPILE=1 adds up to 4 minutes: the meta-step's time and memory with the rule through torch.compile
# (meta_train --compile) beside the eager rule.
#
#     bash scripts/gpu_check.sh [OUT_DIR]
#
# The meta-step and evaluation benchmarks read MNIST from $LEARNED_OPTIM_DATA, default ./data (git-ignored: copy
# torchvision's MNIST folder there, e.g. `mkdir -p data && cp -r /path/to/data/MNIST data/`, and send it along).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export LEARNED_OPTIM_DATA=${LEARNED_OPTIM_DATA:-$PWD/data}
unset TRITON_INTERPRET  # the interpreter runs CPU tensors only
SWEEP=${SWEEP:-"32x2,64x8,128x8,64x4:tf32x3:128,64x4:tf32x3:168,64x4:tf32"}  # BLOCKxWARPS[:PRECISION[:MAXNREG]]
status=0
started=$(date +%s)

stage() {  # stage NAME CAP_SECONDS COMMAND...
    local name=$1 cap=$2
    shift 2
    local t0
    t0=$(date +%s)
    echo "== $name (cap ${cap}s)"
    timeout --signal=INT --kill-after=10 "$cap" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "   exit $rc after $(($(date +%s) - t0)) s; log: $OUT/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

python - >"$OUT/env.json" <<'EOF'
import json, platform, subprocess, torch
info = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
try:
    import triton
    info["triton"] = triton.__version__
except Exception as exc:
    info["triton"] = f"not importable: {exc}"
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,driver_version",
                                         "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError:
    pass
print(json.dumps(info, indent=1))
EOF
cat "$OUT/env.json"

# a cold Triton cache costs seconds per kernel variant: compile them all at once, in parallel
stage precompile 50 python - "$SWEEP" <<'EOF'
import sys
from learned_optim.kernels import lstm
variants = lstm.variants()
variants += lstm.variants(block=16, dtypes=(__import__("torch").float32,))  # the tests' block-boundary cases
variants += lstm.variants(configs=[{"hidden_size": 8, "num_layers": 1}], rules=("dm",), vecs=(1,),
                          dtypes=(__import__("torch").float32,))
variants += lstm.variants(configs=[{"hidden_size": 36, "num_layers": 3}], rules=("rnnprop",), vecs=(1,),
                          dtypes=(__import__("torch").float32,))
for cfg in filter(None, sys.argv[1].split(",")):
    block_warps, *rest = cfg.split(":")
    block, warps = map(int, block_warps.split("x"))
    for v in lstm.variants(dtypes=(__import__("torch").float32,), vecs=(4,)):
        variants.append({**v, "block": block, "warps": warps, "precision": (rest[0] if rest and rest[0] else
                         v["precision"]), "maxnreg": int(rest[1]) if len(rest) > 1 else 0})
print("\n".join(lstm.precompile(variants)))
EOF

stage cuda-tests 120 python -m pytest -q -p no:cacheprovider -m cuda tests/test_kernels.py tests/test_cuda.py \
    --junitxml "$OUT/cuda-tests.xml"

BENCH=(python benchmarks/step.py --device cuda --models dm,rnnprop,scale --no-memory)
stage step-1M 45 "${BENCH[@]}" --sizes 1M --backends torch,triton --repeats 10 --warmup 2 --out "$OUT/step_1M.json"
stage step-10M 75 "${BENCH[@]}" --sizes 10M --backends torch,triton --repeats 5 --warmup 1 --bf16-size '' \
    --out "$OUT/step_10M.json"
stage step-100M 55 "${BENCH[@]}" --sizes 100M --backends triton --repeats 3 --warmup 1 --bf16-size 100M \
    --no-gemm-floor --out "$OUT/step_100M.json"
stage sweep-10M 25 python benchmarks/step.py --device cuda --models dm,rnnprop --sizes 10M --shapes matrix \
    --backends triton --triton-configs "$SWEEP" --repeats 5 --warmup 1 --bf16-size '' --no-gemm-floor --no-memory \
    --out "$OUT/sweep_10M.json"
stage meta-step 65 python benchmarks/meta_step.py --device cuda --population 1,8,64 --repeats 6 \
    --models dm,dm+torchcell,rnnprop,rnnprop+torchcell,scale --out "$OUT/meta_step.json"
if [ "${META_COMPILE:-0}" = 1 ]; then  # opt-in (about a minute of compilation): meta_train --compile on the GPU
    stage meta-step-compile 120 python benchmarks/meta_step.py --device cuda --population 1,64 --repeats 5 \
        --models dm,dm+compile,rnnprop,rnnprop+compile --out "$OUT/meta_step_compile.json"
    stage meta-memory 120 python benchmarks/meta_memory.py --device cuda --population 64 --truncations 1 \
        --out "$OUT/meta_memory.json"
fi
stage evaluate-speed 40 python benchmarks/evaluate_speed.py --device cuda --optimizers adam,dm,rnnprop --steps 1000 \
    --out "$OUT/evaluate_speed.json"
# the host side of the fused step on this machine's CPU (launches stubbed; a few seconds)
stage step-host 10 python benchmarks/step_host.py --sizes 1M --repeats 10 --steps 5 --out "$OUT/step_host.json"

python benchmarks/table.py --bar "$OUT" | tee "$OUT/summary.json"

# the README's speed section with the GPU table from this run; to put it in the README where the folder came back:
#     python benchmarks/table.py --summary --gpu FOLDER --readme README.md
python benchmarks/table.py --summary --gpu "$OUT" >"$OUT/readme_speed.md" 2>"$OUT/readme_speed.log" || status=1

echo "total $(($(date +%s) - started)) s; results in $OUT"
exit $status
