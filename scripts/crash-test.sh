#!/usr/bin/env bash
# The durability crash test, long: a sender streams messages to offline users on 2 shards with
# XEP-0198 acks, the gateway is SIGKILLed at a random moment after some acks, restarted, and every
# message acknowledged to the sender must be delivered. CI runs the same test small (5 runs of
# 300 messages) through `cargo test`; this runs it big.
#
#   scripts/crash-test.sh [runs] [messages per run]      (defaults: 20 runs, 10000 messages)
#
# Prints one line per run and the totals (runs, acked, delivered, lost); exits non-zero if any
# acknowledged message was lost.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-20}"
MESSAGES="${2:-10000}"
ulimit -l unlimited 2>/dev/null || ulimit -l 65536 2>/dev/null || true
CRASH_RUNS="$RUNS" CRASH_MESSAGES="$MESSAGES" \
    cargo test -p gateway --test offline crash_test -- --nocapture 2>&1 |
    grep -E '^crash|test result|panicked|lost:'
