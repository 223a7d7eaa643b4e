"""Interop fixtures: run the real `gateway` binary and talk to it with slixmpp.

Nothing is built here; scripts/test.sh builds first. The binary is $GATEWAY_BIN, or
target/debug/gateway under the repository root (under $CARGO_TARGET_DIR if that is set).
Every wait has a deadline, so no test can hang.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import slixmpp
import xxhash

REPO_ROOT = Path(__file__).resolve().parents[2]
DOMAIN = "localhost"
SHARDS = 2
SCRAM_ITERATIONS = "64"
SHUTDOWN_TIMEOUT_S = 5
READY_TIMEOUT_S = 60


def gateway_bin() -> Path:
    env = os.environ.get("GATEWAY_BIN")
    if env:
        return Path(env)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))
    if not target.is_absolute():
        target = REPO_ROOT / target
    return target / "debug" / "gateway"


def home_shard(node: str) -> int:
    """The server's partition function: xxh3_64(bare JID) % shards."""
    return xxhash.xxh3_64_intdigest(f"{node}@{DOMAIN}".encode()) % SHARDS


def users_on_shard(shard: int, count: int) -> list[str]:
    out, i = [], 1
    while len(out) < count:
        name = f"user{i}"
        if home_shard(name) == shard:
            out.append(name)
        i += 1
    return out


def password_of(node: str) -> str:
    return f"pw-{node}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """A `gateway serve` on free loopback ports with its own data dir."""

    def __init__(self, workdir: Path):
        self.bin = gateway_bin()
        if not self.bin.is_file():
            pytest.fail(f"gateway binary not found at {self.bin}; build it first (cargo build -p gateway)")
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.data_dir.mkdir()
        self.log_path = workdir / "server.log"
        self.c2s_port = free_port()
        self.tls_port = free_port()
        self.admin_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.users: list[str] = []

    def cli(self, *args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bin), "--data-dir", str(self.data_dir), "--scram-iterations", SCRAM_ITERATIONS, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if stdin is not None else subprocess.DEVNULL,
        )

    def add_user(self, node: str) -> None:
        r = self.cli("user", "add", node, "--password", password_of(node))
        assert r.returncode == 0, f"user add {node} failed: {r.stderr}"
        self.users.append(node)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> None:
        assert self.proc is None
        args = [
            str(self.bin),
            "--data-dir", str(self.data_dir),
            "--shards", str(SHARDS),
            "--scram-iterations", SCRAM_ITERATIONS,
            "serve",
            "--no-pin",
            "--c2s-addr", f"127.0.0.1:{self.c2s_port}",
            "--tls-addr", f"127.0.0.1:{self.tls_port}",
            "--admin-addr", f"127.0.0.1:{self.admin_port}",
            "--shutdown-timeout-seconds", str(SHUTDOWN_TIMEOUT_S),
        ]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT_S
        url = f"http://127.0.0.1:{self.admin_port}/health"
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                pytest.fail(f"gateway exited ({code}) before it was ready:\n{self.log()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200 and b"ready" in resp.read():
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"gateway not ready within {READY_TIMEOUT_S}s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM; asserts exit code 0 within the shutdown timeout (plus slack)."""
        assert self.proc is not None
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=SHUTDOWN_TIMEOUT_S + 10)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"gateway did not exit within {SHUTDOWN_TIMEOUT_S + 10}s of SIGTERM:\n{self.log()}")
        elapsed = time.monotonic() - start
        self.proc = None
        assert code == 0, f"gateway exited with {code} after SIGTERM:\n{self.log()}"
        assert elapsed <= SHUTDOWN_TIMEOUT_S + 3, f"shutdown took {elapsed:.1f}s"

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def gateway():
    """A started gateway with users on both shards: `gw.s0` / `gw.s1` list users per home shard."""
    with tempfile.TemporaryDirectory(prefix="gw-interop-") as d:
        gw = Gateway(Path(d))
        gw.s0 = users_on_shard(0, 2)
        gw.s1 = users_on_shard(1, 2)
        for u in gw.s0 + gw.s1:
            gw.add_user(u)
        gw.start()
        try:
            yield gw
            if gw.proc is not None:
                gw.stop()
        finally:
            gw.kill()


