"""Interop: a real XMPP client library (slixmpp) against the gateway binary.

Each test runs its own server (see conftest.py) with users on both home shards and stops it with
SIGTERM at the end, asserting exit code 0 within the shutdown timeout.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid

import pytest

from conftest import DOMAIN, close, home_shard, login, next_matching, run


def token(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def bare(jid) -> str:
    return str(jid).split("/", 1)[0]


async def roster_items(client) -> dict:
    """Fetches the roster from the server; returns {bare jid: subscription}."""
    iq = await client.get_roster(timeout=10)
    return {str(j): item["subscription"] for j, item in iq["roster"]["items"].items()}


async def subscribe_and_approve(a, b) -> None:
    """A subscribes to B; B's slixmpp (auto_authorize) approves; waits for A to see it. B does not
    subscribe back (auto_subscribe off), so the end state is exactly A:to, B:from: with it on, the
    reciprocal subscription races every later roster check."""
    b.auto_authorize = True
    b.auto_subscribe = False
    a.send_presence(pto=bare(b.boundjid), ptype="subscribe")
    await next_matching(
        a.presences,
        lambda p: p["type"] == "subscribed" and bare(p["from"]) == bare(b.boundjid),
        what="<presence type='subscribed'/> from B",
    )


def test_cross_shard_messages_starttls_and_direct_tls(gateway):
    """Goal: two users with different home shards, one on STARTTLS and one on direct TLS, exchange
    messages both ways. Method: A (shard 0) logs in on the c2s port, B (shard 1) on the tls port;
    A -> B's full JID, B -> A's bare JID; each side checks body and sender's full JID."""

    async def body():
        ua, ub = gateway.s0[0], gateway.s1[0]
        assert home_shard(ua) != home_shard(ub)
        a = await login(gateway, ua, resource="starttls")
        b = await login(gateway, ub, resource="directtls", direct_tls=True)
        try:
            assert a.is_encrypted() and b.is_encrypted()
            assert str(a.boundjid) == f"{ua}@{DOMAIN}/starttls"
            assert str(b.boundjid) == f"{ub}@{DOMAIN}/directtls"
            a.send_presence()
            b.send_presence()

            t1 = token("a2b")
            a.send_message(mto=b.boundjid, mbody=t1, mtype="chat")
            m = await next_matching(b.messages, lambda m: m["body"] == t1, what="A's message at B")
            assert str(m["from"]) == str(a.boundjid)
            assert m["type"] == "chat"

            t2 = token("b2a")
            b.send_message(mto=bare(a.boundjid), mbody=t2, mtype="chat")
            m = await next_matching(a.messages, lambda m: m["body"] == t2, what="B's message at A")
            assert str(m["from"]) == str(b.boundjid)

            # A burst, to check ordering across the shard boundary.
            bodies = [token(f"burst{i}") for i in range(20)]
            for t in bodies:
                a.send_message(mto=b.boundjid, mbody=t, mtype="chat")
            got = []
            for _ in bodies:
                m = await next_matching(b.messages, lambda m: m["body"].startswith("burst"), what="burst")
                got.append(m["body"])
            assert got == bodies, "messages reordered across shards"
        finally:
            await close(a, b)

    run(body())


