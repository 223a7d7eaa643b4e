#!/usr/bin/env bash
# Prosody as a benchmark peer: install | setup USERS | start | stop | pid | status
# Everything lives under /tmp/peers/prosody (config, data, certs, logs); /etc is not edited.
# Throttles lifted as /work/shared/PEERS.md says; every change is commented in the generated
# prosody.cfg.lua and listed in scripts/peers/CHANGES.md.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=common.sh
. "$HERE/common.sh"

NAME=prosody
DIR="$PEERS_ROOT/$NAME"
CFG="$DIR/prosody.cfg.lua"
DATA="$DIR/data"
CERTS="$DIR/certs"
LOGDIR="$DIR/log"
RUN="$DIR/run"
RUN_USER=prosody
START_TIMEOUT="${START_TIMEOUT:-30}"
STOP_TIMEOUT="${STOP_TIMEOUT:-20}"

usage() { echo "usage: $0 install | setup USERS | start | stop | pid | status" >&2; exit 2; }

cmd_install() {
    if ! dpkg -s prosody >/dev/null 2>&1; then
        apt-get install -y -q prosody >/dev/null || { apt-get update -q >/dev/null; apt-get install -y -q prosody >/dev/null; }
    fi
    disable_distro_service prosody
    dpkg-query -W -f='${Package} ${Version}\n' prosody
    lua5.4 -v 2>&1 || true
}

version() { dpkg-query -W -f='${Version}' prosody 2>/dev/null | sed 's/-[^-]*$//'; }

