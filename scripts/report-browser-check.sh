#!/usr/bin/env bash
# The run report in a real browser: runs a short `distill demo`, draws its page again with
# `distill report`, and opens report.html in headless Chromium (Debian's chromium package,
# installed when absent) driven by Playwright (PyPI, in a local virtual environment). Checks no
# console or page errors, no request leaving the file, every plot drawn and non-empty, the
# tables present; saves a full-page screenshot beside the page. Then the same for a page
# comparing two runs. Prints PASS/FAIL per check; exits non-zero when any failed.
# About two minutes on 2 cores, plus the installs the first time.
#
# Usage: scripts/report-browser-check.sh [DIR]
#   DIR: where the runs go (default: runs/report-check; started afresh)
# Environment (optional):
#   VENV=DIR         the virtual environment (default: target/report-venv)
#   PYTHON=EXE       the Python that creates it (default: python3.11)
#   DISTILL_BIN=PATH use this distill binary instead of building target/release/distill
set -euo pipefail

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
OUT=${1:-$ROOT/runs/report-check}
VENV=${VENV:-$ROOT/target/report-venv}
PYTHON=${PYTHON:-python3.11}

if [[ ! -x /usr/bin/chromium ]]; then
    echo "== installing Debian's chromium"
    SUDO=; [[ $(id -u) -eq 0 ]] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
echo "== $(/usr/bin/chromium --version 2>/dev/null)"
if ! "$VENV/bin/python" -c 'import playwright' 2>/dev/null; then
    echo "== creating $VENV with playwright"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "playwright==1.65.2"
fi

if [[ -n ${DISTILL_BIN:-} ]]; then
    BIN=$DISTILL_BIN
else
    (cd "$ROOT" && cargo build --release --quiet --bin distill)
    BIN=$ROOT/target/release/distill
fi

rm -rf "$OUT"
mkdir -p "$OUT"
fail=0
echo "== two short demo runs (T = 2 and T = 4)"
"$BIN" demo --out "$OUT/t2" --teacher-epochs 3 --epochs 8 --temperature 2 > "$OUT/t2.txt"
"$BIN" demo --out "$OUT/t4" --teacher-epochs 3 --epochs 8 --temperature 4 > "$OUT/t4.txt"
grep -E "^(distilled|baseline) student" "$OUT/t2.txt" "$OUT/t4.txt"
rm "$OUT/t2/report.html"
"$BIN" report "$OUT/t2" >/dev/null
"$BIN" report "$OUT/t2" "$OUT/t4" --out "$OUT/compare.html" >/dev/null

echo "== $OUT/t2/report.html"
"$VENV/bin/python" "$ROOT/scripts/report-browser-check.py" "$OUT/t2/report.html" "$OUT/t2/report.png" 5 || fail=1
echo "== $OUT/compare.html"
"$VENV/bin/python" "$ROOT/scripts/report-browser-check.py" "$OUT/compare.html" "$OUT/compare.png" 5 || fail=1
echo "screenshots: $OUT/t2/report.png $OUT/compare.png"
exit $fail
