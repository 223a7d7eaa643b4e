# Shared helpers for scripts/peers/*.sh (sourced, not run).

PEERS_ROOT="${PEERS_ROOT:-/tmp/peers}"
C2S_PORT="${C2S_PORT:-25222}"
TLS_PORT="${TLS_PORT:-25223}"
NOFILE="${NOFILE:-20000}"

die() { echo "error: $*" >&2; exit 1; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# port_open PORT: true when 127.0.0.1:PORT accepts a TCP connection.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# wait_port PORT TIMEOUT_S [PID [LOGFILE PATTERN]]: waits until the port accepts; fails on
# timeout, when PID dies, or when PATTERN (grep -E) shows up in LOGFILE.
wait_port() {
    local port=$1 timeout=$2 pid=${3:-} logfile=${4:-} pattern=${5:-} start=$SECONDS
    until port_open "$port"; do
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            echo "process $pid exited before port $port opened" >&2
            return 1
        fi
        if [ -n "$pattern" ] && grep -qiE "$pattern" "$logfile" 2>/dev/null; then
            echo "'$pattern' in $logfile" >&2
            return 1
        fi
        if (( SECONDS - start >= timeout )); then
            echo "port $port not open after ${timeout}s" >&2
            return 1
        fi
        sleep 0.2
    done
}

# wait_gone PID TIMEOUT_S: waits for PID to exit.
wait_gone() {
    local pid=$1 timeout=$2 start=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do
        (( SECONDS - start >= timeout )) && return 1
        sleep 0.2
    done
}

# selfsigned_cert DIR: DIR/localhost.crt, DIR/localhost.key, DIR/localhost.pem (both).
selfsigned_cert() {
    local dir=$1
    mkdir -p "$dir"
    [ -s "$dir/localhost.pem" ] && return 0
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=localhost" \
        -addext "subjectAltName=DNS:localhost" \
        -keyout "$dir/localhost.key" -out "$dir/localhost.crt" 2>/dev/null
    cat "$dir/localhost.crt" "$dir/localhost.key" > "$dir/localhost.pem"
    chmod 0640 "$dir/localhost.key" "$dir/localhost.pem"
}

# disable_distro_service NAME: the package's own service must not hold ports or run.
disable_distro_service() {
    local name=$1
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        systemctl disable --now "$name" >/dev/null 2>&1 || true
    else
        # No systemd running (containers): only the SysV links and a running instance.
        command -v update-rc.d >/dev/null && update-rc.d "$name" disable >/dev/null 2>&1 || true
        command -v systemctl >/dev/null && systemctl disable "$name" >/dev/null 2>&1 || true
        if [ -x "/etc/init.d/$name" ]; then "/etc/init.d/$name" stop >/dev/null 2>&1 || true; fi
    fi
}

# wait_port_free TIMEOUT_S PORT...: waits until no TCP socket in any state (TIME-WAIT included)
# uses the local ports. A listener without SO_REUSEADDR (or of another user than the previous
# server's SO_REUSEPORT sockets) cannot bind while TIME-WAIT sockets remain.
wait_port_free() {
    local timeout=$1 start=$SECONDS port busy; shift
    while :; do
        busy=0
        for port in "$@"; do
            if [ -n "$(ss -Htan "( sport = :$port )" 2>/dev/null | head -1)" ]; then busy=1; fi
        done
        [ "$busy" = 0 ] && return 0
        (( SECONDS - start >= timeout )) && { echo "ports $* still in use after ${timeout}s" >&2; return 1; }
        sleep 1
    done
}

# start_with_retry LAUNCH STOP LOGFILE PATTERN: runs the function LAUNCH (which starts the server
# in the background and sets the global JOB), waits for $C2S_PORT. If the server could not bind
# because TIME-WAIT sockets of the previous server hold the port (a listener binds over them only
# when both sides set SO_REUSEADDR, or SO_REUSEPORT under the same uid), waits for them to expire
# and tries once more. LOGFILE is truncated before each attempt.
start_with_retry() {
    local launch=$1 stop=$2 logfile=$3 pattern=$4 attempt
    for attempt in 1 2; do
        : > "$logfile"
        "$launch"
        if wait_port "$C2S_PORT" "$START_TIMEOUT" "$JOB" "$logfile" "$pattern"; then return 0; fi
        "$stop" >/dev/null 2>&1 || true
        if [ "$attempt" = 1 ] && [ -n "$(ss -Htan "( sport = :$C2S_PORT or sport = :$TLS_PORT )" | head -1)" ]; then
            log "port $C2S_PORT/$TLS_PORT held by TIME-WAIT sockets; waiting for them to expire, then retrying"
            wait_port_free 90 "$C2S_PORT" "$TLS_PORT" || true
            continue
        fi
        tail -20 "$logfile" >&2 || true
        return 1
    done
    return 1
}