write_config() {
    mkdir -p "$DATA" "$CERTS" "$LOGDIR" "$RUN"
    selfsigned_cert "$CERTS"
    cat > "$CFG" <<LUA
-- Prosody $(version) benchmark config, derived from Debian's /etc/prosody/prosody.cfg.lua.
-- Every line that differs from the Debian default says "CHANGED" and why.
-- See scripts/peers/CHANGES.md.

admins = { }
plugin_paths = { "/usr/local/lib/prosody/modules" }

modules_enabled = {
	"disco";
	"roster";
	"saslauth";
	"tls";
	"blocklist";
	"bookmarks";
	"carbons";
	"dialback";
	-- CHANGED: "limits" removed (Debian limits c2s to 10 kB/s per connection).
	"pep";
	"private";
	"smacks";
	"vcard4";
	"vcard_legacy";
	"csi_simple";
	"invites";
	"invites_adhoc";
	"invites_register";
	"ping";
	"register";
	"time";
	"uptime";
	"version";
	"admin_adhoc";
	"admin_shell";
	"posix";
}
modules_disabled = { }

-- CHANGED: private pid file and data directory (Debian: /run/prosody, /var/lib/prosody).
pidfile = "$RUN/prosody.pid";
data_path = "$DATA";

s2s_secure_auth = true

-- CHANGED: loopback only (Debian: all interfaces), c2s on $C2S_PORT (Debian 5222),
-- direct TLS (XEP-0368) on $TLS_PORT (Debian: none), no s2s listener (Debian 5269).
interfaces = { "127.0.0.1" }
c2s_ports = { $C2S_PORT }
c2s_direct_tls_ports = { $TLS_PORT }
s2s_ports = { }

-- CHANGED: TLS offered but not required, PLAIN allowed in the clear: benchmarks only
-- (Debian: c2s_require_encryption = true, allow_unencrypted_plain_auth = false).
c2s_require_encryption = false
allow_unencrypted_plain_auth = true

-- CHANGED: epoll backend stated explicitly, accept backlog raised from 128.
network_backend = "epoll"
network_settings = {
	tcp_backlog = 4096;
}

-- CHANGED: plain stored passwords (Debian: internal_hashed, SCRAM-SHA-1 10000 iterations).
authentication = "internal_plain"
storage = "internal"

archive_expires_after = "1w"

-- CHANGED: warnings and errors to a file under $LOGDIR (Debian: info to /var/log/prosody).
log = {
	warn = "$LOGDIR/prosody.log";
}

-- CHANGED: our self-signed cert for localhost (Debian: the certs directory in /etc/prosody).
certificates = "$CERTS"
ssl = {
	certificate = "$CERTS/localhost.crt";
	key = "$CERTS/localhost.key";
}

VirtualHost "localhost"
	ssl = {
		certificate = "$CERTS/localhost.crt";
		key = "$CERTS/localhost.key";
	}
-- CHANGED: no Include of /etc/prosody/conf.d (Debian includes conf.d/*.cfg.lua).
LUA
}

# Accounts straight into the `internal` storage files (prosodyctl register: ~0.3 s per user).
bulk_register() {
    local users=$1 dir="$DATA/localhost/accounts"
    mkdir -p "$dir"
    ( cd "$dir" && for ((i = 1; i <= users; i++)); do
        printf 'return {\n\t["password"] = "pw";\n};\n' > "user$i.dat"
    done )
}

server_pid() {
    local p
    if [ -s "$RUN/prosody.pid" ]; then
        p=$(cat "$RUN/prosody.pid")
        if kill -0 "$p" 2>/dev/null; then echo "$p"; return 0; fi
    fi
    p=$(pgrep -f -- "lua.*prosody.*--config $CFG" | head -1 || true)
    [ -n "$p" ] && { echo "$p"; return 0; }
    return 1
}

pr_launch() {
    rm -f "$RUN/prosody.pid"
    chown -R "$RUN_USER:" "$LOGDIR"
    # setpriv, not su: pam_limits would reset the open-files limit. -F: foreground, so the
    # job is the lua process itself (setpriv and env exec).
    (
        ulimit -n "$NOFILE"
        exec setpriv --reuid="$RUN_USER" --regid="$RUN_USER" --init-groups \
            env HOME="$DIR" prosody -F --config "$CFG"
    ) >>"$LOGDIR/console.log" 2>&1 < /dev/null &
    JOB=$!
}

cmd_start() {
    [ -f "$CFG" ] || die "run '$0 setup USERS' first"
    if server_pid >/dev/null; then die "already running (pid $(server_pid))"; fi
    port_open "$C2S_PORT" && die "port $C2S_PORT is taken by another process"
    chown -R "$RUN_USER:" "$DIR"
    start_with_retry pr_launch cmd_stop "$LOGDIR/prosody.log" "Failed to open server port" \
        || { tail -20 "$LOGDIR/console.log" >&2 2>/dev/null || true; die "prosody did not start"; }
    log "prosody $(version) up on 127.0.0.1:$C2S_PORT (direct TLS $TLS_PORT), pid $(server_pid)"
}

cmd_stop() {
    local p
    p=$(server_pid) || { log "prosody not running"; return 0; }
    kill -TERM "$p" 2>/dev/null || true
    if ! wait_gone "$p" "$STOP_TIMEOUT"; then
        log "prosody pid $p did not stop in ${STOP_TIMEOUT}s: SIGKILL"
        kill -9 "$p" 2>/dev/null || true
        wait_gone "$p" 5 || true
    fi
    rm -f "$RUN/prosody.pid"
    log "prosody stopped"
}

cmd_setup() {
    local users=${1:-}
    [[ "$users" =~ ^[0-9]+$ ]] || usage
    if server_pid >/dev/null; then cmd_stop; fi
    command -v prosody >/dev/null || die "prosody is not installed: $0 install"
    # Fresh data each setup: Prosody slows down on a long-lived instance (PEERS.md).
    rm -rf "$DATA" "$LOGDIR" "$RUN"
    write_config
    local t0=$SECONDS
    bulk_register "$users"
    chown -R "$RUN_USER:" "$DIR"
    log "wrote user1..user$users (internal_plain) in $((SECONDS - t0)) s"
}

case "${1:-}" in
    install) cmd_install ;;
    setup) shift; cmd_setup "$@" ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    pid) server_pid || { echo "not running" >&2; exit 1; } ;;
    status) if p=$(server_pid); then echo "running pid $p"; else echo "stopped"; exit 1; fi ;;
    version) version; echo ;;
    *) usage ;;
esac
