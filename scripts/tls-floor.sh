#!/usr/bin/env bash
# The TLS floor under a login: a storm of direct-TLS connections that do the TLS 1.3 handshake
# and close (`bench login --handshake-only`, no XMPP), against our gateway and against nginx's
# stream module (OpenSSL) terminating TLS with the same certificate and key on the same two
# cores, alternated round by round. Prints handshakes per server CPU-second (connections / the
# server's user+system CPU seconds over the run, all of its processes) and the medians.
# A login can cost no less than this floor; the gap between a login's cost and it is what the
# XMPP part (stream, SASL, bind, presence, storage) costs.
#
#   scripts/tls-floor.sh [--rounds 5] [--sessions 5000] [--procs 2] [--servers gateway,nginx,nginx-notickets]
#
# gateway: scripts/peers/gateway.sh with $GATEWAY_BIN, $GATEWAY_SHARDS (default nproc) shards, one
# session ticket per handshake (its default). nginx: `worker_processes` = the same count,
# `reuseport` (a listening socket per worker, as the gateway's shards have), TLS 1.3 only, the
# gateway's own certificate and key (made by its first start), `return "x"` (a byte, then
# close); its default session tickets (OpenSSL sends two per handshake); nginx-notickets: with
# `ssl_session_tickets off` (none). Needs nginx with the stream module (Debian:
# `apt-get install nginx-light libnginx-mod-stream`). Loopback only; every run is bounded by
# bench's own login timeout. Environment: PEERS_ROOT (default /tmp/peers), TLS_PORT,
# C2S_PORT, ADMIN_PORT (the gateway's), NGINX_PORT (default 25443), BENCH (default
# target/release/bench under $CARGO_TARGET_DIR).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
ROUNDS=5
SESSIONS=5000
PROCS=2
SERVERS=gateway,nginx,nginx-notickets
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) ROUNDS="$2"; shift 2 ;;
        --sessions) SESSIONS="$2"; shift 2 ;;
        --procs) PROCS="$2"; shift 2 ;;
        --servers) SERVERS="$2"; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "tls-floor: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
