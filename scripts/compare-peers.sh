#!/usr/bin/env bash
# gateway vs ejabberd vs Prosody on this machine, one server at a time, the same bench scenarios
# against each, loopback only. Results: results/peers-<date>/*.json, table.md, chat-sweep.svg.
#
#   scripts/compare-peers.sh [--quick] [--servers gateway,ejabberd,prosody]
#                            [--scenarios idle-plain,idle-tls,chat-sweep,chat-fixed,login,reconnect]
#                            [--idle-sessions N] [--idle-ramp CONNECTS/S] [--idle-tls-ramp CONNECTS/S]
#                            [--prosody-idle-ramp CONNECTS/S] [--prosody-idle-tls-ramp CONNECTS/S]
#                            [--idle-hold S] [--procs P]
#                            [--chat-users N] [--sweep-duration S] [--p99-bound-ms MS]
#                            [--sweep-start MSG/S] [--sweep-steps-max N]
#                            [--chat-rate R] [--chat-duration S] [--login-sessions N]
#                            [--reconnect-sessions N] [--out DIR] [--bench PATH]
#                            [--warmup S] [--no-restart] [--skip-check] [--tune-host] [--run-timeout S]
#
# Each scenario runs against a freshly started server (Prosody slows down on long-lived
# instances; an idle run leaves 19k sessions to tear down). See the Benchmarking section of README.md.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PEERS="$ROOT/scripts/peers"
# shellcheck source=peers/common.sh
. "$PEERS/common.sh"

SERVERS="gateway,ejabberd,prosody"
SCENARIOS="idle-plain,idle-tls,chat-sweep,chat-fixed,login,reconnect"
IDLE_SESSIONS=19000
# Connects per second of the idle ramps: below the slowest peer's login rate on this box with bench
# beside it (at 400/s over direct TLS, Prosody established 4.6k of 19k, ejabberd 15k; the rest timed
# out). Idle measures memory, not speed, so a slow ramp costs nothing but time.
IDLE_RAMP=250
IDLE_TLS_RAMP=150
# Prosody 0.12 logs in far fewer sessions per second here: over direct TLS it kept up with 60/s at
# 85-100% CPU (19k sessions), and collapsed at 150/s (handshakes queued past the timeout).
PROSODY_IDLE_RAMP=150
PROSODY_IDLE_TLS_RAMP=50
IDLE_HOLD=10
PROCS=2
CHAT_USERS=1000
SWEEP_DURATION=5
SWEEP_START=500
SWEEP_STEPS_MAX=12
P99_BOUND_MS=10
CHAT_RATE=2000
CHAT_DURATION=10
LOGIN_SESSIONS=5000
RECONNECT_SESSIONS=5000
RUN_TIMEOUT=600
WARMUP=3           # seconds of chat at a low rate before each chat scenario, not reported
OUT=""
QUICK=0
RESTART=1
CHECK=1
TUNE=0
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BENCH="${BENCH:-$TARGET_DIR/release/bench}"
export GATEWAY_BIN="${GATEWAY_BIN:-$TARGET_DIR/release/gateway}"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-2}"; }

# --quick first, so that explicit size flags override its sizes wherever they are given.
for a in "$@"; do
    if [ "$a" = "--quick" ]; then
        # A smoke version: every scenario and every server, small and short.
        QUICK=1
        IDLE_SESSIONS=300; IDLE_RAMP=300; IDLE_TLS_RAMP=150; PROSODY_IDLE_RAMP=150; PROSODY_IDLE_TLS_RAMP=100; IDLE_HOLD=2
        CHAT_USERS=100; SWEEP_DURATION=3; SWEEP_START=500; SWEEP_STEPS_MAX=4
        CHAT_RATE=200; CHAT_DURATION=3
        LOGIN_SESSIONS=200; RECONNECT_SESSIONS=200
        RUN_TIMEOUT=120
    fi
done

