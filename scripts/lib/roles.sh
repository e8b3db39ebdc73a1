# Shared by the scripts that start distill roles as processes; sourced, not run.
# The caller sets BIN (the distill binary) before calling `start`.

# Pids of the roles started, for the caller's EXIT trap (`stop_roles`, or its own).
pids=()
stop_roles() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }

# Starts a role in the background and sets ADDR from its `listening on` line; fails when the
# role printed no such line. Not to be run in a command substitution, so that its pid stays in
# this shell's `pids`.
ADDR=
start() { # LOG ARGS...
    local log=$1
    shift
    local fifo
    fifo=$(mktemp -u)
    mkfifo "$fifo"
    "$BIN" "$@" >"$fifo" 2>"$log" &
    pids+=($!)
    local line
    read -r line <"$fifo" || true
    # Keep draining the role's stdout.
    (cat "$fifo" >/dev/null; rm -f "$fifo") >/dev/null 2>&1 &
    [[ $line == "listening on "* ]] || { echo "error: $* did not start; see $log" >&2; tail -3 "$log" >&2; return 1; }
    ADDR=${line#listening on }
}

# Fails naming the file when DIR lacks one of the four MNIST IDX files.
require_mnist() { # DIR
    local f
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        if [[ ! -e "$1/$f" && ! -e "$1/$f.gz" ]]; then
            echo "error: $1 has no $f(.gz); pass the MNIST directory as the first argument" >&2
            return 1
        fi
    done
}

# Sets BIN: $DISTILL_BIN when given, else target/release/distill built from ROOT.
release_bin() {
    if [[ -n ${DISTILL_BIN:-} ]]; then
        BIN=$DISTILL_BIN
    else
        (cd "$ROOT" && cargo build --release -p distill)
        BIN=$ROOT/target/release/distill
    fi
}