export PEERS_ROOT="${PEERS_ROOT:-/tmp/peers}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BENCH="${BENCH:-$TARGET_DIR/release/bench}"
NGINX_PORT="${NGINX_PORT:-25443}"
SHARDS="${GATEWAY_SHARDS:-$(nproc)}"
export GATEWAY_SHARDS="$SHARDS"
GW="$HERE/peers/gateway.sh"
OUT="$PEERS_ROOT/tls-floor"
mkdir -p "$OUT"
rm -f "$OUT"/*.rate
[ -x "$BENCH" ] || { echo "tls-floor: no bench at $BENCH (cargo build --release -p bench, or set BENCH)" >&2; exit 1; }
if [[ ",$SERVERS," == *",nginx"* ]]; then
    command -v nginx >/dev/null && [ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || {
        echo "tls-floor: needs nginx and its stream module: apt-get install nginx-light libnginx-mod-stream" >&2
        exit 1
    }
fi
# shellcheck source=peers/common.sh
. "$HERE/peers/common.sh"
TLS_PORT="${TLS_PORT:-25223}"

# The gateway makes its certificates at first start (ECDSA P-256, and Ed25519 for clients that
# offer it); nginx serves the same ones.
[ -d "$PEERS_ROOT/gateway/data" ] || "$GW" setup 1 >/dev/null
CERT="$PEERS_ROOT/gateway/data/tls/cert.pem"
KEY="$PEERS_ROOT/gateway/data/tls/key.pem"
if [ ! -e "$CERT" ]; then
    "$GW" start >/dev/null
    "$GW" stop >/dev/null
fi
[ -e "$CERT" ] || { echo "tls-floor: the gateway made no certificate at $CERT" >&2; exit 1; }
ED_CERT="$PEERS_ROOT/gateway/data/tls/cert-ed25519.pem"
ED_KEY="$PEERS_ROOT/gateway/data/tls/key-ed25519.pem"
NGINX_ED25519=
if [ -e "$ED_CERT" ] && [ -e "$ED_KEY" ]; then
    # Like the gateway, Ed25519 first for clients that offer it, whatever the client's order.
    NGINX_ED25519="ssl_certificate $ED_CERT; ssl_certificate_key $ED_KEY;
        ssl_prefer_server_ciphers on;
        ssl_conf_command SignatureAlgorithms ed25519:ECDSA+SHA256:ECDSA+SHA384;"
fi

cpu_ticks() { # sum of utime+stime of the given pids
    local t=0 p
    for p in "$@"; do
        [ -r "/proc/$p/stat" ] && t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo "$t"
}

nginx_start() { # $1: on|off (session tickets)
    local dir="$OUT/nginx"
    mkdir -p "$dir"
    cat > "$dir/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon on;
worker_processes $SHARDS;
worker_rlimit_nofile 19000;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 12000; }
stream {
    server {
        listen 127.0.0.1:$NGINX_PORT ssl reuseport backlog=4096;
        ssl_certificate $CERT;
        ssl_certificate_key $KEY;
        $NGINX_ED25519
        ssl_protocols TLSv1.3;
        ssl_session_tickets $1;
        return "x";
    }
}
EOF
    nginx -c "$dir/nginx.conf" -p "$dir" -e "$dir/error.log"
    for _ in $(seq 50); do
        [ -s "$dir/nginx.pid" ] && ss -ltn "sport = :$NGINX_PORT" | grep -q LISTEN && return 0
        sleep 0.1
    done
    echo "tls-floor: nginx did not start (see $dir/error.log)" >&2
    return 1
}

nginx_stop() {
    local pidf="$OUT/nginx/nginx.pid"
    [ -s "$pidf" ] || return 0
    local p; p=$(cat "$pidf")
    kill -QUIT "$p" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    rm -f "$pidf"
}
trap 'nginx_stop; "$GW" stop >/dev/null 2>&1 || true' EXIT

run_one() { # $1: server name, $2: round
    local name=$1 round=$2 port pids
    case "$name" in
        gateway)
            "$GW" start >/dev/null
            port=$TLS_PORT
            pids=$("$GW" pid)
            ;;
        nginx|nginx-notickets)
            if [ "$name" = nginx ]; then nginx_start on; else nginx_start off; fi
            port=$NGINX_PORT
            local master; master=$(cat "$OUT/nginx/nginx.pid")
            pids="$master $(pgrep -P "$master" | tr '\n' ' ')"
            ;;
        *) echo "tls-floor: unknown server $name (gateway, nginx, nginx-notickets)" >&2; exit 2 ;;
    esac
    # shellcheck disable=SC2086
    local t0; t0=$(cpu_ticks $pids)
    local json="$OUT/$name-$round.json"
    "$BENCH" login --target "127.0.0.1:$port" --tls direct --insecure --handshake-only \
        --sessions "$SESSIONS" --procs "$PROCS" --json "$json" >"$OUT/$name-$round.log" 2>&1 || true
    # shellcheck disable=SC2086
    local t1; t1=$(cpu_ticks $pids)
    case "$name" in gateway) "$GW" stop >/dev/null ;; *) nginx_stop ;; esac
    python3 - "$json" "$((t1 - t0))" "$(getconf CLK_TCK)" "$name" "$round" <<'PY'
import json, sys
path, ticks, hz, name, rnd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
try:
    c = json.load(open(path))["counts"]
except (OSError, ValueError, KeyError):
    print(f"{name} round {rnd}: bench wrote no report (see its log beside {path})")
    sys.exit(0)
cpu = ticks / hz
rate = c["established"] / cpu if cpu > 0 else 0
print(f"{name} round {rnd}: {c['established']} handshakes, {c['failed']} failed, "
      f"server cpu {cpu:.2f} s, {rate:.0f} handshakes per server CPU-second")
with open(path + ".rate", "w") as f:
    f.write(f"{rate:.0f}\n")
PY
}

IFS=, read -r -a names <<<"$SERVERS"
for round in $(seq "$ROUNDS"); do
    for name in "${names[@]}"; do
        run_one "$name" "$round"
    done
done
for name in "${names[@]}"; do
    cat "$OUT/$name"-[0-9]*.json.rate 2>/dev/null | sort -n | awk -v n="$name" '
        { v[NR] = $1 } END { if (NR) printf "%s: median %d handshakes per server CPU-second (%d rounds)\n", n, v[int((NR + 1) / 2)], NR }'
done
echo "reports: $OUT"
