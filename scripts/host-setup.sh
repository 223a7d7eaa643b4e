#!/usr/bin/env bash
# Prepares a host for TARGET concurrent sessions: checks it, then writes the sysctl.d and
# limits.d files `tuning apply` computes and loads the sysctl file. Dry run unless --write;
# idempotent (a second run finds the files up to date and changes nothing).
#
# Usage: scripts/host-setup.sh [--write] [--role server|bench] [--user NAME] TARGET
#   scripts/host-setup.sh 1000000            # print the check and the diff, change nothing
#   sudo scripts/host-setup.sh --write 1000000
set -euo pipefail

usage() {
    sed --quiet '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

write=""
role="server"
user="gateway"
target=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --write) write="--write" ;;
        --role) role="${2:?--role needs a value}"; shift ;;
        --user) user="${2:?--user needs a value}"; shift ;;
        --help) usage 0 ;;
        -*) echo "host-setup.sh: unknown flag $1" >&2; usage 2 ;;
        *) target="$1" ;;
    esac
    shift
done
if [[ ! "$target" =~ ^[0-9]+$ ]]; then
    echo "host-setup.sh: TARGET (a session count) is required" >&2
    usage 2
fi

# The release build of this checkout first, else whatever `tuning` is on PATH.
repo="$(cd "$(dirname "$0")/.." && pwd)"
tuning="$repo/target/release/tuning"
if [[ ! -x "$tuning" ]]; then
    tuning="$(command -v tuning || true)"
fi
if [[ -z "$tuning" ]]; then
    echo "host-setup.sh: no tuning binary: cargo build --release -p tuning, or put it on PATH" >&2
    exit 2
fi

if [[ -n "$write" && "$(id --user)" != "0" ]]; then
    echo "host-setup.sh: --write needs root: rerun with sudo" >&2
    exit 2
fi

echo "== check before (exit 0 ready, 1 warnings, 2 blocked) =="
"$tuning" check --connections "$target" --role "$role" || true

echo
echo "== apply ${write:-(dry run)} =="
"$tuning" apply --connections "$target" --role "$role" --user "$user" ${write:+"$write"}

if [[ -n "$write" ]]; then
    echo
    echo "== check after =="
    # Limits of this shell do not change until the next login, and the service takes its own
    # from gateway.service; the sysctl rows should now be ok.
    "$tuning" check --connections "$target" --role "$role" || true
fi
