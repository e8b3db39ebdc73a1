#!/usr/bin/env bash
# Interop check of our Open Inference Protocol (OIP, KServe v2) support against third-party
# software installed from PyPI into a local virtual environment:
#  (a) a distillation whose ensemble has one of our teacher servers and one Seldon MLServer
#      (sklearn runtime, a logistic regression trained here on MNIST) as an OIP member, through
#      real processes on loopback; checks the report (student test errors, the OIP member's
#      requests and failures, its test errors against sklearn's own) and that misconfigured OIP
#      members (`output_name`, `model_name`, `input_datatype`) are refused at start, naming the
#      field;
#  (b) our teacher server called by NVIDIA's tritonclient[grpc]: readiness, ModelMetadata,
#      FP32 and UINT8 requests at T = 2 compared with `distill eval --logits-out`, and refusals
#      (NOT_FOUND, INVALID_ARGUMENT) after which the server still answers.
# Prints PASS/FAIL per check and exits non-zero when any failed. About a minute on 2 cores, plus
# about a minute to create the virtual environment the first time (and the cargo build).
#
# Usage: scripts/oip-interop.sh [DIR]
#   DIR: MNIST as gzipped IDX files; defaults to ../shared/data/mnist next to the repository root.
# Environment (all optional):
#   RUN=DIR          run directory (default: runs/oip-interop; its runs are started afresh)
#   VENV=DIR         the virtual environment (default: target/oip-venv; created when absent)
#   PYTHON=EXE       the Python that creates the venv (default: python3.11)
#   EPOCHS=2 T=2 ALPHA=0.9 LR=0.05 SEED=0 THREADS=N
#   SK_ROWS=12000    training rows of the logistic regression (SK_ITERS=100 lbfgs iterations)
#   TRITON_ROWS=1024 test rows sent by tritonclient
#   DISTILL_BIN=PATH use this distill binary instead of building target/debug/distill
set -euo pipefail

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
DIR=$(cd "${1:-$ROOT/../shared/data/mnist}" && pwd)
RUN=${RUN:-$ROOT/runs/oip-interop}
VENV=${VENV:-$ROOT/target/oip-venv}
PYTHON=${PYTHON:-python3.11}
EPOCHS=${EPOCHS:-2}
T=${T:-2}
ALPHA=${ALPHA:-0.9}
LR=${LR:-0.05}
SEED=${SEED:-0}
THREADS=${THREADS:-$(nproc)}
HELPER=$ROOT/scripts/oip-interop.py
PACKAGES=(mlserver==1.7.1 mlserver-sklearn==1.7.1 scikit-learn numpy "tritonclient[grpc]==2.73.0")

for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
    [[ -e $DIR/$f ]] || { echo "error: no $DIR/$f (MNIST as gzipped IDX files)" >&2; exit 1; }
done
t0=$SECONDS

# --- the virtual environment (reused when it has every package) ----------------------------
if ! "$VENV/bin/python" -c 'import mlserver, mlserver_sklearn, sklearn, numpy, joblib, tritonclient.grpc' 2>/dev/null; then
    echo "== creating $VENV and installing ${PACKAGES[*]}"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}"
fi
PY=$VENV/bin/python
versions=$("$PY" -m pip list --disable-pip-version-check 2>/dev/null \
    | awk 'tolower($1) ~ /^(mlserver|mlserver-sklearn|scikit-learn|numpy|tritonclient|grpcio|protobuf)$/ {printf "%s %s, ", $1, $2}')
echo "== venv $VENV: ${versions%, }"

if [[ -n ${DISTILL_BIN:-} ]]; then
    BIN=$DISTILL_BIN
else
    (cd "$ROOT" && cargo build --bin distill)
    BIN=$ROOT/target/debug/distill
fi
mkdir -p "$RUN"
# A fresh run each time (the coordinator would resume a run directory holding state.redb).
rm -rf "$RUN"/{distill,worker,mlserver,bad-output,bad-model,bad-datatype}
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824}
export RAYON_NUM_THREADS=$THREADS
export OIP_DATA_DIR=$DIR

