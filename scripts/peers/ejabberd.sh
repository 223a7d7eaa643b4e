#!/usr/bin/env bash
# ejabberd as a benchmark peer: install | setup USERS | start | stop | pid | status
# Everything lives under /tmp/peers/ejabberd (config, spool, logs, cookie); /etc is not edited.
# Throttles lifted as /work/shared/PEERS.md says; every change is commented in the generated
# ejabberd.yml / ejabberdctl.cfg and listed in scripts/peers/CHANGES.md.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=common.sh
. "$HERE/common.sh"

NAME=ejabberd
DIR="$PEERS_ROOT/$NAME"
ETC="$DIR/etc"
SPOOL="$DIR/spool"
LOGDIR="$DIR/log"
RUN="$DIR/run"
HOMEDIR="$DIR/home"          # HOME of the node: its private .erlang.cookie
NODE="ejabberd-bench@localhost"
RUN_USER=ejabberd
START_TIMEOUT="${START_TIMEOUT:-90}"
STOP_TIMEOUT="${STOP_TIMEOUT:-30}"

usage() { echo "usage: $0 install | setup USERS | start | stop | pid | status" >&2; exit 2; }

# as_user CMD...: runs as the ejabberd user with setpriv (not su: pam_limits would reset
# the open-files limit to 1024), with the raised limit and the private HOME.
as_user() {
    ulimit -n "$NOFILE"
    setpriv --reuid="$RUN_USER" --regid="$RUN_USER" --init-groups \
        env HOME="$HOMEDIR" ERL_EPMD_ADDRESS=127.0.0.1 "$@"
}

ctl() {
    as_user ejabberdctl --config-dir "$ETC" --ctl-config "$ETC/ejabberdctl.cfg" \
        --logs "$LOGDIR" --spool "$SPOOL" "$@"
}

cmd_install() {
    if ! dpkg -s ejabberd >/dev/null 2>&1; then
        apt-get install -y -q ejabberd >/dev/null || { apt-get update -q >/dev/null; apt-get install -y -q ejabberd >/dev/null; }
    fi
    disable_distro_service ejabberd
    # The distro node (ejabberd@localhost) must not run alongside ours.
    dpkg-query -W -f='${Package} ${Version}\n' ejabberd erlang-base
}

version() { dpkg-query -W -f='${Version}' ejabberd 2>/dev/null | sed 's/-[^-]*$//'; }

