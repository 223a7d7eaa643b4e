#!/usr/bin/env bash
# What durability costs chat: `bench chat --sm` (every client enables XEP-0198, so each message to
# an online user is stored, delivered, and erased on the recipient's ack: two store writes per
# message) against the gateway with `durability = "durable"` (the default: group commit with
# fsync) and `durability = "memory"` (no fsync), alternated --rounds times on one machine. Per
# run: delivered msg/s, p50/p99 delivery latency, p99 XEP-0198 ack latency to the sender, acked,
# lost, and the server's storage line at stop (writes per commit, commit p99). Prints medians and
# the ratios durable / memory. Loopback only; every run is bounded by --duration plus bench's own
# deadlines.
#
#   scripts/chat-durability.sh [--rate MSG/S] [--duration S] [--users N] [--rounds N] [--out DIR]
#                              [--sweep]   (instead: `chat --sm --sweep` from --rate x--factor
#                                           per step while p99 <= --p99-bound-ms; compares the
#                                           highest rate held)
#                              [--factor F] [--p99-bound-ms MS]   (sweep; default 1.2 and 10)
#
# Binaries: $GATEWAY_BIN and $BENCH (default target/release/{gateway,bench} under
# $CARGO_TARGET_DIR). Server data and logs under $PEERS_ROOT (default /tmp/peers); ports from
# C2S_PORT / TLS_PORT / ADMIN_PORT as in scripts/peers/common.sh.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PEERS="$ROOT/scripts/peers"
# shellcheck source=peers/common.sh
. "$PEERS/common.sh"

RATE=2000
DURATION=10
USERS=1000
ROUNDS=3
OUT="/tmp/chat-durability-$(date +%Y%m%d-%H%M%S)"
SWEEP=0
FACTOR=1.2
BOUND_MS=10
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
        --sweep) SWEEP=1; shift ;;
        --factor) need "$@"; FACTOR=$2; shift 2 ;;
        --p99-bound-ms) need "$@"; BOUND_MS=$2; shift 2 ;;
        -h|--help) usage 0 ;;
        *) echo "error: unknown argument $1" >&2; usage ;;
    esac
done
[ -x "$BENCH" ] || die "no bench at $BENCH (cargo build --release -p bench, or set BENCH)"
[ -x "$GATEWAY_BIN" ] || die "no gateway at $GATEWAY_BIN (set GATEWAY_BIN)"
mkdir -p "$OUT"
printf 'durability = "durable"\n' > "$OUT/durable.toml"
printf 'durability = "memory"\n' > "$OUT/memory.toml"
SHARDS="${GATEWAY_SHARDS:-$(nproc)}"
GWLOG="$PEERS_ROOT/gateway/log/gateway.log"

"$PEERS/gateway.sh" setup "$USERS"
trap '"$PEERS/gateway.sh" stop >/dev/null 2>&1 || true' EXIT
for round in $(seq 1 "$ROUNDS"); do
    for mode in durable memory; do
        GATEWAY_CONFIG="$OUT/$mode.toml" "$PEERS/gateway.sh" start
        pid=$("$PEERS/gateway.sh" pid)
        lines_before=$(wc -l < "$GWLOG")
        load=(--rate "$RATE" --duration "$DURATION")
        [ "$SWEEP" = 1 ] && load=(--sweep --sweep-start "$RATE" --sweep-factor "$FACTOR" \
            --sweep-steps-max 30 --p99-bound-ms "$BOUND_MS" --duration "$DURATION")
        log "round $round, durability $mode: bench chat --sm ${load[*]}"
        "$BENCH" chat --sm --target "127.0.0.1:$C2S_PORT" --tls none --sessions "$USERS" \
            "${load[@]}" --server-pid "$pid" --server-shards "$SHARDS" \
            --label "gateway $mode" --json "$OUT/$mode-$round.json" > "$OUT/$mode-$round.txt" 2>&1 \
            || log "bench reported a failure (see $OUT/$mode-$round.txt)"
        # gateway.sh starts it at warn: the storage line at stop is info.
        "$GATEWAY_BIN" knob --admin-addr "127.0.0.1:$ADMIN_PORT" log_level info >/dev/null \
            || log "could not raise the log level: no storage line for this run"
        "$PEERS/gateway.sh" stop
        # The shards' storage lines at stop (group-commit batch, commit latency).
        tail -n +"$((lines_before + 1))" "$GWLOG" | grep -i 'storage' > "$OUT/$mode-$round.storage" || true
    done
done

python3 - "$OUT" "$ROUNDS" "$SWEEP" "$BOUND_MS" <<'PY'
import json, statistics, sys
out, rounds, sweep, bound = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
modes = ("durable", "memory")
if sweep:
    held = {m: [] for m in modes}
    for r in range(1, rounds + 1):
        for m in modes:
            j = json.load(open(f"{out}/{m}-{r}.json"))
            ok = [s["delivered_msgs_per_second"] for s in j["sweep"] if s["held"]]
            held[m].append(max(ok) if ok else 0.0)
            print(f"{m}-{r:<5} highest rate held (p99 <= {bound} ms, nothing lost): {held[m][-1]:.0f} msg/s")
    d, mem = statistics.median(held["durable"]), statistics.median(held["memory"])
    print(f"median highest rate held: durable {d:.0f} msg/s, memory {mem:.0f} msg/s; "
          f"durable / memory {d / mem if mem else float('nan'):.3f}")
    sys.exit(0)
rows = {m: [] for m in modes}
print(f"{'run':<10} {'delivered/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'ack p99 ms':>11} {'acked':>8} {'lost':>6}")
for r in range(1, rounds + 1):
    for m in modes:
        j = json.load(open(f"{out}/{m}-{r}.json"))
        lat = j["latency_us"]
        ack = j.get("ack_latency_us") or {}
        row = (j["rates"]["delivered_msgs_per_second"], lat["p50"] / 1000, lat["p99"] / 1000,
               ack.get("p99", 0) / 1000, j["counts"].get("acked", 0), j["counts"]["lost"])
        rows[m].append(row)
        print(f"{m}-{r:<7} {row[0]:>12.0f} {row[1]:>8.2f} {row[2]:>8.2f} {row[3]:>11.2f} {row[4]:>8} {row[5]:>6}")
med = {m: [statistics.median(x[i] for x in rows[m]) for i in range(6)] for m in modes}
for m in modes:
    v = med[m]
    print(f"median {m:<8} {v[0]:>9.0f} {v[1]:>8.2f} {v[2]:>8.2f} {v[3]:>11.2f} {v[4]:>8.0f} {v[5]:>6.0f}")
def ratio(i):
    return med["durable"][i] / med["memory"][i] if med["memory"][i] else float("nan")
print(f"durable / memory: throughput {ratio(0):.3f}, p50 {ratio(1):.2f}, p99 {ratio(2):.2f}, ack p99 {ratio(3):.2f}")
PY
echo "storage lines per run: $OUT/*.storage"
