#!/usr/bin/env bash
# MNIST distillation of Hinton, Vinyals & Dean 2015 (issue 4): distils the mlp:784-800-800-10
# student at T = 20 from a teacher trained by scripts/mnist-baselines.sh, through real servers
# (a teacher-server process, a coordinator process, a student-worker process, on loopback),
# then prints teacher, baseline and distilled test errors out of 10,000 and the time taken.
#
# Usage: scripts/mnist-distill.sh [DIR]
#   DIR defaults to ../shared/data/mnist next to the repository root.
# Environment (all optional):
#   TEACHER=FILE     teacher checkpoint (default: the MLP teacher of mnist-baselines.sh if it
#                    exists, else its conv teacher)
#   BASELINE=FILE    baseline student checkpoint (default: mnist-baselines.sh's)
#   RUN=DIR          run directory (default: runs/mnist-distill)
#   EPOCHS=20 T=20 ALPHA=0.9 LR=0.05 SEED=0 THREADS=N
#   DISTILL_BIN=PATH use this distill binary instead of building target/release/distill
set -euo pipefail

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
DIR=$(cd "${1:-$ROOT/../shared/data/mnist}" && pwd)
BASE=${BASE:-$ROOT/runs/mnist-baselines}
if [[ -z ${TEACHER:-} ]]; then
    TEACHER=$BASE/mlp-teacher.safetensors
    [[ -e $TEACHER ]] || TEACHER=$BASE/conv-teacher.safetensors
fi
BASELINE=${BASELINE:-$BASE/student-baseline.safetensors}
RUN=${RUN:-$ROOT/runs/mnist-distill}
EPOCHS=${EPOCHS:-20}
T=${T:-20}
ALPHA=${ALPHA:-0.9}
LR=${LR:-0.05}
SEED=${SEED:-0}
THREADS=${THREADS:-$(nproc)}

[[ -e $TEACHER ]] || { echo "error: no teacher at $TEACHER; run scripts/mnist-baselines.sh first or set TEACHER" >&2; exit 1; }
# shellcheck source=lib/roles.sh
source "$ROOT/scripts/lib/roles.sh"
release_bin
mkdir -p "$RUN"
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824}
export RAYON_NUM_THREADS=$THREADS

trap stop_roles EXIT

t0=$SECONDS
start "$RUN/teacher.log" teacher-server --model "$TEACHER" --listen 127.0.0.1:0 --member teacher
teacher_addr=$ADDR
echo "== teacher $TEACHER on $teacher_addr"
cat >"$RUN/run.toml" <<TOML
data = "mnist:$DIR"
run_dir = "$RUN"
epochs = $EPOCHS
batch_size = 128
seed = $SEED
temperature = $T
alpha = $ALPHA
prefetch = 16
[student]
arch = "mlp:784-800-800-10"
[optim]
kind = "sgd"
lr = $LR
momentum = 0.9
schedule = { kind = "cosine", final_frac = 0.0 }
[[members]]
name = "teacher"
endpoints = ["http://$teacher_addr"]
TOML
start "$RUN/coordinator.log" coordinator --config "$RUN/run.toml" --listen 127.0.0.1:0
coord_addr=$ADDR
echo "== coordinator on $coord_addr; training the student (log: $RUN/worker.log)"
"$BIN" student-worker --coordinator "http://$coord_addr" --work-dir "$RUN/worker" 2>"$RUN/worker.log"
wait "${pids[1]}" || true
secs=$((SECONDS - t0))

errors() { "$BIN" eval --model "$1" --data "mnist:$DIR" --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["errors"])'; }
echo
echo "MNIST test errors out of 10,000 (T = $T, alpha = $ALPHA, $EPOCHS epochs):"
echo "  teacher            $(errors "$TEACHER")   ($TEACHER)"
if [[ -e $BASELINE ]]; then
    echo "  baseline student   $(errors "$BASELINE")"
fi
echo "  distilled student  $(errors "$RUN/student.safetensors")"
python3 - "$RUN/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"  {r['batches_trained']}/{r['batches_expected']} batches, {r['samples_per_sec']:.0f} samples/s, "
      f"student waited {100 * r['student_wait_fraction']:.1f}% of its time")
PY
echo "  wall time ${secs}s; run directory $RUN"