need() { [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) shift ;;
        --servers) need "$@"; SERVERS=$2; shift 2 ;;
        --scenarios) need "$@"; SCENARIOS=$2; shift 2 ;;
        --idle-sessions) need "$@"; IDLE_SESSIONS=$2; shift 2 ;;
        --idle-ramp) need "$@"; IDLE_RAMP=$2; shift 2 ;;
        --idle-tls-ramp) need "$@"; IDLE_TLS_RAMP=$2; shift 2 ;;
        --prosody-idle-ramp) need "$@"; PROSODY_IDLE_RAMP=$2; shift 2 ;;
        --prosody-idle-tls-ramp) need "$@"; PROSODY_IDLE_TLS_RAMP=$2; shift 2 ;;
        --idle-hold) need "$@"; IDLE_HOLD=$2; shift 2 ;;
        --procs) need "$@"; PROCS=$2; shift 2 ;;
        --chat-users) need "$@"; CHAT_USERS=$2; shift 2 ;;
        --sweep-duration) need "$@"; SWEEP_DURATION=$2; shift 2 ;;
        --p99-bound-ms) need "$@"; P99_BOUND_MS=$2; shift 2 ;;
        --sweep-start) need "$@"; SWEEP_START=$2; shift 2 ;;
        --sweep-steps-max) need "$@"; SWEEP_STEPS_MAX=$2; shift 2 ;;
        --chat-rate) need "$@"; CHAT_RATE=$2; shift 2 ;;
        --chat-duration) need "$@"; CHAT_DURATION=$2; shift 2 ;;
        --login-sessions) need "$@"; LOGIN_SESSIONS=$2; shift 2 ;;
        --reconnect-sessions) need "$@"; RECONNECT_SESSIONS=$2; shift 2 ;;
        --run-timeout) need "$@"; RUN_TIMEOUT=$2; shift 2 ;;
        --warmup) need "$@"; WARMUP=$2; shift 2 ;;
        --out) need "$@"; OUT=$2; shift 2 ;;
        --bench) need "$@"; BENCH=$2; shift 2 ;;
        --no-restart) RESTART=0; shift ;;
        --skip-check) CHECK=0; shift ;;
        --tune-host) TUNE=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "error: unknown flag $1" >&2; usage ;;
    esac
done

DATE=$(date +%Y-%m-%d-%H%M)
if [ -z "$OUT" ]; then
    OUT="$ROOT/results/peers-$DATE"
    [ "$QUICK" = 1 ] && OUT="$OUT-quick"
fi
mkdir -p "$OUT"

# Users for the largest scenario (each session is its own user).
USERS=$IDLE_SESSIONS
for n in "$CHAT_USERS" "$LOGIN_SESSIONS" "$RECONNECT_SESSIONS"; do
    if (( n > USERS )); then USERS=$n; fi
done

# ---- host ---------------------------------------------------------------------------------
host_checks() {
    ulimit -n "$NOFILE" 2>/dev/null || echo "warning: cannot raise open files to $NOFILE (hard $(ulimit -Hn))" >&2
    ulimit -l unlimited 2>/dev/null || true
    if [ "$TUNE" = 1 ]; then
        sysctl -qw net.core.somaxconn=4096 || true
        sysctl -qw net.ipv4.tcp_max_syn_backlog=8192 || true
        sysctl -qw net.ipv4.ip_local_port_range="1024 65000" || true
    fi
    local somax range lo hi
    somax=$(cat /proc/sys/net/core/somaxconn)
    range=$(cat /proc/sys/net/ipv4/ip_local_port_range)
    read -r lo hi <<<"$range"
    (( somax >= 4096 )) || echo "warning: net.core.somaxconn=$somax caps listen backlogs (--tune-host raises it)" >&2
    (( hi - lo >= IDLE_SESSIONS + 2000 )) || echo "warning: ip_local_port_range '$range' is narrow for $IDLE_SESSIONS sessions from one source IP (--tune-host widens it)" >&2
    {
        echo "date: $(date -Is)"
        echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (dirty tree)')"
        echo "uname: $(uname -srm)"
        echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), nproc $(nproc)"
        echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
        echo "ulimit -n: $(ulimit -n), ulimit -l: $(ulimit -l)"
        echo "somaxconn: $somax, ip_local_port_range: $range"
        echo "sizes: idle $IDLE_SESSIONS (ramp $IDLE_RAMP/s plaintext, $IDLE_TLS_RAMP/s TLS; Prosody $PROSODY_IDLE_RAMP/s, $PROSODY_IDLE_TLS_RAMP/s; hold $IDLE_HOLD s, procs $PROCS), chat users $CHAT_USERS," \
             "sweep from $SWEEP_START msg/s, $SWEEP_DURATION s per step, at most $SWEEP_STEPS_MAX steps, bound $P99_BOUND_MS ms, fixed $CHAT_RATE msg/s for $CHAT_DURATION s," \
             "login $LOGIN_SESSIONS, reconnect $RECONNECT_SESSIONS, chat warmup $WARMUP s"
    } > "$OUT/host.txt"
}