def test_presence_subscription(gateway):
    """Goal: presence subscription works across shards and the roster reflects it. Method: A
    subscribes to B, B's client approves; B then broadcasts presence with a fresh status, which
    must reach A; A's roster fetched from the server lists B with subscription to/both."""

    async def body():
        ua, ub = gateway.s0[0], gateway.s1[0]
        a = await login(gateway, ua)
        b = await login(gateway, ub, direct_tls=True)
        try:
            assert await roster_items(a) == {}
            a.send_presence()
            b.send_presence()
            await subscribe_and_approve(a, b)

            # RFC 6121 3.1.5: on approval the contact's current presence SHOULD be sent to A; the
            # router does, so this is checked.
            await next_matching(
                a.presences,
                lambda p: bare(p["from"]) == bare(b.boundjid) and p["type"] in ("available", ""),
                timeout=5,
                what="B's current presence after approval",
            )

            status = token("status")
            b.send_presence(pstatus=status)
            p = await next_matching(
                a.presences,
                lambda p: bare(p["from"]) == bare(b.boundjid) and p["status"] == status,
                what="B's presence broadcast at A",
            )
            assert str(p["from"]) == str(b.boundjid)

            items = await roster_items(a)
            assert items.get(bare(b.boundjid)) == "to", items
            items_b = await roster_items(b)
            assert items_b.get(bare(a.boundjid)) == "from", items_b

            # B goes offline: A must see unavailable presence.
            await close(b)
            await next_matching(
                a.presences,
                lambda p: bare(p["from"]) == bare(b.boundjid) and p["type"] == "unavailable",
                what="B's unavailable presence at A",
            )
        finally:
            await close(a, b)

    run(body())


@pytest.mark.parametrize("mech", ["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"])
@pytest.mark.parametrize("direct_tls", [False, True], ids=["starttls", "directtls"])
def test_sasl_mechanism(gateway, mech, direct_tls):
    """Goal: each SASL mechanism authenticates (and a wrong password does not). Method: slixmpp
    restricted to one mechanism logs in and pings the server; then the same mechanism with a
    wrong password must fail authentication."""

    async def body():
        u = gateway.s1[1]
        c = await login(gateway, u, mech=mech, direct_tls=direct_tls)
        try:
            assert c.plugin["feature_mechanisms"].mech.name == mech
            pong = await c.plugin["xep_0199"].send_ping(DOMAIN, timeout=10)
            assert pong["type"] == "result", str(pong)
        finally:
            await close(c)
        with pytest.raises(AssertionError, match="SASL failure|no mechanism|disconnected"):
            await login(gateway, u, mech=mech, direct_tls=direct_tls, password="wrong-password", timeout=15)

    run(body())


def test_offline_messages_and_receipts_are_stored_and_forwarded(gateway):
    """Goal: XEP-0160 store and forward with XEP-0184 receipts, through a real client with XEP-0198.
    Method: A (shard 0) sends 20 chat messages with receipt requests to B (shard 1), who is
    offline, half to B's bare JID and half to a full JID of B that is not connected; A's acks come
    back (XEP-0198) and A logs out. The server is restarted (SIGTERM) in between. B logs in, sends
    presence and must get all 20 in order, each with a XEP-0203 delay; B's client answers each
    receipt request while A is offline. A logs in again and must get all 20 receipts."""
    n = 20
    ua, ub = gateway.s0[0], gateway.s1[0]
    ids = [token(f"m{i:02}") for i in range(n)]

    async def send_all():
        a = await login(gateway, ua, sm=True)
        try:
            a.send_presence()
            for i, mid in enumerate(ids):
                to = f"{ub}@{DOMAIN}" if i % 2 == 0 else f"{ub}@{DOMAIN}/gone"
                msg = a.make_message(mto=to, mbody=f"body {i}", mtype="chat")
                msg["id"] = mid
                msg["request_receipt"] = True
                msg.send()
            # Every message is acknowledged by the server (stored durably) before A leaves.
            sm = a.plugin["xep_0198"]
            deadline = asyncio.get_running_loop().time() + 10
            while sm.last_ack < n and asyncio.get_running_loop().time() < deadline:
                sm.request_ack()
                await asyncio.sleep(0.1)
            assert sm.last_ack >= n, f"server acked {sm.last_ack} of {n}"
            assert a.errors.empty(), "no error for a stored message"
        finally:
            await close(a)

    async def receive_all():
        b = await login(gateway, ub, resource="phone", sm=True)
        try:
            b.send_presence()
            got = []
            while len(got) < n:
                m = await next_matching(b.messages, lambda m: m["body"].startswith("body"), what=f"offline message after {[g['id'] for g in got]}")
                got.append(m)
            assert [m["id"] for m in got] == ids
            for m in got:
                assert "urn:xmpp:delay" in str(m), str(m)
                assert bare(m["from"]) == f"{ua}@{DOMAIN}"
            # B's client sent a receipt for each; wait until the server acked them (stored for A).
            sm = b.plugin["xep_0198"]
            deadline = asyncio.get_running_loop().time() + 10
            while sm.last_ack < n and asyncio.get_running_loop().time() < deadline:
                sm.request_ack()
                await asyncio.sleep(0.1)
            assert sm.last_ack >= n, f"server acked {sm.last_ack} receipts of {n}"
        finally:
            await close(b)

    async def receipts():
        a = await login(gateway, ua, resource="back", sm=True)
        try:
            a.send_presence()
            seen = set()
            while len(seen) < n:
                r = await next_matching(a.receipts, lambda r: True, what="receipt")
                seen.add(r["receipt"])
            assert seen == set(ids)
        finally:
            await close(a)

    run(send_all())
    gateway.stop()
    gateway.start()
    run(receive_all())
    run(receipts())


