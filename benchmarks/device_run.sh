#!/usr/bin/env bash
# One end-to-end run of scicevpr on a GPU machine, started from the repository root:
#
#   env        nvidia-smi, Python and torch versions
#   install    the wheels in .whl/ (the packages such a machine lacks, listed below) into
#              /tmp/site, put before the machine's own site-packages (its torch, torchvision
#              and numpy are used: never put those in .whl/)
#   data       a synthetic benchmark laid out where full mode expects GSV-Cities and the
#              VG-benchmark splits (benchmarks/full_mode_data.py)
#   gpu        benchmarks/gpu.py on SciceVPR-B at 224 px -> $OUT/gpu_results.md, alone on the
#              machine (with TORCH_LOGS=graph_breaks,recompiles in gpu.log)
#   tests      every CUDA test: pytest -m cuda tests/ (beside the notebooks: it measures nothing)
#   notebooks  the five notebooks top to bottom with SCICEVPR_MODE=full, random DINOv2 weights
#              (SCICEVPR_WEIGHTS=random: every figure and table says so), the synthetic data
#              above and training capped to SCICEVPR_EPOCHS epochs of SCICEVPR_MAX_ITERS
#              iterations of 72 x 4 images (benchmarks/run_notebooks.py), in a scratch copy of
#              the repository (the checkout's figures/ and runs/ are not touched)
#
# Every step has a time limit (timeout) drawn from one budget, and a failed step does not stop
# the next. Results in $OUT (default runs/device-run): summary.md (printed at the end),
# gpu_results.md, gpu.log, tests.log, notebooks.tar.gz (executed notebooks, timings.md, figures,
# training logs) and logs.tar.gz (every step's log).
#
#   OUT=/some/folder bash benchmarks/device_run.sh       # on the GPU machine (~8 minutes)
#   bash benchmarks/device_run.sh --cpu-smoke            # on a CPU: everything but CUDA, tiny sizes
#
# Variables: OUT; PYTHON (default python3); SCICEVPR_RUN_BUDGET_S (seconds for all steps;
# default 500, cpu-smoke 3600); SCICEVPR_RUN_SKIP (steps to leave out, e.g. "gpu tests");
# SCICEVPR_RUN_NOTEBOOKS (notebook name prefixes, default "01 02 03 04 05");
# SCICEVPR_RUN_PARALLEL=0 (tests before the notebooks instead of beside them, for notebook
# timings on an otherwise idle machine); SCICEVPR_RUN_WORK (scratch folder, emptied first;
# default /tmp/scicevpr-device-run).
#
# Wheels in .whl/, for CPython 3.12 on x86-64 Linux, fetched with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl NAME==VERSION
# (the project's missing dependencies plus what executing notebooks needs; the optional debugpy,
# jedi and the widgets' browser assets are left out; about 23 MB):
#   faiss-cpu==1.15.1 pytorch-metric-learning==2.9.0
#   nbclient==0.11.0 nbformat==5.11.1 fastjsonschema==2.22.3 jsonschema==4.26.0
#   jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
#   jupyter_client==8.10.0 jupyter_core==5.9.1 platformdirs==4.14.8 traitlets==5.16.1
#   pyzmq==27.3.0 tornado==6.6.1 ipykernel==7.4.0 comm==0.2.3 matplotlib-inline==0.2.2
#   nest-asyncio2==1.7.4 ipython==9.18.1 ipython_pygments_lexers==1.1.1 prompt_toolkit==3.0.53
#   wcwidth==0.9.4 pexpect==4.9.0 ptyprocess==0.7.0 stack-data==0.6.3 executing==2.3.0
#   asttokens==3.0.2 pure_eval==0.2.4 ipywidgets==8.1.9
# (the machine already has attrs, packaging, psutil, pygments, python-dateutil, typing-extensions,
# seaborn, scikit-learn, tqdm, pandas, matplotlib, pillow, pytest).

set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
SMOKE=0
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/runs/device-run}
WORK=${SCICEVPR_RUN_WORK:-/tmp/scicevpr-device-run}
SKIP=" ${SCICEVPR_RUN_SKIP:-} "
NOTEBOOKS=${SCICEVPR_RUN_NOTEBOOKS:-01 02 03 04 05}
PARALLEL=${SCICEVPR_RUN_PARALLEL:-1}
if (( SMOKE )); then BUDGET=${SCICEVPR_RUN_BUDGET_S:-3600}; else BUDGET=${SCICEVPR_RUN_BUDGET_S:-500}; fi
RESERVE=15  # seconds kept for the bundle and the summary
T0=$SECONDS