write_config() {
    mkdir -p "$ETC" "$SPOOL" "$LOGDIR" "$RUN" "$HOMEDIR"
    selfsigned_cert "$ETC"
    cp /etc/ejabberd/inetrc "$ETC/inetrc"
    # A fixed cookie: only this node and our bulk-register call use it.
    [ -s "$HOMEDIR/.erlang.cookie" ] || head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$HOMEDIR/.erlang.cookie"
    chmod 0400 "$HOMEDIR/.erlang.cookie"

    cat > "$ETC/ejabberdctl.cfg" <<CFG
# ejabberdctl.cfg for the benchmark node. Debian default: /etc/ejabberd/ejabberdctl.cfg.
# CHANGED: ERL_MAX_PORTS raised from 32000 (ports = sockets + files; 19k sessions + margin).
ERL_MAX_PORTS=65536
# CHANGED: ERL_PROCESSES raised from 250000 (each session is several Erlang processes).
ERL_PROCESSES=1000000
# Same as Debian.
ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"
# CHANGED: a private node name, pid file and config path (Debian: ejabberd@localhost, /run, /etc).
ERLANG_NODE=$NODE
EJABBERD_PID_PATH=$RUN/ejabberd.pid
EJABBERD_CONFIG_PATH=$ETC/ejabberd.yml
CONTRIB_MODULES_CONF_DIR=/etc/ejabberd/modules.d
# CHANGED: Erlang distribution on loopback only (Debian: all interfaces).
INET_DIST_INTERFACE=127.0.0.1
EJABBERD_BYPASS_WARNINGS=true
CFG

    cat > "$ETC/ejabberd.yml" <<YML
# ejabberd $(version) benchmark config, derived from Debian's /etc/ejabberd/ejabberd.yml.
# Every line that differs from the Debian default says "CHANGED" and why.
# See scripts/peers/CHANGES.md.

# CHANGED: warning instead of info: no per-connection log lines under load.
loglevel: warning
log_rotate_count: 0
hosts:
  - localhost
# CHANGED: our self-signed cert for CN=localhost (Debian: /etc/ejabberd/ejabberd.pem).
certfiles:
  - "$ETC/localhost.pem"

define_macro:
  'TLS_CIPHERS': "HIGH:!aNULL:!eNULL:!3DES:@STRENGTH"
  'TLS_OPTIONS':
    - "no_sslv3"
    - "no_tlsv1"
    - "no_tlsv1_1"
    - "cipher_server_preference"
    - "no_compression"
c2s_ciphers: 'TLS_CIPHERS'
s2s_ciphers: 'TLS_CIPHERS'
c2s_protocol_options: 'TLS_OPTIONS'
s2s_protocol_options: 'TLS_OPTIONS'

# CHANGED: raised from 10000 (messages queued per session process before it is killed).
max_fsm_queue: 1000000

listen:
  # CHANGED: 127.0.0.1:$C2S_PORT (Debian: [::]:5222).
  -
    port: $C2S_PORT
    ip: "127.0.0.1"
    module: ejabberd_c2s
    max_stanza_size: 262144
    # CHANGED: no shaper (Debian: c2s_shaper, "normal" = 3000 B/s for non-admins).
    shaper: none
    access: c2s
    # CHANGED: STARTTLS offered, not required, so that benchmarks can also run plaintext.
    starttls: true
    starttls_required: false
    protocol_options: 'TLS_OPTIONS'
    # CHANGED: listen backlog raised from 5.
    backlog: 4096
    # CHANGED: per-listener queue bound raised (see max_fsm_queue).
    max_fsm_queue: 1000000
  # CHANGED: direct TLS (XEP-0368) on 127.0.0.1:$TLS_PORT (Debian: [::]:5223).
  -
    port: $TLS_PORT
    ip: "127.0.0.1"
    module: ejabberd_c2s
    max_stanza_size: 262144
    shaper: none
    access: c2s
    tls: true
    protocol_options: 'TLS_OPTIONS'
    backlog: 4096
    max_fsm_queue: 1000000
  # CHANGED: no s2s (5269), HTTP (5280, 5443), STUN (3478) or MQTT (1883) listeners:
  # a loopback c2s benchmark does not use them and they would bind public interfaces.

disable_sasl_mechanisms:
  - "digest-md5"
  - "X-OAUTH2"
s2s_use_starttls: required

# CHANGED: plain stored passwords (Debian: scram). Trap: starting once with scram converts the
# stored passwords for good; a scram variant needs its own spool.
auth_method: internal
auth_password_format: plain

acl:
  admin:
     user:
       - ""
  local:
    user_regexp: ""
  loopback:
    ip:
      - 127.0.0.0/8
      - ::1/128

access_rules:
  local:
    allow: local
  c2s:
    deny: blocked
    allow: all
  announce:
    allow: admin
  configure:
    allow: admin
  muc_create:
    allow: local
  pubsub_createnode:
    allow: local
  trusted_network:
    allow: loopback

api_permissions:
  "console commands":
    from:
      - ejabberd_ctl
    who: all
    what: "*"

shaper:
  normal:
    rate: 3000
    burst_size: 20000
  fast: 200000

shaper_rules:
  max_user_sessions: 10
  # CHANGED: raised from 100 (5000 for admins).
  max_user_offline_messages: 100000
  # CHANGED: none for everyone (Debian: none for admin, normal = 3000 B/s for all others).
  c2s_shaper: none
  s2s_shaper: fast

modules:
  mod_adhoc: {}
  mod_admin_extra: {}
  mod_announce:
    access: announce
  mod_avatar: {}
  mod_blocking: {}
  mod_bosh: {}
  mod_caps: {}
  mod_carboncopy: {}
  mod_client_state: {}
  mod_configure: {}
  mod_disco: {}
  # CHANGED: mod_fail2ban removed (it bans an IP after repeated auth failures; all our clients
  # share 127.0.0.x).
  mod_http_api: {}
  mod_last: {}
  mod_mqtt: {}
  mod_muc:
    access:
      - allow
    access_admin:
      - allow: admin
    access_create: muc_create
    access_persistent: muc_create
    access_mam:
      - allow
    default_room_options:
      mam: true
  mod_muc_admin: {}
  mod_offline:
    access_max_user_messages: max_user_offline_messages
  mod_ping: {}
  mod_pres_counter:
    count: 5
    interval: 60
  mod_privacy: {}
  mod_private: {}
  mod_pubsub:
    access_createnode: pubsub_createnode
    plugins:
      - flat
      - pep
    force_node_config:
      "eu.siacs.conversations.axolotl.*":
        access_model: open
      storage:bookmarks:
        access_model: whitelist
  mod_push: {}
  mod_push_keepalive: {}
  mod_roster:
    versioning: true
  mod_s2s_dialback: {}
  mod_shared_roster: {}
  mod_sic: {}
  mod_stream_mgmt:
    resend_on_timeout: if_offline
  mod_stun_disco: {}
  mod_vcard:
    search: false
  mod_vcard_xupdate: {}
  mod_version: {}
YML
    chown -R "$RUN_USER:" "$DIR"
}

