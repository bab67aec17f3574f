#!/usr/bin/env bash
# The GPU check (issue 24): in at most 9.5 minutes on one H100 or H200, from the repository root,
#   1. tests/test_cuda.py: every pooling method and backbone family on CUDA against the CPU (fp32, fp64, bf16
#      autocast, channels_last; forward and backward), the fused attention kernels, torch.compile, the trainer;
#   2. benchmarks/bench_gpu.py: inference and train step of ours vs stock timm vs the paper code's formulation at
#      224 px, fp32 and bf16 + channels_last, a batch sized for the card and batch 8, peak CUDA memory;
#   3. benchmarks/bench_accuracy.py: the paper's stride-4 comparison on all of Fashion-MNIST (60,000 training and
#      10,000 test images), resnet18 x {skip, maxp, lip, gaussian_pool, nlp_headfix2} at 4222, 3 seeds, the epochs
#      sized by a calibration epoch to a 5-minute budget; then mobilenet_v2 at 4222121 if at least 90 s are left;
#   4. a summary: the card, each part's status and time, the test counts and failures, the accuracy tables with the
#      seeds' spread and the pairs of methods whose difference exceeds it.
# Each part runs under `timeout` (SIGINT, so pytest and the benchmarks end cleanly and keep what they finished)
# with a budget taken from one deadline, so a part that overruns cannot eat the others.
#
# Outputs (at most 8 files: what the device tool brings back from $OUT) in GPU_CHECK_OUT (default: $OUT, else
# output/gpu_check): gpu_check.log (everything printed), test_cuda.xml (JUnit), bench_gpu.md and bench_gpu.json,
# accuracy.md (tables) and accuracy.jsonl (every run), summary.md. Runs and checkpoints go to GPU_CHECK_WORK
# (default /dev/shm/gpu_check where /dev/shm has 4 GiB free, else /tmp/gpu_check), which is not brought back.
#
# Environment: PYTHON (default python3: on the device machines, the one with PyTorch); GPU_CHECK_BUDGET_S (default
# 570: the total); GPU_CHECK_PARTS (default "tests bench accuracy": a rerun can name fewer); GPU_CHECK_DATA
# (Fashion-MNIST's four IDX files, default .gpu_check/fashion-mnist if present, else Debian's
# /usr/share/datasets/fashion-mnist); wheels in .gpu_check/whl (e.g. timm, if the machine's is older than timm-nlp
# needs) are installed into the work folder first. GPU_CHECK_TINY=1: a dry run on the CPU (test_cuda.py on
# the CPU against itself, bench_gpu.py --device cpu --tiny, the accuracy grid's `tiny` preset): it checks the script
# and sizes nothing about a GPU; its numbers are no result.
#
# On the device machine (repository root; .gpu_check carried, see docs/benchmarks.md):
#   bash benchmarks/gpu_check.sh
# Dry run here:
#   GPU_CHECK_TINY=1 GPU_CHECK_OUT=output/gpu_check_dry bash benchmarks/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
TINY=${GPU_CHECK_TINY:-0}
OUTDIR=${GPU_CHECK_OUT:-${OUT:-output/gpu_check}}
# the runs' checkpoints (written every epoch) on a RAM disk where there is room, so that saving them costs no epoch time
SHM_FREE_KB=$(df -Pk /dev/shm 2> /dev/null | awk 'NR == 2 {print $4}')
if (( ${SHM_FREE_KB:-0} >= 4 * 1024 * 1024 )); then WORK=${GPU_CHECK_WORK:-/dev/shm/gpu_check}
else WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}; fi
PY=${PYTHON:-python3}
PARTS=" ${GPU_CHECK_PARTS:-tests bench accuracy} "
mkdir -p "$OUTDIR" "$WORK"
OUTDIR=$(cd "$OUTDIR" && pwd)
export PYTHONUNBUFFERED=1

