#!/usr/bin/env bash
# Login storm cost of two values of one config key, alternated: for each round and value, a fresh
# gateway, then `bench login` (SESSIONS users at once) with the server's pid; prints logins per
# server CPU-second (established logins / server user+system CPU seconds) per run and the medians.
# With --bench-flags it alternates the client instead: `bench login` with each flag of the comma
# list in turn (`-` for none), e.g. `-,--sasl2,--sasl2-pipelined`, against the same gateway build
# with its default config; runs are named after the flags (`none`, `sasl2`, ...). With --bins it
# alternates two gateway binaries (default config; runs named a and b), e.g. before and after a
# change. Besides logins per server CPU-second (the whole run, teardown included) it prints the
# same for the logins alone (server CPU until every session was logged in and held), the
# teardown's CPU per session, and the medians of the server's user and system CPU per login.
# An entry of --bench-flags may join several flags with `+` (`--sasl2+--device-keys`, run named
# `sasl2+device-keys`). `--device-keys`, there or as an option of this script (then for every
# run), gives each user a device key after setup (`gateway user add-device-key`) and logs in
# with it (`bench login --password-file`): SASL PLAIN with a high-entropy secret, no PBKDF2.
# With --bins the first binary to start makes the data dir's TLS certificates, which both then
# serve: a build that makes the ECDSA one only (before the Ed25519 pair) leaves the other build
# without its Ed25519 certificate, so list the newer build first when comparing across that.
# --bench-args (or --client-flag) passes more `bench login` arguments to every run (e.g. `--sasl2` with --bins). --bench-cpus runs the client under `taskset -c LIST` (unpinned threads)
# so that, with GATEWAY_CPUS and GATEWAY_SHARDS, server and client sit on different CPUs: a
# per-core figure, e.g. GATEWAY_SHARDS=1 GATEWAY_CPUS=1 ... --bench-cpus 0.
#
#   scripts/login-ab.sh [--key io_engine] [--values uring,tasks] [--rounds 3] [--sessions 5000]
#                       [--tls direct|none|starttls] [--procs 2] [--out DIR]
#                       [--bench-flags LIST | --bins GATEWAY_A,GATEWAY_B]
#                       [--bench-args "ARGS"] [--bench-cpus LIST] [--device-keys]
#
# Each value is written as a TOML string (`KEY = "VALUE"`), numbers and booleans bare. Binaries: $GATEWAY_BIN and $BENCH
# (default target/release/{gateway,bench} under $CARGO_TARGET_DIR). Users are made with
# `scripts/peers/gateway.sh setup` (64 SCRAM iterations) under $PEERS_ROOT (default /tmp/peers).
# Loopback only; every run is bounded by bench's own login timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PEERS="$ROOT/scripts/peers"

KEY=io_engine
VALUES=uring,tasks
ROUNDS=3
SESSIONS=5000
TLS=direct
PROCS=2
OUT="/tmp/login-ab-$(date +%Y%m%d-%H%M%S)"
BENCH_FLAGS=
BINS=
BENCH_ARGS=
BENCH_CPUS=
DEVICE_KEYS=
while [ $# -gt 0 ]; do
    case "$1" in
        --key) KEY=$2; shift 2 ;;
        --values) VALUES=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --sessions) SESSIONS=$2; shift 2 ;;
        --tls) TLS=$2; shift 2 ;;
        --procs) PROCS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --bench-flags) BENCH_FLAGS=$2; shift 2 ;;
        --bins) BINS=$2; shift 2 ;;
        --bench-args|--client-flag) BENCH_ARGS=$2; shift 2 ;;
        --bench-cpus) BENCH_CPUS=$2; shift 2 ;;
        --device-keys) DEVICE_KEYS=1; shift ;;
        -h|--help) sed -n '2,32p' "$0" >&2; exit 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
BENCH="${BENCH:-$TARGET_DIR/release/bench}"
export GATEWAY_BIN="${GATEWAY_BIN:-$TARGET_DIR/release/gateway}"
export PEERS_ROOT="${PEERS_ROOT:-/tmp/peers}"
export C2S_PORT="${C2S_PORT:-25222}" TLS_PORT="${TLS_PORT:-25223}" ADMIN_PORT="${ADMIN_PORT:-25280}"
mkdir -p "$OUT"
case "$TLS" in
    direct) port=$TLS_PORT; tls_args=(--insecure) ;;
    starttls) port=$C2S_PORT; tls_args=(--insecure) ;;
    none) port=$C2S_PORT; tls_args=() ;;
    *) echo "--tls takes direct, starttls or none" >&2; exit 2 ;;
esac
if [ -n "$BINS" ] && [ -n "$BENCH_FLAGS" ]; then
    echo "--bins and --bench-flags do not go together: alternate one thing at a time" >&2
    exit 2
fi
IFS=, read -ra values <<< "$VALUES"
read -ra extra_args <<< "$BENCH_ARGS"
runner=()
if [ -n "$BENCH_CPUS" ]; then
    runner=(taskset -c "$BENCH_CPUS")
    extra_args+=(--no-pin)
fi
declare -A bin_of=()
if [ -n "$BINS" ]; then
    IFS=, read -r bin_a bin_b <<< "$BINS"
    [ -x "$bin_a" ] && [ -x "$bin_b" ] || { echo "--bins takes two gateway binaries: A,B" >&2; exit 2; }
    values=(a b)
    bin_of=([a]="$bin_a" [b]="$bin_b")
    export GATEWAY_BIN="$bin_a"
    echo "a = $bin_a, b = $bin_b" | tee "$OUT/bins.txt"
