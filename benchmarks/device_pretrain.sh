#!/usr/bin/env bash
# Pretrain the compact offline backbone on one GPU, both objectives, in one go of about 8 minutes:
# the synthetic 'pretrain' world (seed 1, training split only: no street of the benchmark's
# val/test), then DINO + iBOT (self-supervised) and L_MS on places (supervised), each fitted to a
# time budget, each exported as one fp16 weight file with its manifest.
#
#   bash benchmarks/device_pretrain.sh            # OUT=<folder> for the results (default runs/device-pretrain)
#
# Needs the wheels this package imports that a bare PyTorch image lacks, in .whl/ (faiss-cpu,
# pytorch-metric-learning; see benchmarks/device_run.sh for the list and how to fetch them).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device-pretrain}
BUDGET_S=${BUDGET_S:-480}            # the whole script, data generation included
WORK=${WORK:-/tmp/scicevpr-pretrain}
PRESET=${PRESET:-pretrain}  # CPU check: PRESET=tiny BUDGET_S=120 PY=.venv/bin/python WHEELS=0 DINO_BATCH=8 SUP_BATCH=16
PY=${PY:-python3}
WHEELS=${WHEELS:-1}
mkdir -p "$OUT" "$WORK"
log() { echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$OUT/run.log"; }

if [ "$WHEELS" = 1 ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
S="$PY -m scicevpr.cli"
log "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo no GPU) | $(nproc) CPUs | torch $($PY -c 'import torch; print(torch.__version__)')"

log "rendering the pretraining world (preset $PRESET, seed 1, train split)"
timeout 240 $S synth --preset "$PRESET" --seed 1 --splits train --workers "$(nproc)" --out "$WORK/pretrain" --quiet 2>&1 | tail -3 | tee -a "$OUT/run.log"
timeout 60 $S synth --preset small --seed 0 --splits val --workers "$(nproc)" --out "$WORK/small-val" --quiet 2>&1 | tail -3 | tee -a "$OUT/run.log"
log "$(find "$WORK/pretrain" -name '*.jpg' | wc -l) pretraining images, $(find "$WORK/small-val" -name '*.jpg' | wc -l) validation images"

left=$((BUDGET_S - SECONDS - 40))                  # 40 s for start-up, export and copying
dino_min=$(python3 -c "print(round(max(0.5, $left * 0.6 / 60), 2))")
sup_min=$(python3 -c "print(round(max(0.5, $left * 0.4 / 60 - 0.25), 2))")
common="--data $WORK/pretrain/gsv_cities --val-root $WORK/small-val/vg --val-every 200 --steps none --num-workers $(nproc) --log-every 25 --checkpoint-every 100000 --quiet"

log "DINO + iBOT for $dino_min min"
timeout $(python3 -c "print(int($dino_min * 60 + 60))") $S pretrain-backbone --objective dino --batch-size ${DINO_BATCH:-512} --lr 1e-3 \
  --max-minutes "$dino_min" --run-dir "$WORK/run-dino" --export "$WORK/w-dino" $common 2>&1 | tail -25 | tee -a "$OUT/run.log"
log "L_MS on places for $sup_min min"
timeout $(python3 -c "print(int($sup_min * 60 + 60))") $S pretrain-backbone --objective supervised --batch-size ${SUP_BATCH:-1024} --lr 5e-4 \
  --max-minutes "$sup_min" --run-dir "$WORK/run-supervised" --export "$WORK/w-supervised" $common 2>&1 | tail -25 | tee -a "$OUT/run.log"

for kind in dino supervised; do
  cp "$WORK/run-$kind/log.csv" "$OUT/log-$kind.csv" 2>/dev/null
  for f in "$WORK/w-$kind"/*; do [ -f "$f" ] && cp "$f" "$OUT/$kind-$(basename "$f")"; done
done
log "done: $(ls "$OUT" | tr '\n' ' ')"