# ---- servers ------------------------------------------------------------------------------
server_label() {
    case "$1" in
        gateway) echo "gateway $("$PEERS/gateway.sh" version) ${GATEWAY_SHARDS:-$(nproc)} shards" ;;
        ejabberd) echo "ejabberd $("$PEERS/ejabberd.sh" version)" ;;
        prosody) echo "Prosody $("$PEERS/prosody.sh" version)" ;;
    esac
}

CURRENT=""
cleanup() {
    if [ -n "$CURRENT" ]; then "$PEERS/$CURRENT.sh" stop || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_server() {
    "$PEERS/$1.sh" start
    CURRENT=$1
}

stop_server() {
    "$PEERS/$1.sh" stop
    CURRENT=""
}

# ---- scenarios ----------------------------------------------------------------------------
FAILED_RUNS=()

# run_bench SERVER KIND LABEL ARGS...: one bench run into $OUT/SERVER.KIND.json, bounded in time.
run_bench() {
    local server=$1 kind=$2 label=$3; shift 3
    local json="$OUT/$server.$kind.json" pid rc=0
    pid=$("$PEERS/$server.sh" pid)
    local cmd=("$BENCH" "$@" --domain localhost --user-prefix user --password pw --insecure
        --server-pid "$pid" --label "$label" --json "$json")
    if [ "$server" = gateway ]; then cmd+=(--server-shards "${GATEWAY_SHARDS:-$(nproc)}"); fi
    echo "+ ${cmd[*]}" | tee -a "$OUT/commands.txt" >&2
    timeout --kill-after=15 "$RUN_TIMEOUT" "${cmd[@]}" >"$OUT/$server.$kind.log" 2>&1 || rc=$?
    tail -n 15 "$OUT/$server.$kind.log" | sed 's/^/    /' >&2
    if [ "$rc" != 0 ]; then
        echo "warning: $server $kind: bench exited $rc (log $OUT/$server.$kind.log)" >&2
        FAILED_RUNS+=("$server $kind (exit $rc)")
    fi
    [ -s "$json" ] || FAILED_RUNS+=("$server $kind (no JSON)")
    return 0
}

# warmup SERVER KIND: a short chat at a low rate, not reported. The first seconds of traffic
# after a start carry one-off costs (ejabberd: p99 17 ms in the first 3 s at 500 msg/s, 3 ms
# after); without this the first sweep step measures them.
warmup() {
    local server=$1 kind=$2 pid
    [ "$WARMUP" = 0 ] && return 0
    pid=$("$PEERS/$server.sh" pid)
    timeout --kill-after=5 $((WARMUP + 60)) "$BENCH" chat --target "127.0.0.1:$C2S_PORT" --tls none \
        --sessions "$CHAT_USERS" --rate 200 --duration "$WARMUP" --size 100 --domain localhost \
        --user-prefix user --password pw --insecure --label "$server warmup" \
        >"$OUT/$server.$kind.warmup.log" 2>&1 || echo "warning: $server warmup exited non-zero" >&2
    grep -h "latency ms" "$OUT/$server.$kind.warmup.log" | sed 's/^/    warmup: /' >&2 || true
}

scenario() {
    local server=$1 kind=$2 label=$3
    local plain=(--target "127.0.0.1:$C2S_PORT" --tls none)
    local ramp=$IDLE_RAMP tls_ramp=$IDLE_TLS_RAMP
    if [ "$server" = prosody ]; then ramp=$PROSODY_IDLE_RAMP; tls_ramp=$PROSODY_IDLE_TLS_RAMP; fi
    case "$kind" in chat-*) warmup "$server" "$kind" ;; esac
    case "$kind" in
        idle-plain)
            run_bench "$server" "$kind" "$label" idle "${plain[@]}" --sessions "$IDLE_SESSIONS" \
                --hold "$IDLE_HOLD" --ramp "$ramp" --procs "$PROCS" ;;
        idle-tls)
            # All three serve XEP-0368 direct TLS; STARTTLS would add a round trip, not memory.
            run_bench "$server" "$kind" "$label" idle --target "127.0.0.1:$TLS_PORT" --tls direct \
                --sessions "$IDLE_SESSIONS" --hold "$IDLE_HOLD" --ramp "$tls_ramp" --procs "$PROCS" ;;
        chat-sweep)
            run_bench "$server" "$kind" "$label" chat "${plain[@]}" --users "$CHAT_USERS" \
                --duration "$SWEEP_DURATION" --size 100 --sweep --p99-bound-ms "$P99_BOUND_MS" \
                --sweep-start "$SWEEP_START" --sweep-steps-max "$SWEEP_STEPS_MAX" ;;
        chat-fixed)
            run_bench "$server" "$kind" "$label" chat "${plain[@]}" --users "$CHAT_USERS" \
                --rate "$CHAT_RATE" --duration "$CHAT_DURATION" --size 100 ;;
        login)
            run_bench "$server" "$kind" "$label" login "${plain[@]}" --sessions "$LOGIN_SESSIONS" \
                --procs "$PROCS" ;;
        reconnect)
            run_bench "$server" "$kind" "$label" reconnect "${plain[@]}" --sessions "$RECONNECT_SESSIONS" \
                --procs "$PROCS" ;;
        *) echo "error: unknown scenario $kind" >&2; exit 2 ;;
    esac
}