main() {
if [ "$TINY" = 1 ]; then
    # CPU dry run: generous budgets (two slow cores); resnet18's grid of 1-epoch runs fits its budget, the
    # mobilenet_v2 one does not: a part cut short by its timeout is dry-run too
    TOTAL=${GPU_CHECK_BUDGET_S:-3600}; T_TESTS=1800; T_BENCH=300; T_ACC=720; T_MOBILE_MIN=90; T_MOBILE_MAX=150
    RESERVE=20
    export TIMM_NLP_CUDA_TESTS_ON_CPU=1
    BENCH_ARGS=(--device cpu --tiny)
    ACC_ARGS=(--preset tiny --device cpu --workers 1)
else
    TOTAL=${GPU_CHECK_BUDGET_S:-570}; T_TESTS=170; T_BENCH=90; T_ACC=290; T_MOBILE_MIN=90; T_MOBILE_MAX=600
    RESERVE=15
    BENCH_ARGS=(--batch auto 8)
    # batch 256 at lr 0.04 (the gpu preset's 0.02 at 128, scaled), one warm-up epoch; workers: the cores less 2
    ACC_ARGS=(--preset gpu --device cuda --batch-size 256 --lr 0.04 --warmup-epochs 1)
    # data loader workers pass their batches through /dev/shm: a small one (a container's 64 MB) takes only a few
    if (( ${SHM_FREE_KB:-0} < 1024 * 1024 )); then
        echo "warning: /dev/shm has ${SHM_FREE_KB:-0} KiB free: 2 data loader workers"
        ACC_ARGS+=(--workers 2)
    fi
fi
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
remaining() { echo $(( TOTAL - $(elapsed) )); }
# the smaller of a part's budget ($1) and the time left less what later parts need at least ($2)
budget() { local left=$(( $(remaining) - $2 )); if (( left < $1 )); then echo "$left"; else echo "$1"; fi; }
declare -gA STATUS SECONDS_OF
run_part() {  # name, budget seconds, command...: runs it under timeout, records its status and time
    local name=$1 limit=$2; shift 2
    local t0; t0=$(date +%s)
    if (( limit < 10 )); then
        echo "### $name: skipped, ${limit} s left in the budget"
        STATUS[$name]="skipped (no time left)"; SECONDS_OF[$name]=0; return
    fi
    echo "### $name: up to ${limit} s (at ${t0}, $(elapsed) s into the check)"
    timeout -s INT -k 15 "$limit" "$@"
    local rc=$?
    SECONDS_OF[$name]=$(( $(date +%s) - t0 ))
    if (( rc == 124 || rc == 137 )); then STATUS[$name]="timed out after ${limit} s (kept what it finished)"
    elif (( rc == 0 )); then STATUS[$name]="ok"
    else STATUS[$name]="exit status $rc"; fi
    echo "### $name: ${STATUS[$name]}, ${SECONDS_OF[$name]} s"
}

# --- environment ---------------------------------------------------------------------------------------------
SITE=$WORK/site
if compgen -G ".gpu_check/whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .gpu_check/whl/*.whl || echo "warning: the carried wheels did not install"
fi
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${GPU_CHECK_DATA:-}" ]; then DATA=$GPU_CHECK_DATA
elif [ -d .gpu_check/fashion-mnist ]; then DATA=$REPO/.gpu_check/fashion-mnist
else DATA=/usr/share/datasets/fashion-mnist; fi
echo "### gpu_check: $(date -u +%FT%TZ), budget ${TOTAL} s, parts${PARTS}, tiny=${TINY}, out ${OUTDIR}," \
     "work ${WORK}, data ${DATA}"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
CARD=$("$PY" - "$TINY" <<'EOF'
import os, sys
import torch
import timm
import timm_nlp
tiny = sys.argv[1] == '1'
cuda = torch.cuda.is_available()
card = torch.cuda.get_device_name() if cuda else 'CPU (dry run)'
mem = f', {torch.cuda.get_device_properties(0).total_memory / 2 ** 30:.0f} GiB' if cuda else ''
print(f'{card}{mem}; torch {torch.__version__}, CUDA {torch.version.cuda}, timm {timm.__version__}, timm-nlp '
      f'{timm_nlp.__version__}, {os.cpu_count()} CPU cores')
if not cuda and not tiny:
    sys.exit('no CUDA device: this check needs a GPU (GPU_CHECK_TINY=1 dry-runs it on the CPU)')
EOF
) || { echo "$CARD"; echo "### gpu_check: environment check failed"; exit 2; }
echo "### card: $CARD"
if [ ! -f "$DATA/train-images-idx3-ubyte.gz" ] && [ ! -f "$DATA/train-images-idx3-ubyte" ]; then
    echo "warning: no Fashion-MNIST in $DATA: the accuracy parts will fail"
fi

# --- 1. CUDA tests -------------------------------------------------------------------------------------------
if [[ $PARTS == *" tests "* ]]; then
    run_part tests "$(budget "$T_TESTS" $(( T_BENCH / 2 + T_ACC / 2 )))" "$PY" -m pytest -q -rs -p no:cacheprovider \
        --durations=25 --junitxml="$OUTDIR/test_cuda.xml" tests/test_cuda.py
fi

# --- 2. speed and memory -------------------------------------------------------------------------------------
if [[ $PARTS == *" bench "* ]]; then
    run_part bench_gpu "$(budget "$T_BENCH" $(( T_ACC / 2 )))" \
        bash -c 'set -o pipefail; "$0" benchmarks/bench_gpu.py "${@:2}" | tee -i "$1"' "$PY" "$OUTDIR/bench_gpu.md" \
        "${BENCH_ARGS[@]}" --json "$OUTDIR/bench_gpu.json"
fi

# --- 3. accuracy at stride 4 ---------------------------------------------------------------------------------
accuracy() {  # backbone, budget seconds, strides
    local backbone=$1 limit=$2 strides=$3
    local args=("${ACC_ARGS[@]}" --backbones "$backbone" --strides "$strides" --seeds 3
                --methods skip maxp lip gaussian_pool nlp_headfix2 --data-dir "$DATA" --out "$WORK/acc_$backbone")
    # the grid plans its epochs for its budget less a margin for the process start and the report
    run_part "accuracy_$backbone" "$limit" "$PY" benchmarks/bench_accuracy.py "${args[@]}" --epochs auto \
        --budget-s $(( limit - 25 > 5 ? limit - 25 : 5 ))
    "$PY" benchmarks/bench_accuracy.py "${args[@]}" --epochs auto --report-only | tee -i -a "$OUTDIR/accuracy.md"
    echo >> "$OUTDIR/accuracy.md"
}
if [[ $PARTS == *" accuracy "* ]]; then
    : > "$OUTDIR/accuracy.md"
    # resnet18 takes T_ACC, or all that is left where mobilenet_v2 could not have its minimum after it
    AVAIL=$(( $(remaining) - RESERVE ))
    accuracy resnet18 "$(( AVAIL - T_ACC >= T_MOBILE_MIN ? T_ACC : AVAIL ))" 4
    LEFT=$(( $(remaining) - RESERVE ))
    if (( LEFT >= T_MOBILE_MIN )); then
        accuracy mobilenet_v2 "$(( LEFT < T_MOBILE_MAX ? LEFT : T_MOBILE_MAX ))" 4
    else
        echo "### accuracy_mobilenet_v2: skipped, ${LEFT} s left (needs ${T_MOBILE_MIN})"
        STATUS[accuracy_mobilenet_v2]="skipped (${LEFT} s left, needs ${T_MOBILE_MIN})"
    fi
    cat "$WORK"/acc_*/results.jsonl > "$OUTDIR/accuracy.jsonl" 2> /dev/null
fi

# --- 4. summary ----------------------------------------------------------------------------------------------
{
    echo "# gpu_check summary"
    echo
    echo "- card: $CARD"
    echo "- mode: $([ "$TINY" = 1 ] && echo 'DRY RUN on the CPU, tiny preset: no GPU result' || echo 'GPU run')"
    echo "- total: $(elapsed) s of a ${TOTAL} s budget"
    for part in tests bench_gpu accuracy_resnet18 accuracy_mobilenet_v2; do
        echo "- $part: ${STATUS[$part]:-not run}, ${SECONDS_OF[$part]:-0} s"
    done
    echo
    "$PY" - "$OUTDIR/test_cuda.xml" <<'EOF'
import sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as e:
    sys.exit(print(f'## tests\n\nno JUnit report ({e})\n'))
cases = list(root.iter('testcase'))
failed = [c for c in cases if c.find('failure') is not None or c.find('error') is not None]
skipped = [c for c in cases if c.find('skipped') is not None]
print(f'## tests\n\n{len(cases) - len(failed) - len(skipped)} passed, {len(failed)} failed, {len(skipped)} skipped\n')
for c in failed:
    node = c.find('failure') if c.find('failure') is not None else c.find('error')
    message = (node.get('message') or '').strip().splitlines()
    print(f"- FAILED {c.get('name')}: {message[0][:300] if message else ''}")
for c in skipped:
    print(f"- skipped {c.get('name')}: {(c.find('skipped').get('message') or '')[:200]}")
print()
EOF
    echo "## bench_gpu"
    echo
    sed -n '/^# ratios/,$p' "$OUTDIR/bench_gpu.md" 2> /dev/null
    echo
    echo "## accuracy"
    echo
    grep -E '^(Fashion-MNIST|- |  - |time:)' "$OUTDIR/accuracy.md" 2> /dev/null
} > "$OUTDIR/summary.md" 2>&1
echo
cat "$OUTDIR/summary.md"
echo "### gpu_check: done in $(elapsed) s; outputs in $OUTDIR: $(cd "$OUTDIR" && ls | tr '\n' ' ')"
}

main 2>&1 | tee -i -a "$OUTDIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
