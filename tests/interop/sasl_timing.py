"""A measurement, not a test (pytest does not collect it): how long a SASL PLAIN login takes to
fail for a known user's wrong password and for a user that does not exist.

Usage, from tests/interop:  python3 sasl_timing.py GATEWAY_BIN CONNECTIONS

Starts the binary (one shard, the default scram_iterations, 4,096) on loopback with one
account, then over CONNECTIONS direct-TLS streams (at most 2,000) makes two PLAIN attempts each,
the known user's and the unknown one's in alternating order, timing `<auth/>` sent to
`</failure>` read. Stops after 180 s whatever is left. Prints median, p10 and p90 per case.
"""

from __future__ import annotations

import base64
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from conftest import DOMAIN, free_port
from test_sasl_accounts import HEADER, NS_SASL, read_until

CONNECTIONS_MAX = 2000
RUN_S = 180
KNOWN, UNKNOWN = "alice", "nobody"


def plain_auth(node: str) -> bytes:
    payload = base64.b64encode(f"\0{node}\0wrong-password".encode()).decode()
    return f"<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{payload}</auth>".encode()


def measure(tls_port: int, connections: int, deadline: float) -> dict[str, list[float]]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    times: dict[str, list[float]] = {KNOWN: [], UNKNOWN: []}
    for i in range(connections):
        if time.monotonic() > deadline:
            break
        with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with ctx.wrap_socket(raw, server_hostname=DOMAIN) as conn:
                conn.sendall(HEADER)
                read_until(conn, b"</stream:features>")
                # Two failures per stream: the third would close it (AUTH_ATTEMPTS_MAX).
                for node in (KNOWN, UNKNOWN) if i % 2 == 0 else (UNKNOWN, KNOWN):
                    request = plain_auth(node)
                    start = time.perf_counter()
                    conn.sendall(request)
                    read_until(conn, b"</failure>")
                    times[node].append((time.perf_counter() - start) * 1e6)
    return times


def main() -> None:
    binary, connections = sys.argv[1], min(int(sys.argv[2]), CONNECTIONS_MAX)
    deadline = time.monotonic() + RUN_S
    with tempfile.TemporaryDirectory(prefix="sasl-timing-") as data_dir:
        subprocess.run(
            [binary, "--data-dir", data_dir, "user", "add", KNOWN, "--password", "secret"],
            check=True, capture_output=True, timeout=60,
        )
        c2s, tls, admin = free_port(), free_port(), free_port()
        with open(Path(data_dir) / "server.log", "wb") as log:
            server = subprocess.Popen(
                [binary, "--data-dir", data_dir, "--shards", "1", "serve", "--no-pin",
                 "--c2s-addr", f"127.0.0.1:{c2s}", "--tls-addr", f"127.0.0.1:{tls}",
                 "--admin-addr", f"127.0.0.1:{admin}",
                 # Every attempt here fails on purpose: no refusals by address.
                 "--auth-failures-per-address-max", "0"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        try:
            while True:
                assert server.poll() is None, "the gateway exited before it was ready"
                assert time.monotonic() < deadline, "the gateway was not ready in time"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/health", timeout=2) as r:
                        if b"ready" in r.read():
                            break
                except OSError:
                    time.sleep(0.05)
            times = measure(tls, connections, deadline)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=20)
    for node, samples in times.items():
        deciles = statistics.quantiles(samples, n=10)
        print(f"{node:7} n={len(samples)} median {statistics.median(samples):6.0f} us"
              f"  p10 {deciles[0]:6.0f}  p90 {deciles[8]:6.0f}")
    ratio = statistics.median(times[KNOWN]) / statistics.median(times[UNKNOWN])
    print(f"median known-wrong / unknown: {ratio:.2f}")


if __name__ == "__main__":
    main()