# ---- main ---------------------------------------------------------------------------------
[ -x "$BENCH" ] || {
    echo "no bench at $BENCH: building (cargo build --release -p gateway -p bench)" >&2
    cargo build --release -p gateway -p bench
}
host_checks
IFS=, read -r -a server_list <<<"$SERVERS"
IFS=, read -r -a scenario_list <<<"$SCENARIOS"
log "results in $OUT; $USERS users; servers ${server_list[*]}; scenarios ${scenario_list[*]}"

for server in "${server_list[@]}"; do
    case "$server" in gateway|ejabberd|prosody) ;; *) echo "error: unknown server $server" >&2; exit 2 ;; esac
    log "==== $server"
    # A clean start: no TIME-WAIT sockets of the previous server on our ports.
    wait_port_free 90 "$C2S_PORT" "$TLS_PORT" || true
    "$PEERS/$server.sh" install >/dev/null
    "$PEERS/$server.sh" setup "$USERS"
    label=$(server_label "$server")
    echo "$server: $label" >> "$OUT/host.txt"
    if [ "$CHECK" = 1 ]; then
        start_server "$server"
        python3 "$PEERS/check_login.py" 127.0.0.1 "$C2S_PORT" >&2 || { echo "error: $server fails the login check" >&2; exit 1; }
        stop_server "$server"
    fi
    if [ "$RESTART" = 0 ]; then start_server "$server"; fi
    for kind in "${scenario_list[@]}"; do
        log "---- $server $kind"
        if [ "$RESTART" = 1 ]; then start_server "$server"; fi
        scenario "$server" "$kind" "$label"
        if [ "$RESTART" = 1 ]; then stop_server "$server"; fi
    done
    if [ "$RESTART" = 0 ]; then stop_server "$server"; fi
done

log "==== report"
python3 "$PEERS/report.py" "$OUT" --bound-ms "$P99_BOUND_MS" || echo "warning: report.py failed" >&2
sweeps=()
for s in "${server_list[@]}"; do
    if [ -s "$OUT/$s.chat-sweep.json" ]; then sweeps+=("$OUT/$s.chat-sweep.json"); fi
done
if [ ${#sweeps[@]} -gt 0 ]; then
    "$BENCH" plot "${sweeps[@]}" -o "$OUT/chat-sweep.svg" || echo "warning: bench plot failed" >&2
fi
if [ ${#FAILED_RUNS[@]} -gt 0 ]; then
    printf 'runs that did not exit cleanly:\n' >&2
    printf '  %s\n' "${FAILED_RUNS[@]}" >&2
fi
log "done: $OUT/table.md"
