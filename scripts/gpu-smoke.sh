#!/usr/bin/env bash
# CPU-vs-CUDA smoke check and benchmark of a CUDA build, on a machine with an NVIDIA GPU
# (docs/cuda.md). Needs no Rust and no network there: only the binary, an NVIDIA driver and
# the CUDA 13 runtime libraries.
#
#   scripts/gpu-smoke.sh [BINARY] [extra `distill gpu-smoke` flags]
#
# BINARY defaults to target-cuda/release/distill (what scripts/check-cuda-build.sh makes).
# It runs `distill gpu-smoke --device ${DEVICE:-cuda:0}`: (a) teacher logits CPU vs CUDA,
# (b) the student distilled through the real coordinator on the CPU and on CUDA with matching
# loss curves, (c) training samples/s on both; exit status non-zero if a check failed. The
# figures go to $OUT/gpu-smoke.json (OUT defaults to runs/gpu-smoke-<time>).
#
# Libraries. candle 0.11 links the CUDA libraries at link time, so the binary needs, through
# the dynamic loader: libcuda.so.1 (the driver's, normally already in /usr/lib*), and
# libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10 (and libnvrtc.so.13 at
# run time). This script puts these directories on LD_LIBRARY_PATH, in this order:
#   1. $CUDA_LIB_DIRS (colon-separated), if set;
#   2. nvidia/cu13/lib (and nvidia/*/lib) of the virtual environment $CUDA_VENV and of
#      .venv-cuda beside this script's repo, if present, and of every `python3` on PATH
#      whose site-packages has them (a PyTorch cu130 install has all of them);
#   3. $CUDA_HOME/lib64, /usr/local/cuda/lib64, /usr/local/cuda-13*/lib64, if present.
# Then it checks with ldd that nothing is missing and says what is, before running anything.
# The .venv-cuda made by check-cuda-build.sh holds only libcudart; for the others install on
# the GPU machine (or carry) e.g. `pip install "nvidia-cuda-runtime==13.0.*" "nvidia-cublas==13.0.*"
# "nvidia-curand>=10.4,<11" "nvidia-cuda-nvrtc==13.0.*"` into a venv and point CUDA_VENV at it.
#
# Environment: DEVICE (cuda:0), OUT (work directory), CUDA_LIB_DIRS, CUDA_VENV, CUDA_HOME.
# Takes about a minute on a GPU machine (the CPU half dominates); see docs/cuda.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${1:-$ROOT/target-cuda/release/distill}
if [[ $# -gt 0 ]]; then shift; fi
DEVICE=${DEVICE:-cuda:0}
OUT=${OUT:-runs/gpu-smoke-$(date +%Y%m%d-%H%M%S)}

[[ -x $BIN ]] || { echo "error: $BIN is not an executable (build it with scripts/check-cuda-build.sh)" >&2; exit 2; }

dirs=()
add() { [[ -d $1 ]] && dirs+=("$(cd "$1" && pwd)"); return 0; }
if [[ -n ${CUDA_LIB_DIRS:-} ]]; then
    IFS=: read -r -a extra <<<"$CUDA_LIB_DIRS"
    for d in "${extra[@]}"; do add "$d"; done
fi
site_dirs() { # site-packages directories of one python
    "$1" -c 'import site, sys; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null || true
}
pythons=()
for v in "${CUDA_VENV:-}" "$ROOT/.venv-cuda"; do
    [[ -n $v && -x $v/bin/python ]] && pythons+=("$v/bin/python")
done
command -v python3 >/dev/null 2>&1 && pythons+=("$(command -v python3)")
for py in "${pythons[@]}"; do
    while IFS= read -r sp; do
        [[ -n $sp ]] || continue
        add "$sp/nvidia/cu13/lib"
        for d in "$sp"/nvidia/*/lib; do add "$d"; done
    done < <(site_dirs "$py")
done
[[ -n ${CUDA_HOME:-} ]] && add "$CUDA_HOME/lib64"
add /usr/local/cuda/lib64
for d in /usr/local/cuda-13*/lib64; do add "$d"; done

LIBPATH=$(printf '%s\n' "${dirs[@]}" | awk 'NF && !seen[$0]++' | paste -sd: -)
export LD_LIBRARY_PATH=${LIBPATH}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "== LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

if command -v ldd >/dev/null 2>&1; then
    missing=$(ldd "$BIN" | awk '/not found/ {print $1}' || true)
    if [[ -n $missing ]]; then
        echo "error: $BIN cannot start, these libraries are not found:" >&2
        echo "$missing" | sed 's/^/    /' >&2
        echo "point CUDA_LIB_DIRS (or CUDA_VENV) at the CUDA 13 libraries; libcuda.so.1 comes with the NVIDIA driver" >&2
        exit 2
    fi
    ldd "$BIN" | grep -E 'libcuda|libcublas|libcurand|libcudart|libnvrtc' | sed 's/^/   /' || true
fi
command -v nvidia-smi >/dev/null 2>&1 &&
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/== GPU: /' || true; }

START=$(date +%s)
set +e
"$BIN" gpu-smoke --device "$DEVICE" --out "$OUT" "$@"
rc=$?
set -e
echo "== gpu-smoke exit $rc after $(($(date +%s) - START)) s; figures in $OUT/gpu-smoke.json"
exit $rc
