#!/usr/bin/env bash
# Memory per idle session against the budget (issue 4): builds the gateway and bench, makes
# SESSIONS users, then for each TLS mode starts a fresh gateway, holds SESSIONS idle authenticated
# sessions with `bench idle`, and prints the server's user-space bytes per session, the kernel's
# bytes per socket, and the server's RSS after every session closed.
#
#   scripts/bench-idle.sh [--sessions N] [--shards S] [--modes direct,none] [--profile P]
#                         [--ramp R] [--hold SECONDS] [--procs K] [--no-build] [--out DIR]
#                         [--engine uring|tasks]
#
# Defaults: 19000 sessions (the box's open-file cap is 20000 per process), 2 shards (or nproc if
# fewer), both modes, `--profile release`, the gateway's default `io_engine` (`--engine` sets it
# through a config file; not together with GATEWAY_CONFIG). Environment: PEERS_ROOT (default /tmp/bench-idle),
# C2S_PORT / TLS_PORT / ADMIN_PORT (default 25222 / 25223 / 25280), CARGO_TARGET_DIR, GATEWAY_BIN and
# BENCH_BIN (binaries other than the built ones, e.g. an older build for a before/after).
# Loopback only; every step is bounded (bench's own timeouts, the gateway script's start/stop
# timeouts).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

SESSIONS=19000
SHARDS=$(( $(nproc) < 2 ? $(nproc) : 2 ))
MODES=direct,none
PROFILE=release
RAMP=400
HOLD=10
PROCS=2
BUILD=1
OUT=""
ENGINE=""
# The budgets of issue 4, bytes of server user memory per idle authenticated session.
BUDGET_TLS_BYTES=3072
BUDGET_PLAIN_BYTES=1536
# Seconds after bench ends before the server's RSS is read again ("RSS settled").
SETTLE_SECONDS=5

usage() { sed -n '2,16p' "$0" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --sessions) SESSIONS=$2; shift 2 ;;
        --shards) SHARDS=$2; shift 2 ;;
        --modes) MODES=$2; shift 2 ;;
        --profile) PROFILE=$2; shift 2 ;;
        --ramp) RAMP=$2; shift 2 ;;
        --hold) HOLD=$2; shift 2 ;;
        --procs) PROCS=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --out) OUT=$2; shift 2 ;;
        --engine) ENGINE=$2; shift 2 ;;
        -h|--help) usage ;;
        *) echo "unknown argument $1" >&2; usage ;;
    esac
done
[[ "$SESSIONS" =~ ^[0-9]+$ ]] || { echo "--sessions takes a number" >&2; exit 2; }

export PEERS_ROOT="${PEERS_ROOT:-/tmp/bench-idle}"
export C2S_PORT="${C2S_PORT:-25222}" TLS_PORT="${TLS_PORT:-25223}" ADMIN_PORT="${ADMIN_PORT:-25280}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BIN_DIR="$TARGET_DIR/$PROFILE"
[ "$PROFILE" = dev ] && BIN_DIR="$TARGET_DIR/debug"
export GATEWAY_BIN="${GATEWAY_BIN:-$BIN_DIR/gateway}" GATEWAY_SHARDS="$SHARDS"
BENCH="${BENCH_BIN:-$BIN_DIR/bench}"
OUT="${OUT:-$PEERS_ROOT/results-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
if [ -n "$ENGINE" ]; then
    [ -z "${GATEWAY_CONFIG:-}" ] || { echo "--engine and GATEWAY_CONFIG: put io_engine in the config file" >&2; exit 2; }
    printf 'io_engine = "%s"\n' "$ENGINE" > "$OUT/engine.toml"
    export GATEWAY_CONFIG="$OUT/engine.toml"
fi

if [ "$BUILD" = 1 ]; then
    ( cd "$ROOT" && nice -n 10 cargo build --profile "$PROFILE" -p gateway -p bench )
fi
[ -x "$GATEWAY_BIN" ] && [ -x "$BENCH" ] || { echo "no binaries under $BIN_DIR (drop --no-build)" >&2; exit 1; }

