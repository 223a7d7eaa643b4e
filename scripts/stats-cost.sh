#!/usr/bin/env bash
# What live statistics cost: `bench chat` at a fixed rate against the gateway with statistics on
# (`stats_enabled = true`, the default) and off, alternated --rounds times on one machine. Per
# run: delivered msg/s, server CPU seconds, messages per server CPU-second, p50/p99. Prints the
# medians and the ratio off/on of messages per server CPU-second (the throughput a core gives).
# Loopback only; every run is bounded by --duration plus bench's own deadlines. With --key and
# --values it compares any other config key the same way, e.g. `--key huge_pages --values
# '"off","thp"'` (each value as TOML; the first plays "on", the second "off"). With --bins it
# compares two gateway binaries instead (the first plays "on"), e.g. before and after a change.
# --tls direct runs the chat over direct TLS (XEP-0368 port, self-signed certificate accepted).
#
#   scripts/stats-cost.sh [--rate MSG/S] [--duration S] [--users N] [--rounds N] [--out DIR]
#                         [--key KEY --values A,B] [--bins GATEWAY_A,GATEWAY_B]
#                         [--tls none|direct]
#                         [--top FILE]   (also capture `gateway top` frames during the first run)
#                         [--sweep]      (instead: `chat --sweep` from --rate x1.2 per step, p99
#                                         bound 10 ms; compares the highest rate held)
#
# Binaries: $GATEWAY_BIN and $BENCH (default target/release/{gateway,bench} under
# $CARGO_TARGET_DIR). Server data and logs under $PEERS_ROOT (default /tmp/peers).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PEERS="$ROOT/scripts/peers"
# shellcheck source=peers/common.sh
. "$PEERS/common.sh"

RATE=10000
DURATION=15
USERS=1000
ROUNDS=3
OUT="/tmp/stats-cost-$(date +%Y%m%d-%H%M%S)"
TOP=""
SWEEP=0
KEY=stats_enabled
VALUES=true,false
BINS=""
TLS=none
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BENCH="${BENCH:-$TARGET_DIR/release/bench}"
export GATEWAY_BIN="${GATEWAY_BIN:-$TARGET_DIR/release/gateway}"
export ADMIN_PORT="${ADMIN_PORT:-25280}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-2}"; }
need() { [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case "$1" in
        --rate) need "$@"; RATE=$2; shift 2 ;;
        --duration) need "$@"; DURATION=$2; shift 2 ;;
        --users) need "$@"; USERS=$2; shift 2 ;;
        --rounds) need "$@"; ROUNDS=$2; shift 2 ;;
        --out) need "$@"; OUT=$2; shift 2 ;;
        --top) need "$@"; TOP=$2; shift 2 ;;
        --sweep) SWEEP=1; shift ;;
        --key) need "$@"; KEY=$2; shift 2 ;;
        --values) need "$@"; VALUES=$2; shift 2 ;;
        --bins) need "$@"; BINS=$2; shift 2 ;;
        --tls) need "$@"; TLS=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "error: unknown argument $1" >&2; usage ;;
    esac
done
[ -x "$BENCH" ] || die "no bench at $BENCH (cargo build --release -p bench, or set BENCH)"
[ -n "$BINS" ] || [ -x "$GATEWAY_BIN" ] || die "no gateway at $GATEWAY_BIN (set GATEWAY_BIN)"
mkdir -p "$OUT"
IFS=, read -r value_on value_off <<< "$VALUES"
[ -n "$value_on" ] && [ -n "$value_off" ] || die "--values takes two values: A,B"
declare -A bin_of=([on]="$GATEWAY_BIN" [off]="$GATEWAY_BIN")
if [ -n "$BINS" ]; then
    IFS=, read -r bin_on bin_off <<< "$BINS"
    [ -x "$bin_on" ] && [ -x "$bin_off" ] || die "--bins takes two gateway binaries: A,B"
    bin_of=([on]="$bin_on" [off]="$bin_off")
    # Accounts are made with the first.
    export GATEWAY_BIN="$bin_on"
    KEY="binary"
    # The same (default) configuration for both binaries.
    : > "$OUT/on.toml"
    : > "$OUT/off.toml"
    log "on: $bin_on; off: $bin_off"
else
    printf '%s = %s\n' "$KEY" "$value_on" > "$OUT/on.toml"
    printf '%s = %s\n' "$KEY" "$value_off" > "$OUT/off.toml"
    log "on: $(cat "$OUT/on.toml"); off: $(cat "$OUT/off.toml")"
