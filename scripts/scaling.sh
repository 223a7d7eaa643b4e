#!/usr/bin/env bash
# How the gateway scales with shards: for K = 1..--max-shards (default nproc), start it with
# `--shards K --cpus 0..K-1`, run `bench chat --sweep` and `bench idle`, stop it. Prints the
# highest held chat rate per K and efficiency = rate(K) / (K x rate(1)).
# Results: results/scaling-<date>/shards-K.{chat-sweep,idle}.json and table.md. Loopback only.
#
#   scripts/scaling.sh [--max-shards K] [--chat-users N] [--sweep-duration S] [--p99-bound-ms MS]
#                      [--idle-sessions N] [--idle-ramp CONNECTS/S] [--idle-hold S] [--procs P]
#                      [--sweep-start MSG/S] [--sweep-steps-max N]
#                      [--out DIR] [--bench PATH] [--quick] [--run-timeout S]
#
# Note: the generator shares the machine. With K = nproc the server and bench compete for the
# same CPUs, so the last point understates the server; read the efficiency column with that in mind.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PEERS="$ROOT/scripts/peers"
# shellcheck source=peers/common.sh
. "$PEERS/common.sh"

MAX_SHARDS=$(nproc)
CHAT_USERS=500
SWEEP_DURATION=5
SWEEP_START=500
SWEEP_STEPS_MAX=14
P99_BOUND_MS=10
IDLE_SESSIONS=5000
IDLE_RAMP=1000
IDLE_HOLD=5
PROCS=1
RUN_TIMEOUT=600
OUT=""
QUICK=0
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BENCH="${BENCH:-$TARGET_DIR/release/bench}"
export GATEWAY_BIN="${GATEWAY_BIN:-$TARGET_DIR/release/gateway}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-2}"; }

for a in "$@"; do
    if [ "$a" = "--quick" ]; then
        QUICK=1; CHAT_USERS=50; SWEEP_DURATION=2; SWEEP_STEPS_MAX=4; IDLE_SESSIONS=300; IDLE_RAMP=300; IDLE_HOLD=2; RUN_TIMEOUT=120
    fi
done
need() { [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) shift ;;
        --max-shards) need "$@"; MAX_SHARDS=$2; shift 2 ;;
        --chat-users) need "$@"; CHAT_USERS=$2; shift 2 ;;
        --sweep-duration) need "$@"; SWEEP_DURATION=$2; shift 2 ;;
        --p99-bound-ms) need "$@"; P99_BOUND_MS=$2; shift 2 ;;
        --sweep-start) need "$@"; SWEEP_START=$2; shift 2 ;;
        --sweep-steps-max) need "$@"; SWEEP_STEPS_MAX=$2; shift 2 ;;
        --idle-sessions) need "$@"; IDLE_SESSIONS=$2; shift 2 ;;
        --idle-ramp) need "$@"; IDLE_RAMP=$2; shift 2 ;;
        --idle-hold) need "$@"; IDLE_HOLD=$2; shift 2 ;;
        --procs) need "$@"; PROCS=$2; shift 2 ;;
        --run-timeout) need "$@"; RUN_TIMEOUT=$2; shift 2 ;;
        --out) need "$@"; OUT=$2; shift 2 ;;
        --bench) need "$@"; BENCH=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "error: unknown flag $1" >&2; usage ;;
    esac
done
(( MAX_SHARDS >= 1 && MAX_SHARDS <= $(nproc) )) || { echo "error: --max-shards must be 1..$(nproc)" >&2; exit 2; }

if [ -z "$OUT" ]; then
    OUT="$ROOT/results/scaling-$(date +%Y-%m-%d-%H%M)"
    [ "$QUICK" = 1 ] && OUT="$OUT-quick"
fi
mkdir -p "$OUT"
ulimit -n "$NOFILE" 2>/dev/null || true
[ -x "$BENCH" ] || cargo build --release -p gateway -p bench
"$PEERS/gateway.sh" install >/dev/null

USERS=$IDLE_SESSIONS
if (( CHAT_USERS > USERS )); then USERS=$CHAT_USERS; fi
"$PEERS/gateway.sh" setup "$USERS"

RUNNING=0
trap 'if [ "$RUNNING" = 1 ]; then "$PEERS/gateway.sh" stop || true; fi' EXIT
trap 'exit 130' INT TERM

bench_run() {
    local k=$1 kind=$2; shift 2
    local json="$OUT/shards-$k.$kind.json" rc=0
    local cmd=("$BENCH" "$@" --domain localhost --user-prefix user --password pw --insecure
        --server-pid "$("$PEERS/gateway.sh" pid)" --label "gateway $k shards" --server-shards "$k" --json "$json")
    echo "+ ${cmd[*]}" | tee -a "$OUT/commands.txt" >&2
    timeout --kill-after=15 "$RUN_TIMEOUT" "${cmd[@]}" >"$OUT/shards-$k.$kind.log" 2>&1 || rc=$?
    tail -n 8 "$OUT/shards-$k.$kind.log" | sed 's/^/    /' >&2
    if [ "$rc" != 0 ]; then echo "warning: shards $k $kind: bench exited $rc" >&2; fi
    return 0
}

for ((k = 1; k <= MAX_SHARDS; k++)); do
    cpus=$(seq -s, 0 $((k - 1)))
    for kind in chat-sweep idle; do
        log "==== $k shard(s) on CPUs $cpus: $kind"
        GATEWAY_SHARDS=$k GATEWAY_CPUS=$cpus "$PEERS/gateway.sh" start
        RUNNING=1
        case "$kind" in
            chat-sweep) bench_run "$k" "$kind" chat --target "127.0.0.1:$C2S_PORT" --tls none \
                --users "$CHAT_USERS" --duration "$SWEEP_DURATION" --size 100 --sweep --p99-bound-ms "$P99_BOUND_MS" \
                --sweep-start "$SWEEP_START" --sweep-steps-max "$SWEEP_STEPS_MAX" ;;
            idle) bench_run "$k" "$kind" idle --target "127.0.0.1:$C2S_PORT" --tls none \
                --sessions "$IDLE_SESSIONS" --ramp "$IDLE_RAMP" --hold "$IDLE_HOLD" --procs "$PROCS" ;;
        esac
        "$PEERS/gateway.sh" stop
        RUNNING=0
    done
done

python3 "$PEERS/report.py" --scaling "$OUT"
sweeps=("$OUT"/shards-*.chat-sweep.json)
if [ -s "${sweeps[0]}" ]; then "$BENCH" plot "${sweeps[@]}" -o "$OUT/chat-sweep.svg" || true; fi
log "done: $OUT/table.md"
