#!/usr/bin/env bash
# The MNIST table of Hinton, Vinyals & Dean 2015 (section 3), reproduced with the paper's
# networks and through real servers (issue 17):
#   1. the teacher   mlp:784-1200-1200-10, dropout 0.5 (input 0.2), ±2 px jitter and a max-norm
#                    constraint on every hidden unit's incoming weights   (paper: 67 errors)
#   2. the student   mlp:784-800-800-10 alone, no regularisation          (paper: 146)
#   3. that student distilled at T = 20 from the teacher, through a teacher-server process, a
#      coordinator process and a student-worker process on loopback, with the soft-target cache
#      on so that only the first epoch asks the teacher                    (paper: 74)
#   4. the paper's temperature claims: students with 300 and with 30 units per hidden layer,
#      distilled at several temperatures ("300 or more units: all T above 8 similar; 30 units:
#      T in 2.5-4 significantly better than higher or lower").
# It prints the table next to the paper's figures, with the time of every part, and writes it
# to RUNS/table.md.
#
# Usage: scripts/hinton-mnist.sh [DIR]
#   DIR defaults to ../shared/data/mnist next to the repository root.
# Environment (all optional):
#   RUNS=DIR              where everything goes (default: runs/hinton-mnist in the repo)
#   THREADS=N             math threads per process (default: all cores)
#   TEACHER_EPOCHS=150    TEACHER_LR=0.1  MAX_NORM=3.5
#   STUDENT_EPOCHS=40     epochs of the 800-800 student alone and distilled
#   T=20 ALPHA=0.9        the main distillation
#   TABLE="300 30"        hidden widths of the temperature table ("" skips it)
#   TABLE_T="1 2.5 4 8 20"   temperatures of the table
#   TABLE_EPOCHS=10       epochs of every run in the table
#   SEED=0
#   DISTILL_BIN=PATH      use this distill binary instead of building target/release/distill
# A model whose checkpoint exists is not trained again (delete it to retrain); an interrupted
# training run resumes from its .state file. A distillation whose student exists is skipped.
set -euo pipefail

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
DIR=$(cd "${1:-$ROOT/../shared/data/mnist}" && pwd)
RUNS=${RUNS:-$ROOT/runs/hinton-mnist}
THREADS=${THREADS:-$(nproc)}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-150}
TEACHER_LR=${TEACHER_LR:-0.1}
MAX_NORM=${MAX_NORM:-3.5}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-40}
T=${T:-20}
ALPHA=${ALPHA:-0.9}
TABLE=${TABLE-300 30}
TABLE_T=${TABLE_T:-1 2.5 4 8 20}
TABLE_EPOCHS=${TABLE_EPOCHS:-10}
SEED=${SEED:-0}

# shellcheck source=lib/roles.sh
source "$ROOT/scripts/lib/roles.sh"
require_mnist "$DIR"
release_bin
mkdir -p "$RUNS"
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824}
export RAYON_NUM_THREADS=$THREADS
t_start=$SECONDS

trap stop_roles EXIT

# Reads one field of a JSON file (python3 only: no jq needed).
field() { # FILE EXPR
    python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, {"r": r}))' "$1" "$2"
}

# Trains NAME with `distill train` unless its checkpoint exists.
train() { # NAME ARGS...
    local name=$1
    shift
    local out=$RUNS/$name.safetensors
    if [[ -e $out ]]; then
        echo "== $name: $out exists, not training again"
        return
    fi
    echo "== $name: distill train $* (log: $RUNS/$name.log)"
    "$BIN" train --data "mnist:$DIR" --seed "$SEED" --threads "$THREADS" \
        --state "$RUNS/$name.state" --out "$out" "$@" 2>"$RUNS/$name.log"
    rm -f "$RUNS/$name.state"
}

errors() { "$BIN" eval --model "$1" --data "mnist:$DIR" --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["errors"])'; }
curve() { field "$1" '", ".join(str(e["test_errors"]) for e in r["epochs"] if e.get("test_errors") is not None)'; }

# 1-2. The teacher and the student alone.
train teacher --arch mlp:784-1200-1200-10 --dropout 0.5 --input-dropout 0.2 --jitter 2 \
    --max-norm "$MAX_NORM" --optimizer sgd --lr "$TEACHER_LR" --momentum 0.9 --warmup 1 \
    --schedule cosine --epochs "$TEACHER_EPOCHS" --batch 128
train student-alone --arch mlp:784-800-800-10 \
    --optimizer sgd --lr 0.05 --momentum 0.9 --schedule cosine --epochs "$STUDENT_EPOCHS" --batch 128

# 3-4. Distillation through the servers: one teacher server for every run.
start "$RUNS/teacher-server.log" teacher-server --model "$RUNS/teacher.safetensors" \
    --listen 127.0.0.1:0 --member teacher
teacher_addr=$ADDR
echo "== teacher server on $teacher_addr"

