#!/usr/bin/env bash
# A language-model student's training tokens/s, candle (`distill bench --only lm-student`)
# against PyTorch (scripts/lm_student_torch.py, transformers' LlamaForCausalLM) on the same
# shape — SmolLM2-135M's width with LAYERS layers, the student scripts/lm-distill.sh distils —
# the same update (forward, next-token cross-entropy, backward, AdamW) and batch, back to back,
# ROUNDS rounds, THREADS threads each. PyTorch, numpy and transformers are installed from the
# package registry into a local virtual environment (large: ~3 GB with torch's dependencies)
# unless TORCH_PY names a Python that has them. Compare the ratio within one round only: the
# machine is shared.
#
# Environment (all optional): LAYERS=4 BATCH=8 LEN=256 THREADS=2 SECS=20 ROUNDS=2
#   TORCH_PY=PATH DISTILL_BIN=PATH
set -euo pipefail
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
LAYERS=${LAYERS:-4}
BATCH=${BATCH:-8}
LEN=${LEN:-256}
THREADS=${THREADS:-2}
SECS=${SECS:-20}
ROUNDS=${ROUNDS:-2}
if [[ -z ${TORCH_PY:-} ]]; then
    VENV=$ROOT/target/torch-venv
    [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet torch numpy transformers
    TORCH_PY=$VENV/bin/python
fi
# shellcheck source=lib/roles.sh
source "$ROOT/scripts/lib/roles.sh"
release_bin
for round in $(seq "$ROUNDS"); do
    echo "=== round $round $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)"
    c=$(RAYON_NUM_THREADS=$THREADS "$BIN" bench --only lm-student --lm-layers "$LAYERS" \
        --lm-batch "$BATCH" --lm-len "$LEN" --window-secs "$SECS" 2>/dev/null | tee /dev/stderr | grep '^RESULT')
    t=$("$TORCH_PY" "$ROOT/scripts/lm_student_torch.py" --layers "$LAYERS" --batch "$BATCH" \
        --len "$LEN" --threads "$THREADS" --secs "$SECS" 2>/dev/null | tee /dev/stderr | grep '^RESULT')
    python3 - "$c" "$t" <<'PY'
import json, sys
c, t = (json.loads(s.split(" ", 1)[1]) for s in sys.argv[1:3])
print(f"candle {c['tokens_per_sec']:.0f} tokens/s, torch {t['tokens_per_sec']:.0f} tokens/s: "
      f"candle / torch = {c['tokens_per_sec'] / t['tokens_per_sec']:.3f}")
PY
done
