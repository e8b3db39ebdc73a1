#!/usr/bin/env bash
# MNIST baselines of Hinton, Vinyals & Dean 2015 (issue 3): trains, on the four MNIST IDX files,
#   1. the conv teacher        conv:32-64-256-10      (a few epochs; the quickest strong teacher)
#   2. the baseline student    mlp:784-800-800-10     (no regularisation; paper: 146 errors)
#   3. the MLP teacher         mlp:784-1200-1200-10   (dropout 0.5, input dropout 0.2, jitter 2;
#                                                      paper: 67 errors)
# then prints each one's test errors out of 10,000 and its training throughput.
#
# Usage: scripts/mnist-baselines.sh [DIR]
#   DIR defaults to ../shared/data/mnist next to the repository root.
# Environment (all optional):
#   RUNS=DIR            where checkpoints go (default: runs/mnist-baselines in the repo)
#   ONLY="student conv teacher"   which models to train, in this order
#   THREADS=N           math threads per run (default: all cores)
#   CONV_EPOCHS=4 STUDENT_EPOCHS=20 TEACHER_EPOCHS=60   epochs of each run
#   SEED=0
#   DISTILL_BIN=PATH    use this distill binary instead of building target/release/distill
# Each run writes RUNS/NAME.safetensors, RUNS/NAME.safetensors.json (config, per-epoch curve,
# throughput, final test score) and RUNS/NAME.log. A run whose checkpoint exists is skipped
# (delete it to retrain); an interrupted run resumes from RUNS/NAME.state.
set -euo pipefail

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
DIR=${1:-$ROOT/../shared/data/mnist}
RUNS=${RUNS:-$ROOT/runs/mnist-baselines}
ONLY=${ONLY:-student conv teacher}
THREADS=${THREADS:-$(nproc)}
CONV_EPOCHS=${CONV_EPOCHS:-4}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-20}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-60}
SEED=${SEED:-0}

# shellcheck source=lib/roles.sh
source "$ROOT/scripts/lib/roles.sh"
require_mnist "$DIR"

release_bin
mkdir -p "$RUNS"
# The binary uses mimalloc; these tunables only matter for anything still on glibc malloc
# (see shared/notes/rust-stack.md §7).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824}

train() { # NAME ARGS...
    local name=$1
    shift
    local out=$RUNS/$name.safetensors
    if [[ -e $out ]]; then
        echo "== $name: $out exists, skipping (delete it to retrain)"
        return
    fi
    echo "== $name: $*"
    local t0=$SECONDS
    "$BIN" train --data "mnist:$DIR" --seed "$SEED" --threads "$THREADS" \
        --state "$RUNS/$name.state" --out "$out" "$@" 2>&1 | tee "$RUNS/$name.log"
    rm -f "$RUNS/$name.state"
    echo "== $name: done in $((SECONDS - t0)) s"
}

for what in $ONLY; do
    case $what in
    conv)
        # AdamW with a cosine decay to 0 and dropout on the hidden layer: a strong teacher in
        # a few epochs.
        train conv-teacher --arch conv:32-64-256-10 --dropout 0.3 \
            --optimizer adamw --lr 0.001 --weight-decay 0.01 --schedule cosine \
            --epochs "$CONV_EPOCHS" --batch 128
        ;;
    student)
        # No regularisation at all (the paper's baseline): plain SGD with momentum, cosine decay.
        train student-baseline --arch mlp:784-800-800-10 \
            --optimizer sgd --lr 0.05 --momentum 0.9 --schedule cosine \
            --epochs "$STUDENT_EPOCHS" --batch 128
        ;;
    teacher)
        # Dropout + jitter as in the paper; SGD with momentum, 1 epoch warmup, cosine decay.
        train mlp-teacher --arch mlp:784-1200-1200-10 --dropout 0.5 --input-dropout 0.2 --jitter 2 \
            --optimizer sgd --lr 0.1 --momentum 0.9 --warmup 1 --schedule cosine --clip 10 \
            --epochs "$TEACHER_EPOCHS" --batch 128
        ;;
    *)
        echo "error: unknown model \`$what\` in ONLY (expected conv, student, teacher)" >&2
        exit 1
        ;;
    esac
done

echo
printf '%-18s %-22s %12s %14s %12s\n' model arch "test errors" "samples/s" "train time"
for name in conv-teacher student-baseline mlp-teacher; do
    json=$RUNS/$name.safetensors.json
    [[ -e $json ]] || continue
    arch=$(sed -n 's/^  "arch": "\(.*\)",$/\1/p' "$json")
    errors=$(sed -n 's/^  "test_errors": \([0-9]*\),$/\1/p' "$json")
    n=$(sed -n 's/^  "test_n": \([0-9]*\),$/\1/p' "$json")
    sps=$(sed -n 's/^  "samples_per_s": \([0-9.]*\),$/\1/p' "$json")
    secs=$(sed -n 's/^  "train_seconds": \([0-9.]*\),$/\1/p' "$json")
    printf '%-18s %-22s %12s %14.0f %11.0fs\n' "$name" "$arch" "$errors/$n" "$sps" "$secs"
done