GW="$HERE/peers/gateway.sh"
"$GW" setup "$SESSIONS"

# Slab (kernel objects: sockets, files, dentries) in bytes, from /proc/meminfo.
slab_bytes() { awk '/^Slab:/ {print $2 * 1024}' /proc/meminfo; }

summary="$OUT/summary.txt"
: > "$summary"
printf '%-7s %8s %9s %12s %8s %14s %12s %12s %12s %12s\n' mode sessions failed "B/session" budget "kernel B/sock" "RSS before" "RSS held" "RSS closed" "RSS settled" | tee -a "$summary"
status=0
IFS=, read -ra modes <<< "$MODES"
for mode in "${modes[@]}"; do
    case "$mode" in
        # The gateway's certificate is self-signed: bench accepts it (loopback only).
        direct) port=$TLS_PORT; budget=$BUDGET_TLS_BYTES; tls_args=(--insecure) ;;
        none) port=$C2S_PORT; budget=$BUDGET_PLAIN_BYTES; tls_args=() ;;
        *) echo "mode $mode: use direct or none" >&2; exit 2 ;;
    esac
    "$GW" start
    pid=$("$GW" pid)
    slab0=$(slab_bytes)
    # Kernel memory while the sessions are held: sample Slab when the server holds them all.
    (
        t0=$SECONDS
        while (( SECONDS - t0 < 300 )); do
            fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)
            if (( fds >= SESSIONS * 95 / 100 )); then sleep 2; slab_bytes > "$OUT/slab.$mode"; exit 0; fi
            sleep 1
        done
    ) &
    sampler=$!
    "$BENCH" idle --target "127.0.0.1:$port" --domain localhost --user-prefix user --password pw \
        --tls "$mode" "${tls_args[@]}" --sessions "$SESSIONS" --ramp "$RAMP" --hold "$HOLD" --procs "$PROCS" \
        --server-pid "$pid" --label "gateway $SHARDS shards" --json "$OUT/idle-$mode.json" \
        > "$OUT/bench-$mode.log" 2>&1 || status=1
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    # bench reads the server's RSS right after its sessions close; give the server a few seconds
    # to finish the disconnects and return memory, then read it again.
    sleep "$SETTLE_SECONDS"
    awk '/^VmRSS:/ {print $2 * 1024}' "/proc/$pid/status" > "$OUT/rss-settled.$mode" 2>/dev/null || true
    "$GW" stop
    if [ ! -s "$OUT/idle-$mode.json" ]; then
        echo "$mode: bench wrote no report; see $OUT/bench-$mode.log" | tee -a "$summary"
        tail -3 "$OUT/bench-$mode.log" >&2
        status=1
        continue
    fi
    python3 - "$OUT/idle-$mode.json" "$mode" "$budget" "$slab0" "$OUT/slab.$mode" "$OUT/rss-settled.$mode" <<'EOF' | tee -a "$summary"
import json, os, sys
path, mode, budget, slab0, slab_path, settled_path = sys.argv[1:]
r = json.load(open(path))
s = r["server"]
est = r["counts"]["established"]
per = s["bytes_per_session"]
kernel = "-"
if os.path.exists(slab_path) and est:
    # Both ends of every session are sockets on this box: the slab delta covers 2 per session.
    kernel = "%d" % ((int(open(slab_path).read()) - int(slab0)) / (2 * est))
mib = lambda b: "%.1f MiB" % (b / 2**20)
settled = "-"
if os.path.exists(settled_path) and open(settled_path).read().strip():
    settled = mib(int(open(settled_path).read()))
verdict = "ok" if per is not None and per <= int(budget) else "OVER"
print("%-7s %8d %9d %12s %8s %14s %12s %12s %12s %12s %s" % (
    mode, est, r["counts"]["failed"], "-" if per is None else "%.0f" % per, budget, kernel,
    mib(s["rss_before_bytes"]), mib(s["rss_peak_bytes"]), mib(s["rss_after_bytes"]), settled, verdict))
EOF
done
echo "reports and logs: $OUT" >&2
exit $status
