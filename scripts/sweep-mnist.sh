#!/usr/bin/env bash
# Fill once, sweep many (issue 20): one teacher pass over MNIST records the conv teacher's
# tempered logits in the soft-target cache (`distill cache fill`), then `distill sweep` trains
# the mlp:784-800-800-10 student over T x alpha (and a hard-labels baseline) from the cache
# alone. The teacher server stays up during the sweep and its own request counter (Prometheus)
# is read before and after, so "no teacher was asked" is measured at the teacher.
#
# Usage: scripts/sweep-mnist.sh [DIR]
#   DIR defaults to ../shared/data/mnist next to the repository root.
# Environment (all optional):
#   TEACHER=FILE        teacher checkpoint (default: the conv teacher of mnist-baselines.sh,
#                       trained by it first when missing)
#   RUN=DIR             the fill's run directory; the sweep goes to RUN-sweep (default: runs/sweep-mnist)
#   TEMPERATURES=2,4,20 ALPHAS=0.5,0.7,0.9 EPOCHS=20 LR=0.05 PARALLEL=1 THREADS=N
#   DISTILL_BIN=PATH    use this distill binary instead of building target/release/distill
# Rerunning resumes: a complete cache asks the teacher nothing, finished configurations are
# read back.
set -euo pipefail

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
DIR=$(cd "${1:-$ROOT/../shared/data/mnist}" && pwd)
RUN=${RUN:-$ROOT/runs/sweep-mnist}
TEMPERATURES=${TEMPERATURES:-2,4,20}
ALPHAS=${ALPHAS:-0.5,0.7,0.9}
EPOCHS=${EPOCHS:-20}
LR=${LR:-0.05}
PARALLEL=${PARALLEL:-1}
THREADS=${THREADS:-$(nproc)}

# shellcheck source=lib/roles.sh
source "$ROOT/scripts/lib/roles.sh"
require_mnist "$DIR"
release_bin
if [[ -z ${TEACHER:-} ]]; then
    TEACHER=$ROOT/runs/mnist-baselines/conv-teacher.safetensors
    [[ -e $TEACHER ]] || ONLY=conv DISTILL_BIN=$BIN "$ROOT/scripts/mnist-baselines.sh" "$DIR"
fi
[[ -e $TEACHER ]] || { echo "error: no teacher at $TEACHER" >&2; exit 1; }
mkdir -p "$RUN"
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824}
export RAYON_NUM_THREADS=$THREADS
trap stop_roles EXIT

metrics_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
start "$RUN/teacher.log" teacher-server --model "$TEACHER" --listen 127.0.0.1:0 --member teacher \
    --metrics-listen "127.0.0.1:$metrics_port"
teacher_addr=$ADDR
# The teacher's own count of the inference requests it answered or refused.
requests() {
    python3 - "$metrics_port" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
print(int(sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
              if l.startswith("distill_teacher_requests_total"))))
PY
}

cat >"$RUN/run.toml" <<TOML
data = "mnist:$DIR"
run_dir = "$RUN"
epochs = $EPOCHS
batch_size = 128
temperature = 20.0
alpha = 0.9
prefetch = 16
[student]
arch = "mlp:784-800-800-10"
[optim]
kind = "sgd"
lr = $LR
momentum = 0.9
schedule = { kind = "cosine", final_frac = 0.0 }
[cache]
dir = "$RUN/cache"
[[members]]
name = "teacher"
endpoints = ["http://$teacher_addr"]
TOML

echo "== teacher $TEACHER on $teacher_addr; filling the cache"
t0=$SECONDS
"$BIN" cache fill --config "$RUN/run.toml"
fill_secs=$((SECONDS - t0))
before=$(requests)

echo "== sweeping T in {$TEMPERATURES} x alpha in {$ALPHAS}, $EPOCHS epochs each"
t0=$SECONDS
"$BIN" sweep --config "$RUN/run.toml" --temperatures "$TEMPERATURES" --alphas "$ALPHAS" \
    --parallel "$PARALLEL" --out "$RUN-sweep"
sweep_secs=$((SECONDS - t0))
after=$(requests)

echo
cat "$RUN-sweep/table.md"
echo
echo "fill: ${fill_secs}s ($before teacher requests so far); sweep: ${sweep_secs}s;"
echo "teacher requests during the sweep, counted by the teacher: $((after - before))"