# Distils student NAME (arch ARCH) at temperature TEMP for EPOCHS epochs through a coordinator
# and a worker; the cache holds the soft targets after the first epoch.
distil() { # NAME ARCH TEMP EPOCHS
    local name=$1 arch=$2 temp=$3 epochs=$4
    local run=$RUNS/$name
    if [[ -e $run/student.safetensors ]]; then
        echo "== $name: $run/student.safetensors exists, not distilling again"
        return
    fi
    mkdir -p "$run"
    cat >"$run/run.toml" <<TOML
data = "mnist:$DIR"
run_dir = "$run"
epochs = $epochs
batch_size = 128
seed = $SEED
temperature = $temp
alpha = $ALPHA
prefetch = 16
[student]
arch = "$arch"
[optim]
kind = "sgd"
lr = 0.05
momentum = 0.9
schedule = { kind = "cosine", final_frac = 0.0 }
[cache]
dir = "$RUNS/cache"
[[members]]
name = "teacher"
endpoints = ["http://$teacher_addr"]
TOML
    echo "== $name: $arch at T = $temp, $epochs epochs (run directory $run)"
    local t0=$SECONDS
    start "$run/coordinator.log" coordinator --config "$run/run.toml" --listen 127.0.0.1:0
    local coord_pid=${pids[-1]}
    "$BIN" student-worker --coordinator "http://$ADDR" --work-dir "$run/worker" 2>"$run/worker.log"
    wait "$coord_pid" || { echo "error: the coordinator of $name failed; see $run/coordinator.log" >&2; exit 1; }
    echo $((SECONDS - t0)) >"$run/seconds"
}

distil "distilled-T$T" mlp:784-800-800-10 "$T" "$STUDENT_EPOCHS"
for width in $TABLE; do
    train "alone-$width" --arch "mlp:784-$width-$width-10" \
        --optimizer sgd --lr 0.05 --momentum 0.9 --schedule cosine --epochs "$TABLE_EPOCHS" --batch 128
    for temp in $TABLE_T; do
        distil "w$width-T$temp" "mlp:784-$width-$width-10" "$temp" "$TABLE_EPOCHS"
    done
done

# The table.
teacher_e=$(errors "$RUNS/teacher.safetensors")
alone_e=$(errors "$RUNS/student-alone.safetensors")
dist_e=$(errors "$RUNS/distilled-T$T/student.safetensors")
gap=$(python3 -c "a,s,d=$teacher_e,$alone_e,$dist_e; print(f'{100*(s-d)/(s-a):.0f}%' if s != a else 'n/a')")
secs() { field "$1" 'round(r["train_seconds"])'; }
out=$RUNS/table.md
{
    echo "MNIST test errors out of 10,000 (Hinton, Vinyals & Dean 2015, section 3)"
    echo
    echo "| model | recipe | test errors | paper | time |"
    echo "| --- | --- | ---: | ---: | ---: |"
    echo "| teacher mlp:784-1200-1200-10 | dropout 0.5/0.2, jitter 2, max-norm $MAX_NORM, SGD lr $TEACHER_LR, $TEACHER_EPOCHS epochs | $teacher_e | 67 | $(secs "$RUNS/teacher.safetensors.json") s |"
    echo "| student mlp:784-800-800-10 alone | no regularisation, $STUDENT_EPOCHS epochs | $alone_e | 146 | $(secs "$RUNS/student-alone.safetensors.json") s |"
    echo "| student distilled through the servers | T = $T, alpha = $ALPHA, cache, $STUDENT_EPOCHS epochs | $dist_e | 74 | $(cat "$RUNS/distilled-T$T/seconds") s |"
    echo
    echo "The distilled student closes $gap of the teacher-student gap (paper: 91%)."
    echo "Teacher's test errors per epoch: $(curve "$RUNS/teacher.safetensors.json")"
    python3 - "$RUNS/distilled-T$T/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"Distillation: {r['batches_trained']}/{r['batches_expected']} batches, "
      f"{r['samples_per_sec']:.0f} samples/s, the student waited "
      f"{100 * r['student_wait_fraction']:.1f}% of its time.")
PY
    if [[ -n $TABLE ]]; then
        echo
        echo "Temperature (alpha = $ALPHA, $TABLE_EPOCHS epochs each; 'alone' = hard labels only):"
        echo
        printf '| hidden units | alone |'
        for temp in $TABLE_T; do printf ' T = %s |' "$temp"; done
        echo
        printf '| ---: | ---: |'
        for _ in $TABLE_T; do printf ' ---: |'; done
        echo
        for width in $TABLE; do
            printf '| %s | %s |' "$width" "$(errors "$RUNS/alone-$width.safetensors")"
            for temp in $TABLE_T; do printf ' %s |' "$(errors "$RUNS/w$width-T$temp/student.safetensors")"; done
            echo
        done
        echo
        echo "Paper: with 300 or more units all temperatures above 8 give similar results; with 30"
        echo "units, T = 2.5-4 is significantly better than higher or lower temperatures."
    fi
    echo
    echo "Total wall time of this invocation: $((SECONDS - t_start)) s; run directories under $RUNS."
} | tee "$out"
