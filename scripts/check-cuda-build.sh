#!/usr/bin/env bash
# Compile check of the CUDA build on a machine WITHOUT a GPU (docs/cuda.md).
#
#   scripts/check-cuda-build.sh [extra cargo build args]
#
# 1. Installs NVIDIA's CUDA 13.0 compiler, headers and runtime from PyPI into the virtual
#    environment $CUDA_VENV (default .venv-cuda in the repo root). The `-cu12` nvcc wheels hold
#    no `nvcc`; the CUDA 13 ones (no suffix) do. nvvm and crt are pinned too, or pip pulls 13.5.
# 2. Lays out a synthetic CUDA_HOME ($CUDA_VENV/cuda-home): bin/include/nvvm link into the
#    wheel, lib/libcudart.so is the wheel's real runtime, and lib/stubs holds LINK STUBS for
#    libcuda/libcublas/libcublasLt/libcurand/libnvrtc. candle 0.11 enables cudarc's
#    `dynamic-linking`, so those libraries are link-time NEEDED entries; the stubs (every entry
#    point cudarc declares, as empty functions, with the real sonames) satisfy the linker and are
#    never loaded: on a GPU machine the real libraries are found through LD_LIBRARY_PATH.
# 3. Runs `cargo build --release --features cuda` (the root `distill` binary, every role in it)
#    with CUDA_COMPUTE_CAP (default 90 = H100/H200; e.g. 80 for A100) and
#    CARGO_TARGET_DIR=target-cuda, and prints how long everything took.
#    Then `cargo check -p student-worker --features nccl` (the NCCL path, type-checked only).
# 4. Runs the binary here against a fake driver that reports "no device": the CPU self-test of
#    `distill gpu-smoke` must pass and `--device cuda:0` must be a clear error (SKIP_RUN=1 skips).
#
# The binary it makes CANNOT START on a machine without an NVIDIA driver (libcuda.so.1 is
# NEEDED): keep it apart from the CPU build. scripts/gpu-smoke.sh runs it on a GPU machine.
#
# Environment: CUDA_COMPUTE_CAP (90), CUDA_VENV (.venv-cuda), CARGO_TARGET_DIR (target-cuda),
# PYTHON (python3). Run it niced on a shared machine: `nice -n 19 scripts/check-cuda-build.sh`.
# Cold: 16 minutes on 2 cores shared with other builds, niced (candle's CUDA kernels are most of
# it; the wheels came from pip's cache); incremental after a change in the workspace: 1-5 min.
# See docs/cuda.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
START=$(date +%s)
elapsed() { local s=$(($(date +%s) - START)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

VENV=${CUDA_VENV:-$ROOT/.venv-cuda}
PYTHON=${PYTHON:-python3}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-cuda}
PINS=(
    "nvidia-cuda-nvcc==13.0.*"
    "nvidia-cuda-runtime==13.0.*"
    "nvidia-cuda-cccl==13.0.*"
    "nvidia-nvvm==13.0.*"
    "nvidia-cuda-crt==13.0.*"
)

# --- 1. the toolkit wheels -------------------------------------------------------------------
if [[ ! -x $VENV/bin/python ]]; then
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
echo "== pip install ${PINS[*]}"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CU13=$SITE/nvidia/cu13
for f in bin/nvcc bin/ptxas include/cuda.h include/cuda_runtime.h nvvm/bin/cicc; do
    [[ -e $CU13/$f ]] || { echo "error: $CU13/$f missing after pip install" >&2; exit 1; }
done
CUDART=$(ls "$CU13"/lib/libcudart.so.13* 2>/dev/null | head -n1 || true)
[[ -n $CUDART ]] || { echo "error: no libcudart.so.13 under $CU13/lib" >&2; exit 1; }
"$CU13/bin/nvcc" --version | tail -n2
echo "== toolkit ready after $(elapsed)"

# --- 2. synthetic CUDA_HOME with link stubs --------------------------------------------------
HOME_DIR=$VENV/cuda-home
mkdir -p "$HOME_DIR/lib/stubs"
for d in bin include nvvm; do ln -sfn "$CU13/$d" "$HOME_DIR/$d"; done
ln -sf "$CUDART" "$HOME_DIR/lib/libcudart.so"
ln -sf "$CUDART" "$HOME_DIR/lib/libcudart.so.13"

# The entry points come from cudarc's own declarations (a superset of what the binary uses:
# harmless for a stub), so no first build is needed to find them.
CUDARC=$(cargo metadata --format-version 1 --locked --features cuda 2>/dev/null |
    "$VENV/bin/python" -c '
import json, sys
pkgs = [p for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"]
print(pkgs[0]["manifest_path"].rsplit("/", 1)[0] if pkgs else "")')
[[ -n $CUDARC && -d $CUDARC/src ]] || { echo "error: cudarc sources not found (cargo fetch?)" >&2; exit 1; }

# stub  soname  cudarc-sys-module  symbol-regex
make_stub() {
    local name=$1 soname=$2 module=$3 regex=$4
    local c=$HOME_DIR/lib/stubs/$name.c
    grep -oE '^pub unsafe fn [A-Za-z0-9_]+' "$CUDARC/src/$module/sys/mod.rs" |
        awk '{print $4}' | grep -E "$regex" | sort -u |
        awk '{print "void " $1 "(void) {}"}' >"$c"
    local n
    n=$(wc -l <"$c")
    [[ $n -gt 0 ]] || { echo "error: no symbols for $name in cudarc/$module" >&2; exit 1; }
    gcc -shared -fPIC -o "$HOME_DIR/lib/stubs/lib$name.so" -Wl,-soname,"$soname" "$c"
    printf '   stub lib%-9s %-18s %4d symbols\n' "$name.so" "$soname" "$n"
}
echo "== link stubs in $HOME_DIR/lib/stubs"
make_stub cuda libcuda.so.1 driver '^cu[A-Z]'
make_stub cublas libcublas.so.13 cublas '^cublas'
make_stub cublasLt libcublasLt.so.13 cublaslt '^cublasLt'
make_stub curand libcurand.so.10 curand '^curand'
make_stub nvrtc libnvrtc.so.13 nvrtc '^nvrtc'

# --- 3. the build ----------------------------------------------------------------------------
export CUDA_HOME=$HOME_DIR
export NVCC=$CU13/bin/nvcc
export PATH=$CU13/bin:$PATH
echo "== cargo build --release --features cuda (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
BUILD_START=$(date +%s)
cargo build --release --locked --features cuda "$@"
BUILD_S=$(($(date +%s) - BUILD_START))

BIN=$CARGO_TARGET_DIR/release/distill
echo "== built $BIN ($(du -h "$BIN" | cut -f1))"
echo "   NEEDED: $(readelf -d "$BIN" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
if ! readelf -d "$BIN" | grep -q 'libcuda.so.1'; then
    echo "error: $BIN does not link libcuda.so.1: was the cuda feature on?" >&2
    exit 1
fi
# The NCCL averaging path (student-worker's `nccl` feature, docs/workers.md) is type-checked,
# not linked: libnccl is not among the stubs, and nothing runs it without several GPUs.
echo "== cargo check --release -p student-worker --features nccl"
cargo check --release --locked -p student-worker --features nccl
# --- 4. the binary on this machine, with a fake driver -----------------------------------------
# A fake libcuda.so.1 whose every entry point returns CUDA_ERROR_NO_DEVICE (100), plus the link
# stubs under their sonames and the real libcudart: the binary then starts without a GPU, so
# its CPU paths (gpu-smoke's CPU-vs-CPU self-test) and the "no GPU" error can be checked. This
# proves nothing about the CUDA kernels: that needs scripts/gpu-smoke.sh on a GPU. SKIP_RUN=1
# skips it.
if [[ ${SKIP_RUN:-0} != 1 ]]; then
    FAKE=$VENV/fake-driver
    mkdir -p "$FAKE"
    sed 's/^void \(.*\)(void) {}$/int \1(void) { return 100; }/' \
        "$HOME_DIR/lib/stubs/cuda.c" >"$FAKE/cuda.c"
    gcc -shared -fPIC -o "$FAKE/libcuda.so.1" -Wl,-soname,libcuda.so.1 "$FAKE/cuda.c"
    ln -sf "$HOME_DIR/lib/stubs/libcublas.so" "$FAKE/libcublas.so.13"
    ln -sf "$HOME_DIR/lib/stubs/libcublasLt.so" "$FAKE/libcublasLt.so.13"
    ln -sf "$HOME_DIR/lib/stubs/libcurand.so" "$FAKE/libcurand.so.10"
    ln -sf "$HOME_DIR/lib/stubs/libnvrtc.so" "$FAKE/libnvrtc.so.13"
    ln -sf "$CUDART" "$FAKE/libcudart.so.13"
    echo "== running the CUDA binary with a fake driver (no GPU)"
    SELF=$CARGO_TARGET_DIR/selftest
    rm -rf "$SELF" && mkdir -p "$SELF"
    set +e
    NODEV=$(cd "$SELF" && LD_LIBRARY_PATH=$FAKE RUST_BACKTRACE=0 "$BIN" train --data synthetic \
        --arch mlp:784-16-10 --epochs 1 --out m.safetensors --device cuda:0 2>&1)
    rc=$?
    set -e
    if [[ $rc -eq 0 ]] || ! grep -q 'device `cuda:0` is not available' <<<"$NODEV" || grep -q panicked <<<"$NODEV"; then
        echo "error: --device cuda:0 without a GPU should fail clearly (exit $rc):" >&2
        echo "$NODEV" >&2
        exit 1
    fi
    echo "   --device cuda:0 without a GPU: $(tail -n1 <<<"$NODEV")"
    (cd "$SELF" && LD_LIBRARY_PATH=$FAKE RUST_LOG=warn "$BIN" gpu-smoke --device cpu --out smoke \
        --teacher mlp:784-32-10 --conv conv:2-4-8-10 --student mlp:784-16-10 --epochs 2 \
        --batch 256 --bench-arch mlp:784-32-10 --bench-batch 64 --bench-seconds 0.2) |
        tail -n1 | sed 's/^/   CPU self-test of the CUDA binary: /'
fi
echo "== check-cuda-build OK: cargo build $((BUILD_S / 60))m$((BUILD_S % 60))s, total $(elapsed)"
echo "   run it on a GPU machine: scripts/gpu-smoke.sh $BIN   (docs/cuda.md)"