results=() # "PASS|FAIL<TAB>name<TAB>detail", in order
record() { # OK NAME DETAIL
    local s=FAIL
    [[ $1 == 0 ]] && s=PASS
    results+=("$s"$'\t'"$2"$'\t'"$3")
    echo "  $s  $2: $3"
}
# The checks a helper wrote to its JSON file, into `results`.
collect() { # FILE
    [[ -e $1 ]] || return 0
    local line
    while IFS= read -r line; do results+=("$line"); done < <("$PY" -c '
import json, sys
for name, ok, detail in json.load(open(sys.argv[1]))["checks"]:
    print(("PASS" if ok else "FAIL") + "\t" + name + "\t" + detail.replace("\n", " "))' "$1")
}

# shellcheck source=lib/roles.sh
source "$ROOT/scripts/lib/roles.sh"
cleanup() {
    local p i
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    # MLServer takes a moment to shut down: wait for it (then SIGKILL) so nothing outlives us.
    for p in "${pids[@]}"; do
        for ((i = 0; i < 50; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$p" 2>/dev/null || true
    done
}
trap cleanup EXIT

# --- the two teachers -----------------------------------------------------------------------
echo "== training the native teacher (mlp:784-256-10, 1 epoch) and the sklearn teacher"
"$BIN" train --data "mnist:$DIR" --arch mlp:784-256-10 --epochs 1 --eval-final-only --seed "$SEED" \
    --out "$RUN/native.safetensors" 2>"$RUN/train.log"
"$BIN" eval --model "$RUN/native.safetensors" --data "mnist:$DIR" --json --logits-out "$RUN/z.npy" \
    >"$RUN/native-eval.json" 2>"$RUN/eval.log"
read -r native_errors native_digest < <("$PY" -c '
import json, sys; e = json.load(open(sys.argv[1])); print(e["errors"], e["digest"])' "$RUN/native-eval.json")
echo "  native teacher: $native_errors/10000 test errors, weights digest ${native_digest:0:16}…"
"$PY" "$HELPER" sklearn-model "$DIR" "$RUN/mlserver" | tee "$RUN/sklearn-model.out"
grpc_port=$(sed -n 's/^GRPC_PORT=//p' "$RUN/sklearn-model.out")
sk_addr=127.0.0.1:$grpc_port

start "$RUN/teacher.log" teacher-server --model "$RUN/native.safetensors" --listen 127.0.0.1:0 --member native || exit 1
native_addr=$ADDR
echo "== native teacher server on $native_addr"

echo "== starting MLServer (gRPC $sk_addr; log $RUN/mlserver.log)"
(cd "$RUN/mlserver" && exec "$VENV/bin/mlserver" start .) >"$RUN/mlserver.log" 2>&1 &
mlserver_pid=$!
pids+=("$mlserver_pid")
ms0=$SECONDS
if "$PY" "$HELPER" wait-ready "$sk_addr" sk-teacher 90 "$mlserver_pid"; then
    record 0 "MLServer ServerReady and ModelReady(sk-teacher)" "true after $((SECONDS - ms0))s"
else
    record 1 "MLServer ServerReady and ModelReady(sk-teacher)" "not ready; see $RUN/mlserver.log"
    tail -20 "$RUN/mlserver.log" >&2
fi
"$PY" "$HELPER" probe-mlserver "$sk_addr" sk-teacher "$RUN/mlserver" "$RUN/probe-mlserver.json" || true
collect "$RUN/probe-mlserver.json"

# --- (a) the distillation -------------------------------------------------------------------
member_native() {
    cat <<TOML
[[members]]
name = "native"
endpoints = ["http://$native_addr"]
TOML
}
member_sklearn() { # KEY=VALUE overrides, e.g. output_name='"nonexistent"'
    local -A k=(
        [model_name]='"sk-teacher"' [input_name]='"input"' [input_datatype]='"FP32"'
        [output_name]='"predict_proba"' [output]='"probabilities"' [identity]='"sklearn-logreg-v1"'
    )
    local kv
    for kv in "$@"; do k[${kv%%=*}]=${kv#*=}; done
    echo '[[members]]'
    echo 'name = "sklearn"'
    echo 'protocol = "oip"'
    echo "endpoints = [\"http://$sk_addr\"]"
    for key in model_name input_name input_datatype output_name output identity; do
        echo "$key = ${k[$key]}"
    done
}
run_config() { # RUN_DIR MEMBER-OVERRIDES...
    cat <<TOML
data = "mnist:$DIR"
run_dir = "$1"
epochs = $EPOCHS
batch_size = 128
seed = $SEED
temperature = $T
alpha = $ALPHA
prefetch = 16
[student]
arch = "mlp:784-100-10"
[optim]
kind = "sgd"
lr = $LR
momentum = 0.9
schedule = { kind = "cosine", final_frac = 0.0 }
TOML
    member_native
    shift
    member_sklearn "$@"
}

echo "== misconfigured OIP members must be refused at start"
refusal() { # NAME FIELD OVERRIDE
    local d=$RUN/bad-$1 rc=0
    mkdir -p "$d"
    run_config "$d" "$3" >"$d.toml"
    timeout 60 "$BIN" coordinator --config "$d.toml" --listen 127.0.0.1:0 >"$d.out" 2>"$d.log" || rc=$?
    local msg
    msg=$(grep -o 'member `sklearn`.*' "$d.log" | head -1 || true)
    [[ -n $msg ]] || msg=$(tail -1 "$d.log")
    if ((rc != 0 && rc != 124)) && grep -q 'sklearn' "$d.log" && grep -qF "\`$2\`" "$d.log" && ! grep -q '^listening on' "$d.out"; then
        record 0 "coordinator refuses $3" "exit $rc: ${msg:0:300}"
    else
        record 1 "coordinator refuses $3" "exit $rc (want non-zero, naming \`$2\` and the member): ${msg:0:300}"
    fi
}
if [[ $("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("lists_outputs", False))' "$RUN/probe-mlserver.json" 2>/dev/null) == True ]]; then
    refusal output output_name 'output_name="nonexistent"'
else
    echo "  (MLServer's ModelMetadata lists no outputs: no output_name check)"
fi
refusal model model_name 'model_name="no-such-model"'
refusal datatype input_datatype 'input_datatype="FP16"'

echo "== distilling mlp:784-100-10 from native + sklearn (OIP), T = $T, $EPOCHS epochs"
run_config "$RUN/distill" >"$RUN/run.toml"
mkdir -p "$RUN/distill"
d0=$SECONDS
wrc=0 crc=0
if start "$RUN/coordinator.log" coordinator --config "$RUN/run.toml" --listen 127.0.0.1:0; then
    coord_pid=${pids[-1]}
    coord_addr=$ADDR
    echo "  coordinator on $coord_addr; training the student (log: $RUN/worker.log)"
    timeout 480 "$BIN" student-worker --coordinator "http://$coord_addr" --work-dir "$RUN/worker" 2>"$RUN/worker.log" || wrc=$?
    wait "$coord_pid" || crc=$?
else
    crc=1
fi
if ((wrc == 0 && crc == 0)) && [[ -e $RUN/distill/report.json ]]; then
    record 0 "distillation run completes" "worker and coordinator exit 0 after $((SECONDS - d0))s"
    "$PY" "$HELPER" check-report "$RUN/distill/report.json" "$RUN/mlserver/sklearn.json" "$RUN/check-report.json" || true
    collect "$RUN/check-report.json"
    e=$("$BIN" eval --model "$RUN/distill/student.safetensors" --data "mnist:$DIR" --json 2>/dev/null \
        | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["errors"])' || echo "?")
    r=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["student_test_errors"])' "$RUN/distill/report.json")
    ok=0
    [[ $e == "$r" ]] || ok=1
    record $ok "distill eval of the run's student.safetensors == report" "eval $e/10000, report $r/10000"
else
    record 1 "distillation run completes" "worker exit $wrc, coordinator exit $crc; see $RUN/coordinator.log, $RUN/worker.log"
    tail -5 "$RUN/coordinator.log" "$RUN/worker.log" >&2 || true
fi
if kill -0 "$mlserver_pid" 2>/dev/null; then
    record 0 "MLServer still running after the run" "pid $mlserver_pid"
else
    record 1 "MLServer still running after the run" "it exited; see $RUN/mlserver.log"
fi

# --- (b) tritonclient against our teacher server --------------------------------------------
echo "== tritonclient[grpc] against our teacher server on $native_addr"
"$PY" "$HELPER" triton-check "$native_addr" native "$DIR" "$RUN/z.npy" "$native_digest" "$RUN/triton-check.json" || true
collect "$RUN/triton-check.json"

# --- summary --------------------------------------------------------------------------------
secs=$((SECONDS - t0))
fails=0
echo
echo "OIP interop summary (${versions%, }):"
for r in "${results[@]}"; do
    IFS=$'\t' read -r s name detail <<<"$r"
    [[ $s == PASS ]] || fails=$((fails + 1))
    ((${#detail} <= 150)) || detail="${detail:0:147}..."
    printf '  %s  %s%s\n' "$s" "$name" "${detail:+: $detail}"
done
echo "  native teacher $native_errors/10000 test errors; run directory $RUN; wall time ${secs}s"
if ((fails > 0)); then
    echo "FAIL: $fails of ${#results[@]} checks failed"
    exit 1
fi
echo "PASS: all ${#results[@]} checks passed"
