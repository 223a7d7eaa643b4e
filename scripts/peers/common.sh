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

# wait_port PORT TIMEOUT_S [PID]: waits until the port accepts; fails on timeout or when PID dies.
wait_port() {
    local port=$1 timeout=$2 pid=${3:-} start=$SECONDS
    until port_open "$port"; do
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            echo "process $pid exited before port $port opened" >&2
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
