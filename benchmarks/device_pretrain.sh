#!/usr/bin/env bash
# Pretrain the compact offline backbone on one GPU, both objectives, in one go of about 9 minutes:
# the synthetic 'pretrain' world (seed 1, training split only: no street of the benchmark's
# val/test), then DINO + iBOT (self-supervised) and L_MS on places (supervised, starting from the
# DINO export, its descriptor SciceVPR's 14 regional GeMs: SUP_POOLING), each fitted to a time
# budget, each exported as one fp16 weight file with its manifest. Then (PROBE=1) every export is
# probed with benchmarks/backbone_probe.py: a linear head trained on its frozen features of 4,000
# other places (the 'pretrain' world with seed 0, rendered on the idle CPUs while the GPU
# pretrains) and scored on the 'small' test split (500 queries), the ceiling that says whether the
# notebooks' recipe can reach R@1 30 on it
# (probe-<kind>.csv; the shipped file gave 15.8, hue histograms without learning 18.6).
# Both objectives run without colour augmentation (COLOUR_AUGMENT=0): on the synthetic streets
# colour layout is what identifies a place, and the shipped file, pretrained with DINO's colour
# jitter and grey, keeps too little of it (scicevpr/weights/README.md). COLOUR_AUGMENT=1: DINO's.
#
#   bash benchmarks/device_pretrain.sh            # OUT=<folder> for the results (default runs/device-pretrain)
#
# Needs the wheels this package imports that a bare PyTorch image lacks, in .whl/ (faiss-cpu,
# pytorch-metric-learning; see benchmarks/device_run.sh for the list and how to fetch them).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device-pretrain}
BUDGET_S=${BUDGET_S:-540}            # the whole script, data generation and probes included
PROBE=${PROBE:-1}                    # probe every export (about 40 s each on 16 CPUs + a GPU)
PROBE_S=${PROBE_S:-100}              # seconds kept for the probes out of BUDGET_S
WORK=${WORK:-/tmp/scicevpr-pretrain}
PRESET=${PRESET:-pretrain}  # CPU check: PRESET=tiny PROBE_PRESET=tiny PROBE_STEPS=100 BUDGET_S=150 PY=.venv/bin/python WHEELS=0 DINO_BATCH=8 SUP_BATCH=16
PROBE_PRESET=${PROBE_PRESET:-pretrain}
PROBE_STEPS=${PROBE_STEPS:-1600}
SUP_INIT=${SUP_INIT:-dino}           # the supervised run fine-tunes the DINO export (none: from scratch, which collapsed at lr 5e-4)
SUP_LR=${SUP_LR:-2e-4}
SUP_POOLING=${SUP_POOLING:-regions}  # the supervised descriptor keeps where features lie (mean: one average over the grid)
COLOUR_AUGMENT=${COLOUR_AUGMENT:-0}
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
timeout 60 $S synth --preset small --seed 0 --splits val test --workers "$(nproc)" --out "$WORK/small" --quiet 2>&1 | tail -3 | tee -a "$OUT/run.log"
log "$(find "$WORK/pretrain" -name '*.jpg' | wc -l) pretraining images, $(find "$WORK/small" -name '*.jpg' | wc -l) validation and test images"
if [ "$PROBE" = 1 ]; then   # the probe's own places, rendered while the GPU trains (the CPUs are idle then)
  (timeout 300 nice $S synth --preset "$PROBE_PRESET" --seed 0 --splits train --workers "$(nproc)" --out "$WORK/probe-world" --quiet > "$WORK/probe-world.log" 2>&1) &
  probe_world=$!
else
  PROBE_S=0
fi

left=$((BUDGET_S - SECONDS - 40 - PROBE_S))        # 40 s for start-up, export and copying
dino_min=$(python3 -c "print(round(max(0.5, $left * 0.6 / 60), 2))")
sup_min=$(python3 -c "print(round(max(0.5, $left * 0.4 / 60 - 0.25), 2))")
common="--data $WORK/pretrain/gsv_cities --val-root $WORK/small/vg --val-every 200 --steps none --num-workers $(nproc) --log-every 25 --checkpoint-every 100000 --quiet"
[ "$COLOUR_AUGMENT" = 1 ] && common="$common --colour-augment" || common="$common --no-colour-augment"

log "DINO + iBOT for $dino_min min (colour augmentation: $COLOUR_AUGMENT)"
timeout $(python3 -c "print(int($dino_min * 60 + 60))") $S pretrain-backbone --objective dino --batch-size ${DINO_BATCH:-512} --lr 1e-3 \
  --max-minutes "$dino_min" --run-dir "$WORK/run-dino" --export "$WORK/w-dino" $common 2>&1 | tail -25 | tee -a "$OUT/run.log"
init=""
[ "$SUP_INIT" = dino ] && init=$(ls "$WORK/w-dino"/*.pth 2>/dev/null | head -1)
start=${init:+the DINO export}
log "L_MS on places for $sup_min min, lr $SUP_LR, pooling $SUP_POOLING, starting from ${start:-a random initialisation}"
timeout $(python3 -c "print(int($sup_min * 60 + 60))") $S pretrain-backbone --objective supervised --batch-size ${SUP_BATCH:-1024} --lr "$SUP_LR" \
  --pooling "$SUP_POOLING" \
  ${init:+--init-weights "$init"} --max-minutes "$sup_min" --run-dir "$WORK/run-supervised" --export "$WORK/w-supervised" $common 2>&1 | tail -25 | tee -a "$OUT/run.log"

for kind in dino supervised; do
  cp "$WORK/run-$kind/log.csv" "$OUT/log-$kind.csv" 2>/dev/null
  for f in "$WORK/w-$kind"/*; do [ -f "$f" ] && cp "$f" "$OUT/$kind-$(basename "$f")"; done
done
if [ "$PROBE" = 1 ]; then
  wait "$probe_world"; tail -2 "$WORK/probe-world.log" | tee -a "$OUT/run.log"
  for kind in dino supervised; do
    w=$(ls "$WORK/w-$kind"/*.pth 2>/dev/null | head -1)
    [ -n "$w" ] || { log "no $kind export to probe"; continue; }
    log "probing the $kind export"
    timeout $((PROBE_S / 2 + 30)) $PY benchmarks/backbone_probe.py --train-root "$WORK/probe-world/gsv_cities" --test-root "$WORK/small/vg" \
      --weights "$w" --steps "$PROBE_STEPS" --threads "$(nproc)" --workers "$(nproc)" --csv "$OUT/probe-$kind.csv" 2>&1 | tail -12 | tee -a "$OUT/run.log"
    status=${PIPESTATUS[0]}
    [ "$status" = 0 ] || log "the probe of the $kind export stopped early (status $status; 124 = its $((PROBE_S / 2 + 30)) s ran out)"
  done
fi
log "done: $(ls "$OUT" | tr '\n' ' ')"
