"""SASL against the gateway binary: a failed login does not tell whether the account exists.

Raw direct-TLS streams (no XMPP library), so the test sees the exact bytes a prober would.
"""

from __future__ import annotations

import base64
import socket
import ssl
import time

from conftest import DOMAIN, SCRAM_ITERATIONS

HEADER = (
    f"<?xml version='1.0'?><stream:stream to='{DOMAIN}' version='1.0' xmlns='jabber:client' "
    "xmlns:stream='http://etherx.jabber.org/streams'>"
).encode()
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
IO_TIMEOUT_S = 10


def read_until(conn: ssl.SSLSocket, end: bytes) -> bytes:
    """Reads until `end` has arrived (or fails after IO_TIMEOUT_S); returns everything read."""
    deadline = time.monotonic() + IO_TIMEOUT_S
    data = b""
    while end not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"no {end!r} within {IO_TIMEOUT_S}s; got {data!r}"
        conn.settimeout(left)
        chunk = conn.recv(4096)
        assert chunk, f"the server closed before {end!r}; got {data!r}"
        data += chunk
    return data


def sasl_answer(port: int, mechanism: str, initial: str) -> bytes:
    """Opens a direct-TLS stream, sends `<auth/>` with `initial` and returns the server's first
    answer to it (a challenge, a success or a failure)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT_S) as raw:
        with ctx.wrap_socket(raw, server_hostname=DOMAIN) as conn:
            conn.sendall(HEADER)
            read_until(conn, b"</stream:features>")
            payload = base64.b64encode(initial.encode()).decode()
            conn.sendall(f"<auth xmlns='{NS_SASL}' mechanism='{mechanism}'>{payload}</auth>".encode())
            answer = read_until(conn, b"</challenge>" if mechanism.startswith("SCRAM") else b"</failure>")
            conn.sendall(b"</stream:stream>")
            return answer


def scram_server_first(port: int, mechanism: str, node: str) -> dict[str, str]:
    answer = sasl_answer(port, mechanism, f"n,,n={node},r=0123456789abcdef").decode()
    start = answer.index(f"<challenge xmlns='{NS_SASL}'>") + len(f"<challenge xmlns='{NS_SASL}'>")
    server_first = base64.b64decode(answer[start : answer.index("</challenge>")]).decode()
    return dict(attr.split("=", 1) for attr in server_first.split(","))


def test_failed_logins_do_not_tell_which_accounts_exist(gateway):
    """Goal: SCRAM's challenge for a user that does not exist carries the iteration count the
    server is configured with (the `--scram-iterations` the accounts were made with, not the
    4,096 default) and a stable salt as long as a real one; PLAIN answers a known user's wrong
    password and an unknown user with the same bytes. Method: the binary run with
    --scram-iterations 64; raw direct-TLS streams, one per attempt."""
    known = gateway.s0[0]
    for mechanism in ["SCRAM-SHA-1", "SCRAM-SHA-256"]:
        real = scram_server_first(gateway.tls_port, mechanism, known)
        fake = scram_server_first(gateway.tls_port, mechanism, "nobody")
        assert real["i"] == fake["i"] == SCRAM_ITERATIONS, (mechanism, real, fake)
        assert len(base64.b64decode(fake["s"])) == len(base64.b64decode(real["s"])), (real, fake)
        again = scram_server_first(gateway.tls_port, mechanism, "nobody")
        assert again["s"] == fake["s"], "an unknown user's salt stays the same, as a real one does"
    wrong = sasl_answer(gateway.tls_port, "PLAIN", f"\0{known}\0wrong-password")
    unknown = sasl_answer(gateway.tls_port, "PLAIN", "\0nobody\0wrong-password")
    assert wrong == unknown, (wrong, unknown)
    assert f"<failure xmlns='{NS_SASL}'><not-authorized/></failure>".encode() in wrong, wrong