mkdir -p "$OUT"
rm -rf "$WORK"
LOGS=$WORK/logs
DATA=$WORK/data
mkdir -p "$LOGS" "$DATA"
: > "$WORK/steps.tsv"
export PYTHONUNBUFFERED=1 JUPYTER_PLATFORM_DIRS=1
BASE_PYTHONPATH=${PYTHONPATH:-}
SITE=""  # /tmp/site once the wheels are installed
pythonpath() {  # pythonpath REPO: the wheels, then REPO, then whatever was set before
    echo "${SITE:+$SITE:}$1${BASE_PYTHONPATH:+:$BASE_PYTHONPATH}"
}
export PYTHONPATH=$(pythonpath "$ROOT")
if (( SMOKE )); then
    export OMP_WAIT_POLICY=PASSIVE
    DEVICE_ARGS=(--device cpu --quick)
    DATA_SIZE=smoke
    EPOCHS=1 MAX_ITERS=1
else
    DEVICE_ARGS=()
    DATA_SIZE=small
    EPOCHS=2 MAX_ITERS=2
fi

limit_for() {  # the seconds a step may take: its cap, or what is left of the budget
    local left=$(( BUDGET - (SECONDS - T0) - RESERVE ))
    (( $1 < left )) && echo "$1" || echo "$left"
}

run_step() {  # run_step NAME LIMIT_S CMD...: run CMD under timeout, log to $LOGS/NAME.log, record the outcome
    local name=$1 limit=$2; shift 2
    if [[ "$SKIP" == *" $name "* ]]; then
        printf '%s\t%s\t%s\n' "$name" "skipped (SCICEVPR_RUN_SKIP)" 0 >> "$WORK/steps.tsv"; return 0
    fi
    if (( limit < 15 )); then
        printf '%s\t%s\t%s\n' "$name" "not run: time budget spent" 0 >> "$WORK/steps.tsv"; return 1
    fi
    echo "== $name (limit ${limit} s, $(( SECONDS - T0 )) s into the run)"
    local start=$SECONDS
    timeout -k 15 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$? status=ok
    if (( rc == 124 || rc == 137 )); then status="timed out after ${limit} s"
    elif (( rc != 0 )); then status="failed (exit $rc)"; fi
    printf '%s\t%s\t%s\n' "$name" "$status" "$(( SECONDS - start ))" >> "$WORK/steps.tsv"
    tail -n 12 "$LOGS/$name.log"
    echo "-- $name: $status in $(( SECONDS - start )) s"
    return $rc
}

# ---- env ------------------------------------------------------------------------------------
env_info() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 || echo "no nvidia-smi"
    echo "python: $(command -v "$PY")"
    "$PY" -c "import sys, torch; print('Python', sys.version.split()[0], '| torch', torch.__version__, 'from', torch.__file__, '| CUDA', torch.version.cuda, '| GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    echo "CPU cores: $(nproc)"
    ls -d /tmp/torchinductor_* 2>/dev/null | sed 's/^/inductor cache present (warm compiles): /' || true
}
export PY
export -f env_info
run_step env "$(limit_for 60)" bash -c env_info

# ---- install --------------------------------------------------------------------------------
install_wheels() {
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
    PYTHONPATH=/tmp/site:$PYTHONPATH "$PY" - <<'EOF'
import importlib, sys
mods = ["faiss", "pytorch_metric_learning", "nbclient", "nbformat", "jupyter_client", "ipykernel", "IPython",
        "ipywidgets", "zmq", "tornado", "jsonschema", "torch", "torchvision", "numpy", "scicevpr"]
for m in mods:
    mod = importlib.import_module(m)
    print(f"{m:24s} {getattr(mod, '__version__', '?'):14s} {mod.__file__}")
import torch, numpy
assert not torch.__file__.startswith("/tmp/site") and not numpy.__file__.startswith("/tmp/site"), "torch/numpy must be the machine's"
EOF
}
if compgen -G ".whl/*.whl" > /dev/null; then
    export -f install_wheels
    run_step install "$(limit_for 120)" bash -c install_wheels && SITE=/tmp/site && export PYTHONPATH=$(pythonpath "$ROOT")
else
    printf '%s\t%s\t%s\n' install "skipped (no .whl/: this Python's own packages are used)" 0 >> "$WORK/steps.tsv"
fi

# ---- data -----------------------------------------------------------------------------------
run_step data "$(limit_for 150)" "$PY" benchmarks/full_mode_data.py --root "$DATA" --size "$DATA_SIZE"