server_pid() {
    local p
    if [ -s "$RUN/ejabberd.pid" ]; then
        p=$(cat "$RUN/ejabberd.pid")
        if kill -0 "$p" 2>/dev/null; then echo "$p"; return 0; fi
    fi
    p=$(pgrep -f -- "beam.smp.*-sname $NODE" | head -1 || true)
    [ -z "$p" ] && p=$(pgrep -f -- "beam.smp.*$NODE" | head -1 || true)
    [ -n "$p" ] && { echo "$p"; return 0; }
    return 1
}

ej_launch() {
    rm -f "$RUN/ejabberd.pid"
    # foreground in a background job: the beam's stdout goes to our log, no su, our ulimit.
    ( cd "$SPOOL" && ctl foreground ) >>"$LOGDIR/console.log" 2>&1 < /dev/null &
    JOB=$!
}

cmd_start() {
    [ -f "$ETC/ejabberd.yml" ] || die "run '$0 setup USERS' first"
    if server_pid >/dev/null; then die "already running (pid $(server_pid))"; fi
    port_open "$C2S_PORT" && die "port $C2S_PORT is taken by another process"
    start_with_retry ej_launch cmd_stop "$LOGDIR/console.log" "eaddrinuse|Failed to start ejabberd" \
        || { tail -20 "$LOGDIR/ejabberd.log" >&2 2>/dev/null || true; die "ejabberd did not start"; }
    # ejabberd opens listeners before the node is fully started; wait for "started".
    local i
    for i in $(seq 1 60); do
        ctl status >/dev/null 2>&1 && break
        sleep 0.5
    done
    log "ejabberd $(version) up on 127.0.0.1:$C2S_PORT (direct TLS $TLS_PORT), pid $(server_pid)"
}

cmd_stop() {
    local p
    p=$(server_pid) || { log "ejabberd not running"; return 0; }
    timeout "$STOP_TIMEOUT" bash -c "$(declare -f as_user ctl); $(declare -p NOFILE RUN_USER HOMEDIR ETC LOGDIR SPOOL); ctl stop" >/dev/null 2>&1 || true
    if ! wait_gone "$p" "$STOP_TIMEOUT"; then
        log "ejabberd pid $p did not stop in ${STOP_TIMEOUT}s: SIGKILL"
        kill -9 "$p" 2>/dev/null || true
        wait_gone "$p" 5 || true
    fi
    # epmd was started for our node; stop it when no other node is registered.
    if command -v epmd >/dev/null && ! epmd -names 2>/dev/null | grep -q '^name '; then
        epmd -kill >/dev/null 2>&1 || true
    fi
    rm -f "$RUN/ejabberd.pid"
    log "ejabberd stopped"
}

# Bulk registration: one Erlang VM, one rpc per user, instead of one VM per
# `ejabberdctl register` (~0.5 s each).
bulk_register() {
    local users=$1
    local eval
    # 16 workers in parallel: each registration is a small mnesia transaction; one rpc at a
    # time is bound by the round trip.
    eval="N = $users, Node = '$NODE', W = 16, Self = self(),
Reg = fun(I) ->
        U = list_to_binary(\"user\" ++ integer_to_list(I)),
        case rpc:call(Node, ejabberd_auth, try_register, [U, <<\"localhost\">>, <<\"pw\">>]) of
            ok -> 1;
            {error, exists} -> 1;
            Other -> io:format(\"register ~s: ~p~n\", [U, Other]), 0
        end
    end,
[spawn_link(fun() -> Self ! {done, lists:sum([Reg(I) || I <- lists:seq(K, N, W)])} end)
 || K <- lists:seq(1, W)],
R = lists:sum([receive {done, C} -> C after 600000 -> 0 end || _ <- lists:seq(1, W)]),
io:format(\"registered ~p of ~p~n\", [R, N]),
halt(case R of N -> 0; _ -> 1 end)."
    as_user erl -sname "reg$$@localhost" -hidden -noshell -eval "$eval"
}

cmd_setup() {
    local users=${1:-}
    [[ "$users" =~ ^[0-9]+$ ]] || usage
    if server_pid >/dev/null; then cmd_stop; fi
    command -v ejabberdctl >/dev/null || die "ejabberd is not installed: $0 install"
    # A fresh spool each setup: the mnesia schema belongs to the node name and the password
    # format must never have been scram.
    rm -rf "$SPOOL" "$LOGDIR" "$RUN"
    write_config
    cmd_start
    local t0=$SECONDS
    bulk_register "$users"
    log "registered user1..user$users in $((SECONDS - t0)) s"
    cmd_stop
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