def test_roster_persists_across_restart(gateway):
    """Goal: subscriptions are stored, not only kept in memory. Method: A subscribes to B and B
    approves; SIGTERM the server (exit 0), start it again on the same data dir; A's and B's rosters
    fetched after the restart still hold each other with the same subscription states."""

    async def setup():
        a = await login(gateway, gateway.s0[0])
        b = await login(gateway, gateway.s1[0], direct_tls=True)
        try:
            a.send_presence()
            b.send_presence()
            await subscribe_and_approve(a, b)
            items_a = await roster_items(a)
            items_b = await roster_items(b)
        finally:
            await close(a, b)
        return items_a, items_b

    before_a, before_b = run(setup())
    ja, jb = f"{gateway.s0[0]}@{DOMAIN}", f"{gateway.s1[0]}@{DOMAIN}"
    assert before_a.get(jb) == "to", before_a
    assert before_b.get(ja) == "from", before_b

    gateway.stop()
    gateway.start()

    async def check():
        a = await login(gateway, gateway.s0[0])
        b = await login(gateway, gateway.s1[0])
        try:
            after_a = await roster_items(a)
            after_b = await roster_items(b)
        finally:
            await close(a, b)
        return after_a, after_b

    after_a, after_b = run(check())
    assert after_a.get(jb) == before_a.get(jb), (before_a, after_a)
    assert after_b.get(ja) == before_b.get(ja), (before_b, after_b)


def test_disco_info(gateway):
    """Goal: the server answers disco#info (a client library relies on it). Method: slixmpp's
    xep_0030 queries the domain; the answer must list the disco#info feature and ping."""

    async def body():
        c = await login(gateway, gateway.s0[1])
        try:
            info = await c.plugin["xep_0030"].get_info(jid=DOMAIN, timeout=10)
            features = info["disco_info"]["features"]
            assert "http://jabber.org/protocol/disco#info" in features, features
            assert "urn:xmpp:ping" in features, features
        finally:
            await close(c)

    run(body())


@pytest.mark.parametrize(
    "sigalgs, expected",
    [
        ("ECDSA+SHA256:ed25519", "ed25519"),
        ("ed25519", "ed25519"),
        ("ECDSA+SHA256:rsa_pss_rsae_sha256", "ECDSA"),
    ],
)
def test_certificate_follows_the_clients_signature_schemes(gateway, sigalgs, expected):
    """OpenSSL's client gets the generated Ed25519 certificate when it offers Ed25519 (in any
    order: the server picks the one cheapest to sign with) and the ECDSA one otherwise."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl not installed (scripts/test.sh installs it)"
    r = subprocess.run(
        [openssl, "s_client", "-connect", f"127.0.0.1:{gateway.tls_port}", "-tls1_3",
         "-sigalgs", sigalgs, "-brief"],
        input="", capture_output=True, text=True, timeout=30,
    )
    out = r.stdout + r.stderr
    assert f"Signature type: {expected}\n" in out, out