# ---- gpu.py (first, alone on the machine: its timings are the ones to report) ------------------
rm -f "$OUT/gpu_results.md"
run_step gpu "$(limit_for 270)" env TORCH_LOGS="${TORCH_LOGS:-graph_breaks,recompiles}" \
    "$PY" benchmarks/gpu.py "${DEVICE_ARGS[@]}" --data "$DATA/generated" --out "$OUT/gpu_results.md"
cp "$LOGS/gpu.log" "$OUT/gpu.log" 2>/dev/null

# ---- tests (beside the notebooks unless SCICEVPR_RUN_PARALLEL=0: correctness only, no timings) -
run_step tests "$(limit_for 180)" "$PY" -m pytest -m cuda tests/ -v -rs -p no:cacheprovider > "$WORK/tests.stdout" 2>&1 &
TESTS_PID=$!
if [[ "$PARALLEL" == 0 ]]; then wait "$TESTS_PID"; fi

# ---- notebooks ------------------------------------------------------------------------------
mkdir -p "$WORK/repo"
cp -r pyproject.toml scicevpr notebooks "$WORK/repo/"
mkdir -p "$WORK/repo/figures" && cp figures/claims.csv "$WORK/repo/figures/"  # the claims table the notebooks' last cells read
rm -rf "$WORK/repo/scicevpr/__pycache__"
NB_PATHS=()
for n in $NOTEBOOKS; do NB_PATHS+=("$WORK"/repo/notebooks/"$n"_*.ipynb); done
NB_LIMIT=$(limit_for $(( SMOKE ? BUDGET : 900 )))
run_step notebooks "$NB_LIMIT" env SCICEVPR_MODE=full SCICEVPR_WEIGHTS=random SCICEVPR_PRESET=SciceVPR-B \
    SCICEVPR_DATA="$DATA" SCICEVPR_DATASET=synthetic SCICEVPR_VAL_DATASET=synthetic \
    SCICEVPR_EPOCHS=$EPOCHS SCICEVPR_MAX_ITERS=$MAX_ITERS PYTHONPATH="$(pythonpath "$WORK/repo")" \
    "$PY" benchmarks/run_notebooks.py --out "$WORK/notebooks" \
    --budget $(( NB_LIMIT > 30 ? NB_LIMIT - 10 : NB_LIMIT )) --cell-timeout 600 "${NB_PATHS[@]}"
wait "$TESTS_PID"
cat "$WORK/tests.stdout"
cp "$LOGS/tests.log" "$OUT/tests.log" 2>/dev/null

# ---- bundle and summary ---------------------------------------------------------------------
cp "$DATA/full_mode_data.json" "$LOGS/" 2>/dev/null
(cd "$WORK" && tar czf "$OUT/notebooks.tar.gz" --exclude='*.pt' notebooks repo/figures repo/runs 2>/dev/null)
(cd "$WORK" && tar czf "$OUT/logs.tar.gz" logs steps.tsv)
{
    echo "# scicevpr GPU run $(date -u +%Y-%m-%d), $(( SECONDS - T0 )) s of a ${BUDGET} s budget$( (( SMOKE )) && echo ' (CPU smoke: --device cpu --quick, tiny sizes)')"
    echo
    sed 's/^/    /' "$LOGS/env.log" 2>/dev/null
    echo
    echo "| step | outcome | seconds |"
    echo "|---|---|---:|"
    awk -F'\t' '{printf "| %s | %s | %s |\n", $1, $2, $3}' "$WORK/steps.tsv"
    echo
    echo "## CUDA tests"
    echo
    grep -E "(PASSED|FAILED|SKIPPED|ERROR)|^=+ .* =+$" "$LOGS/tests.log" 2>/dev/null | sed 's/^/    /' | tail -n 20
    echo
    echo "## benchmarks/gpu.py"
    cat "$OUT/gpu_results.md" 2>/dev/null || echo "(no table: see gpu.log)"
    echo
    echo "## notebooks, SCICEVPR_MODE=full, random weights, synthetic data ($DATA_SIZE), training capped"
    [[ "$PARALLEL" != 0 ]] && echo && echo "(the CUDA tests ran beside the first notebooks: their wall times include that)"
    echo
    cat "$WORK/notebooks/timings.md" 2>/dev/null || echo "(no timings: see logs.tar.gz, logs/notebooks.log)"
    echo
    echo "files in \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
} > "$OUT/summary.md"
cat "$OUT/summary.md"
