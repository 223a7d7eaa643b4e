"""Statistics: after logins and a message, `/metrics` parses with a real Prometheus text parser
(prometheus_client) and its counters moved by exactly the expected amounts."""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid
from collections import defaultdict

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import close, home_shard, login, next_matching, run

SETTLE_S = 10


def scrape(gw) -> dict:
    """{(sample name, frozenset(labels)): value} from /metrics, through the Prometheus parser."""
    url = f"http://127.0.0.1:{gw.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/plain")
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def total(m: dict, name: str, **labels) -> float:
    """Sum of `name` over the samples whose labels include `labels` (e.g. over all shards)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in m.items() if n == name and want <= ls)


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def settled(gw) -> dict:
    """A scrape taken once no connection is half-way (handshake or auth)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        m = scrape(gw)
        busy = total(m, "gateway_connections", state="tls_handshake") + total(
            m, "gateway_connections", state="auth"
        )
        if busy == 0:
            return m
        assert time.monotonic() < deadline, f"connections still negotiating: {busy}"
        time.sleep(0.1)


def test_metrics_parse_and_count_a_login_and_a_message_exactly(gateway):
    """Goal: /metrics is valid Prometheus text with one sample per shard, and a login, a failed
    login and one cross-shard message move the counters by exactly what they are. Method: A
    (shard 0) and B (shard 1) log in; scrape; C logs in, D fails its password once (PLAIN, so
    exactly one SASL failure), A sends B one message; scrape again and compare."""

    async def body():
        ua, ub = gateway.s0[0], gateway.s1[0]
        uc, ud = gateway.s1[1], gateway.s0[1]
        assert home_shard(ua) == 0 and home_shard(ub) == 1
        a = await login(gateway, ua)
        b = await login(gateway, ub)
        try:
            before = settled(gateway)
            shards = {dict(ls)["shard"] for (n, ls) in before if n == "gateway_sessions"}
            assert shards == {"0", "1"}
            assert total(before, "gateway_sessions") == 2
            assert total(before, "gateway_connections", state="session") == 2

            c = await login(gateway, uc)
            with pytest.raises(AssertionError):
                await login(gateway, ud, mech="PLAIN", password="wrong-password", timeout=15)
            text = f"stats-{uuid.uuid4().hex}"
            a.send_message(mto=b.boundjid, mbody=text, mtype="chat")
            await next_matching(b.messages, lambda m: m["body"] == text, what="A's message at B")
            await asyncio.sleep(0.2)  # the failed client's close reaches the server
            after = settled(gateway)

            d = lambda name, **labels: delta(before, after, name, **labels)  # noqa: E731
            assert d("gateway_stanzas_total", direction="in", kind="message") == 1
            assert d("gateway_stanzas_total", direction="out", kind="message") == 1
            assert d("gateway_stanzas_total", shard="0", direction="in", kind="message") == 1
            assert d("gateway_stanzas_total", shard="1", direction="out", kind="message") == 1
            assert d("gateway_mesh_frames_total", shard="0", direction="out") == 1
            assert d("gateway_mesh_frames_total", shard="1", direction="in") == 1
            assert d("gateway_accepted_total") == 2
            assert d("gateway_tls_handshakes_total") == 2
            assert d("gateway_auth_total", result="success") == 1
            assert d("gateway_auth_total", result="failure") == 1
            assert d("gateway_sessions") == 1
            assert d("gateway_connections", state="session") == 1
            assert d("gateway_handoffs_total", direction="in") == d("gateway_handoffs_total", direction="out")
            assert d("gateway_bytes_total", direction="in") > len(text)
            assert d("gateway_bytes_total", direction="out") > len(text)
            # Every stanza routed from a session is timed once.
            routed = d("gateway_stanzas_total", direction="in")
            assert d("gateway_routing_latency_seconds_count") == routed
            assert total(after, "gateway_routing_latency_seconds", quantile="0.99") > 0
            assert total(after, "gateway_process_resident_memory_bytes") > 0
            assert total(after, "gateway_alert") == 0
            await close(c)
        finally:
            await close(a, b)

    run(body())
