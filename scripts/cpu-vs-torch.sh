#!/usr/bin/env bash
# candle (distill-core's train_speed bench) against the PyTorch reference of ../shared/bench,
# back to back, ROUNDS rounds, 2 threads each. Needs a PyTorch venv (see ../shared/bench/README.md):
#   TORCH_PY=/tmp/torchenv/bin/python scripts/cpu-vs-torch.sh
# Prints the PyTorch RESULT lines (median epoch; `others_cores` says whether the window was
# quiet) and candle's table. Compare ratios within one round only.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PY=${TORCH_PY:-/tmp/torchenv/bin/python}
TORCH_KD=${TORCH_KD:-../shared/bench/torch_kd.py}
ROUNDS=${ROUNDS:-2}
cargo bench -p distill-core --bench train_speed --no-run 2>/dev/null
BENCH=$(ls -t target/release/deps/train_speed-* | grep -v '\.d$' | head -1)
for round in $(seq "$ROUNDS"); do
  echo "=== round $round $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
  for mode in "student sgd" "student adam" "teacher sgd" "teacher adam" "distill sgd" "distill adam"; do
    set -- $mode
    echo "--- torch $1 $2"
    "$TORCH_PY" "$TORCH_KD" --mode "$1" --optim "$2" --synthetic --threads 2 --epochs 3 \
      --steps 120 --T 20 --alpha 0.9 2>&1 | grep RESULT
  done
  echo "--- candle"
  RAYON_NUM_THREADS=2 BENCH_SECS=3 BENCH_PATHS=fast \
    BENCH_ARCHS=mlp:784-800-800-10,mlp:784-1200-1200-10 "$BENCH" 2>&1 | grep -v '^RESULT' | grep -v '^$'
done
