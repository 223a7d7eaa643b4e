"""A measurement, not a test (pytest does not collect it): the server CPU a flood of wrong
PLAIN passwords from one address costs, with the per-address limit (30 failures a minute) and
without it (0), alternated over two rounds.

Usage, from tests/interop:  python3 auth_flood.py GATEWAY_BIN CONNECTIONS

Each round starts the binary (one shard, the default 4,096 iterations) on loopback, makes two
failed PLAIN attempts on each of CONNECTIONS direct-TLS streams (`sasl_timing.measure`), and
reads the server's user + system CPU from /proc before and after.
"""
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from conftest import free_port
from sasl_timing import measure

def cpu(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

def run(binary: str, limit: int, connections: int) -> tuple[int, float, float]:
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([binary, "--data-dir", d, "user", "add", "alice", "--password", "secret"], check=True, capture_output=True)
        c2s, tls, admin = free_port(), free_port(), free_port()
        log = open(f"{d}/log", "wb")
        p = subprocess.Popen([binary, "--data-dir", d, "--shards", "1", "serve", "--no-pin",
            "--c2s-addr", f"127.0.0.1:{c2s}", "--tls-addr", f"127.0.0.1:{tls}", "--admin-addr", f"127.0.0.1:{admin}",
            "--auth-failures-per-address-max", str(limit)], stdout=log, stderr=log)
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{admin}/health", timeout=1); break
            except Exception: time.sleep(0.1)
        c0 = cpu(p.pid); t0 = time.monotonic()
        times = measure(tls, connections, time.monotonic() + 120)
        c1 = cpu(p.pid); t1 = time.monotonic()
        n = sum(len(v) for v in times.values())
        p.send_signal(signal.SIGTERM); p.wait(timeout=20)
        return n, c1 - c0, t1 - t0

def main() -> None:
    binary, connections = sys.argv[1], int(sys.argv[2])
    for _ in range(2):
        for limit in (30, 0):
            n, c, t = run(binary, limit, connections)
            print(f"limit {limit:>2}: {n} failed attempts, server CPU {c:.2f} s "
                  f"({c / n * 1e6:.0f} us each), {t:.1f} s wall")


if __name__ == "__main__":
    main()
