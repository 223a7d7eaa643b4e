#!/usr/bin/env bash
# Our gateway with the same interface as ejabberd.sh / prosody.sh:
#   install | setup USERS | start | stop | pid | status | version
# Data under /tmp/peers/gateway. Environment: GATEWAY_BIN (default target/release/gateway,
# under $CARGO_TARGET_DIR when set), GATEWAY_SHARDS (default nproc), GATEWAY_CPUS (e.g. 0,1),
# GATEWAY_LABEL_SUFFIX, GATEWAY_CONFIG (a TOML config file passed with --config).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
# shellcheck source=common.sh
. "$HERE/common.sh"

NAME=gateway
DIR="$PEERS_ROOT/$NAME"
DATA="$DIR/data"
LOGDIR="$DIR/log"
RUN="$DIR/run"
ADMIN_PORT="${ADMIN_PORT:-25280}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
GATEWAY_BIN="${GATEWAY_BIN:-$TARGET_DIR/release/gateway}"
SHARDS="${GATEWAY_SHARDS:-$(nproc)}"
CPUS="${GATEWAY_CPUS:-}"
CONFIG="${GATEWAY_CONFIG:-}"
START_TIMEOUT="${START_TIMEOUT:-30}"
STOP_TIMEOUT="${STOP_TIMEOUT:-15}"

usage() { echo "usage: $0 install | setup USERS | start | stop | pid | status | version" >&2; exit 2; }

cmd_install() {
    if [ ! -x "$GATEWAY_BIN" ]; then
        log "building $GATEWAY_BIN (cargo build --release -p gateway -p bench)"
        ( cd "$ROOT" && cargo build --release -p gateway -p bench )
    fi
    "$GATEWAY_BIN" --version
}

version() { "$GATEWAY_BIN" --version 2>/dev/null | awk '{print $2}'; }

cmd_setup() {
    local users=${1:-}
    [[ "$users" =~ ^[0-9]+$ ]] || usage
    [ -x "$GATEWAY_BIN" ] || die "no gateway binary at $GATEWAY_BIN: $0 install"
    if server_pid >/dev/null; then cmd_stop; fi
    rm -rf "$DATA" "$LOGDIR" "$RUN"
    mkdir -p "$DATA" "$LOGDIR" "$RUN"
    local t0=$SECONDS
    # 64 PBKDF2 iterations: the peers store plain passwords; this keeps login cost comparable.
    "$GATEWAY_BIN" --data-dir "$DATA" --scram-iterations 64 --log-level warn \
        user bulk-add --prefix user --count "$users" --password pw
    log "added user1..user$users in $((SECONDS - t0)) s"
}

server_pid() {
    local p
    if [ -s "$RUN/gateway.pid" ]; then
        p=$(cat "$RUN/gateway.pid")
        if kill -0 "$p" 2>/dev/null; then echo "$p"; return 0; fi
    fi
    return 1
}

gw_launch() {
    (
        ulimit -n "$NOFILE"
        # glommio pins io_uring memory: locked-memory limit.
        ulimit -l unlimited 2>/dev/null || ulimit -l 65536 2>/dev/null || true
        exec "$GATEWAY_BIN" "${GW_ARGS[@]}"
    ) >>"$LOGDIR/gateway.log" 2>&1 < /dev/null &
    JOB=$!
    echo "$JOB" > "$RUN/gateway.pid"
}

cmd_start() {
    [ -d "$DATA" ] || die "run '$0 setup USERS' first"
    if server_pid >/dev/null; then die "already running (pid $(server_pid))"; fi
    port_open "$C2S_PORT" && die "port $C2S_PORT is taken by another process"
    local args=(--data-dir "$DATA" --shards "$SHARDS" --log-level warn serve
        --c2s-addr "127.0.0.1:$C2S_PORT" --tls-addr "127.0.0.1:$TLS_PORT"
        --admin-addr "127.0.0.1:$ADMIN_PORT" --allow-plaintext)
    [ -n "$CPUS" ] && args+=(--cpus "$CPUS")
    [ -n "$CONFIG" ] && args=(--config "$CONFIG" "${args[@]}")
    GW_ARGS=("${args[@]}")
    start_with_retry gw_launch cmd_stop "$LOGDIR/gateway.log" "cannot listen" || die "gateway did not start"
    log "gateway $(version) up on 127.0.0.1:$C2S_PORT (direct TLS $TLS_PORT), $SHARDS shards${CPUS:+ on CPUs $CPUS}, pid $JOB"
}

cmd_stop() {
    local p
    p=$(server_pid) || { log "gateway not running"; return 0; }
    kill -TERM "$p" 2>/dev/null || true
    if ! wait_gone "$p" "$STOP_TIMEOUT"; then
        log "gateway pid $p did not stop in ${STOP_TIMEOUT}s: SIGKILL"
        kill -9 "$p" 2>/dev/null || true
        wait_gone "$p" 5 || true
    fi
    rm -f "$RUN/gateway.pid"
    log "gateway stopped"
}

case "${1:-}" in
    install) cmd_install ;;
    setup) shift; cmd_setup "$@" ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    pid) server_pid || { echo "not running" >&2; exit 1; } ;;
    status) if p=$(server_pid); then echo "running pid $p"; else echo "stopped"; exit 1; fi ;;
    version) version ;;
    *) usage ;;
esac