fi
"$PEERS/gateway.sh" setup "$SESSIONS"
case ",$BENCH_FLAGS," in *--device-keys[,+]*) DEVICE_KEYS=${DEVICE_KEYS:-some} ;; esac
if [ -n "$DEVICE_KEYS" ]; then
    # One key per user, made while the gateway is stopped; bench reads `NODE SECRET` lines.
    seq -f 'user%g' "$SESSIONS" > "$OUT/users.txt"
    # shellcheck disable=SC2046 # one argument per user
    "$GATEWAY_BIN" --data-dir "$PEERS_ROOT/gateway/data" --log-level warn \
        user add-device-key $(cat "$OUT/users.txt") > "$OUT/keys.txt" 2>/dev/null
    paste -d' ' "$OUT/users.txt" "$OUT/keys.txt" > "$OUT/passwords.txt"
    [ "$(wc -l < "$OUT/passwords.txt")" -eq "$SESSIONS" ] || { echo "making device keys failed" >&2; exit 1; }
    [ "$DEVICE_KEYS" = 1 ] && extra_args+=(--password-file "$OUT/passwords.txt")
fi
if [ -n "$BENCH_FLAGS" ]; then
    IFS=, read -ra bench_flags <<< "$BENCH_FLAGS"
    values=()
    for f in "${bench_flags[@]}"; do
        name=${f//--/}
        [ "$f" = - ] && name=none
        values+=("$name")
    done
fi
for round in $(seq 1 "$ROUNDS"); do
    for v in "${values[@]}"; do
        flag=()
        if [ -n "$BENCH_FLAGS" ]; then
            : > "$OUT/$v.toml"
            if [ "$v" != none ]; then
                IFS=+ read -ra names <<< "$v"
                for n in "${names[@]}"; do
                    if [ "$n" = device-keys ]; then
                        flag+=(--password-file "$OUT/passwords.txt")
                    else
                        flag+=("--$n")
                    fi
                done
            fi
        elif [ -n "$BINS" ]; then
            : > "$OUT/$v.toml"
            export GATEWAY_BIN="${bin_of[$v]}"
        else
            # Numbers and booleans bare (`uring_recv_buffers = 1024`), anything else a string.
            if [[ "$v" =~ ^([0-9]+|true|false)$ ]]; then
                printf '%s = %s\n' "$KEY" "$v" > "$OUT/$v.toml"
            else
                printf '%s = "%s"\n' "$KEY" "$v" > "$OUT/$v.toml"
            fi
        fi
        GATEWAY_CONFIG="$OUT/$v.toml" "$PEERS/gateway.sh" start
        pid=$("$PEERS/gateway.sh" pid)
        echo "bench login flags: ${flag[*]-} ${extra_args[*]-}" > "$OUT/$v-$round.log"
        ${runner[@]+"${runner[@]}"} "$BENCH" login --target "127.0.0.1:$port" --tls "$TLS" "${tls_args[@]}" \
            ${flag[@]+"${flag[@]}"} ${extra_args[@]+"${extra_args[@]}"} \
            --sessions "$SESSIONS" --procs "$PROCS" --server-pid "$pid" \
            --json "$OUT/$v-$round.json" >> "$OUT/$v-$round.log" 2>&1 || true
        "$PEERS/gateway.sh" stop
    done
done
LOGIN_AB_TLS="$TLS" python3 - "$OUT" "$ROUNDS" "${values[@]}" <<'EOF'
import json, os, statistics, sys
out, rounds, values = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
for v in values:
    rates, held_rates, users, systems, teardowns = [], [], [], [], []
    for r in range(1, rounds + 1):
        try:
            j = json.load(open(f"{out}/{v}-{r}.json"))
        except (OSError, ValueError):
            print(f"{v} round {r}: no report (see {out}/{v}-{r}.log)")
            continue
        s = j["server"]
        cpu = s["cpu_user_seconds"] + s["cpu_system_seconds"]
        # The CPU until every login was held: the logins without their teardown (older bench
        # builds do not report it).
        held = (s.get("cpu_user_seconds_to_held") or 0) + (s.get("cpu_system_seconds_to_held") or 0)
        est = j["counts"]["established"]
        rates.append(est / cpu if cpu else 0.0)
        if held:
            held_rates.append(est / held)
        if est:
            users.append(s["cpu_user_seconds"] / est * 1e6)
            systems.append(s["cpu_system_seconds"] / est * 1e6)
            if held:
                teardowns.append((cpu - held) / est * 1e6)
        line = (f"{v} round {r}: {est} logins, {j['counts']['failed']} failed, "
                f"server cpu {cpu:.2f} s, {rates[-1]:.0f} logins per server CPU-second")
        if held:
            line += f" ({held_rates[-1]:.0f} until held)"
        line += f", {j['rates']['sessions_per_second']:.0f} logins/s"
        if os.environ.get("LOGIN_AB_TLS") != "none":
            # Which certificate the server signed with (older bench builds do not report it).
            ed = j["counts"].get("tls_ed25519")
            if ed is not None:
                line += f", Ed25519 certificate in {ed} of {est} handshakes"
        print(line)
    if rates:
        line = (f"{v}: median {statistics.median(rates):.0f} logins per server CPU-second, "
                f"server CPU per login median user {statistics.median(users):.0f} us, "
                f"system {statistics.median(systems):.0f} us")
        if held_rates:
            line += (f"; logins alone (CPU until all were held) median "
                     f"{statistics.median(held_rates):.0f} per server CPU-second, "
                     f"teardown {statistics.median(teardowns):.0f} us per session")
        print(line)
EOF
echo "reports: $OUT" >&2