class Client(slixmpp.ClientXMPP):
    """A slixmpp client that trusts the self-signed certificate and records what arrives."""

    def __init__(self, jid: str, password: str, mech: str | None = None, sm: bool = False):
        super().__init__(jid, password, sasl_mech=mech)
        if sm:
            # XEP-0198 stream management and XEP-0184 receipts (answered automatically).
            self.register_plugin("xep_0198")
            self.register_plugin("xep_0184")
            self.register_plugin("xep_0203")
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        self.register_plugin("xep_0030")  # service discovery
        self.register_plugin("xep_0199")  # ping
        self.messages: asyncio.Queue = asyncio.Queue()
        self.errors: asyncio.Queue = asyncio.Queue()
        self.presences: asyncio.Queue = asyncio.Queue()
        self.receipts: asyncio.Queue = asyncio.Queue()
        self.add_event_handler("receipt_received", lambda m: self.receipts.put_nowait(m))
        self.started: asyncio.Future = asyncio.get_running_loop().create_future()
        self.add_event_handler("session_start", self._on_start)
        self.add_event_handler("failed_auth", lambda s: self._fail(f"SASL failure: {s}"))
        self.add_event_handler("failed_all_auth", lambda _: self._fail("no mechanism succeeded"))
        self.add_event_handler("no_auth", lambda _: self._fail("no acceptable mechanism offered"))
        self.add_event_handler("disconnected", lambda _: self._fail("disconnected"))
        self.add_event_handler("message", lambda m: self.messages.put_nowait(m))
        self.add_event_handler("message_error", lambda m: self.errors.put_nowait(m))
        self.add_event_handler("presence", lambda p: self.presences.put_nowait(p))

    def _on_start(self, _event):
        if not self.started.done():
            self.started.set_result(True)

    def _fail(self, why: str):
        if not self.started.done():
            self.started.set_exception(AssertionError(why))

    def is_encrypted(self) -> bool:
        return isinstance(self.socket, (ssl.SSLObject, ssl.SSLSocket))


async def login(
    gw: Gateway,
    node: str,
    *,
    resource: str = "interop",
    direct_tls: bool = False,
    mech: str | None = None,
    password: str | None = None,
    timeout: float = 20,
    sm: bool = False,
) -> Client:
    """Connects (STARTTLS on the c2s port, or direct TLS on the tls port) and waits for the session.
    With `sm`, the client uses XEP-0198 and answers XEP-0184 receipt requests."""
    c = Client(f"{node}@{DOMAIN}/{resource}", password or password_of(node), mech, sm=sm)
    c.enable_plaintext = False
    c.enable_direct_tls = direct_tls
    c.enable_starttls = not direct_tls
    # One attempt only: a failure must fail the test, not reconnect forever.
    c.add_event_handler("connection_failed", lambda e: c._fail(f"connection failed: {e}"))
    c.connect("127.0.0.1", gw.tls_port if direct_tls else gw.c2s_port)
    try:
        await asyncio.wait_for(asyncio.shield(c.started), timeout)
    except BaseException:
        c.cancel_connection_attempt()
        c.abort()
        raise
    return c


async def close(*clients: Client) -> None:
    for c in clients:
        try:
            await asyncio.wait_for(c.disconnect(wait=1), 5)
        except Exception:
            c.abort()


def run(coro, timeout: float = 60):
    """Runs one async test body with an overall deadline."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def next_matching(queue: asyncio.Queue, pred, timeout: float = 10, what: str = "stanza"):
    """The next item of `queue` that satisfies `pred`; others are dropped."""
    deadline = asyncio.get_running_loop().time() + timeout
    seen = []
    while True:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise AssertionError(f"no matching {what} within {timeout}s; saw: {[str(s) for s in seen]}")
        try:
            item = await asyncio.wait_for(queue.get(), left)
        except asyncio.TimeoutError:
            continue
        if pred(item):
            return item
        seen.append(item)