fi
case "$TLS" in
    none) chat_target=(--target "127.0.0.1:$C2S_PORT" --tls none) ;;
    direct) chat_target=(--target "127.0.0.1:$TLS_PORT" --tls direct --insecure) ;;
    *) die "--tls takes none or direct" ;;
esac
SHARDS="${GATEWAY_SHARDS:-$(nproc)}"

"$PEERS/gateway.sh" setup "$USERS"
trap '"$PEERS/gateway.sh" stop >/dev/null 2>&1 || true' EXIT
for round in $(seq 1 "$ROUNDS"); do
    for mode in on off; do
        GATEWAY_BIN="${bin_of[$mode]}" GATEWAY_CONFIG="$OUT/$mode.toml" "$PEERS/gateway.sh" start
        pid=$("$PEERS/gateway.sh" pid)
        top_pid=""
        if [ -n "$TOP" ] && [ "$round" = 1 ] && [ "$mode" = on ]; then
            # Frames from the middle of the send phase (after logins and the warm-up).
            "$GATEWAY_BIN" top --admin-addr "127.0.0.1:$ADMIN_PORT" --count $((DURATION + 5)) \
                > "$TOP" 2>&1 &
            top_pid=$!
        fi
        load=(--rate "$RATE" --duration "$DURATION")
        [ "$SWEEP" = 1 ] && load=(--sweep --sweep-start "$RATE" --sweep-factor 1.2 \
            --sweep-steps-max 30 --p99-bound-ms 10 --duration "$DURATION")
        log "round $round, $KEY $mode: bench chat ${load[*]}"
        "$BENCH" chat "${chat_target[@]}" --sessions "$USERS" \
            "${load[@]}" --server-pid "$pid" --server-shards "$SHARDS" \
            --label "gateway stats $mode" --json "$OUT/$mode-$round.json" > "$OUT/$mode-$round.txt" 2>&1 \
            || log "bench reported a failure (see $OUT/$mode-$round.txt)"
        [ -n "$top_pid" ] && wait "$top_pid" || true
        "$PEERS/gateway.sh" stop
    done
done

python3 - "$OUT" "$ROUNDS" "$SWEEP" <<'PY'
import json, statistics, sys
out, rounds, sweep = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
if sweep:
    held = {"on": [], "off": []}
    for r in range(1, rounds + 1):
        for mode in ("on", "off"):
            j = json.load(open(f"{out}/{mode}-{r}.json"))
            ok = [s["delivered_msgs_per_second"] for s in j["sweep"] if s["held"]]
            held[mode].append(max(ok) if ok else 0.0)
            print(f"{mode}-{r:<5} highest rate held (p99 <= 10 ms, nothing lost): {held[mode][-1]:.0f} msg/s")
    on, off = statistics.median(held["on"]), statistics.median(held["off"])
    print(f"median highest rate held: on {on:.0f} msg/s, off {off:.0f} msg/s; on / off {on / off:.3f}")
    sys.exit(0)
rows = {"on": [], "off": []}
print(f"{'run':<8} {'delivered/s':>12} {'server cpu s':>13} {'msgs/cpu-s':>11} {'p50 ms':>8} {'p99 ms':>8} {'lost':>6}")
for r in range(1, rounds + 1):
    for mode in ("on", "off"):
        j = json.load(open(f"{out}/{mode}-{r}.json"))
        cpu = j["server"]["cpu_user_seconds"] + j["server"]["cpu_system_seconds"]
        delivered = j["counts"]["delivered"]
        lat = j["latency_us"]
        row = (j["rates"]["delivered_msgs_per_second"], cpu, delivered / cpu if cpu else 0.0,
               lat["p50"] / 1000, lat["p99"] / 1000, j["counts"]["lost"])
        rows[mode].append(row)
        print(f"{mode}-{r:<5} {row[0]:>12.0f} {row[1]:>13.2f} {row[2]:>11.0f} {row[3]:>8.2f} {row[4]:>8.2f} {row[5]:>6}")
med = {m: [statistics.median(x[i] for x in rows[m]) for i in range(6)] for m in rows}
for m in ("on", "off"):
    v = med[m]
    print(f"median {m:<3} {v[0]:>12.0f} {v[1]:>13.2f} {v[2]:>11.0f} {v[3]:>8.2f} {v[4]:>8.2f} {v[5]:>6.0f}")
ratio = med["on"][2] / med["off"][2] if med["off"][2] else float("nan")
print(f"messages per server CPU-second, on / off: {ratio:.3f} (cost of the on config: {100 * (1 - ratio):.1f}%)")
PY
