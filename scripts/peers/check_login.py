#!/usr/bin/env python3
"""Smoke check of an XMPP server: user1 and user2 (password `pw`, domain `localhost`) log in
with SASL PLAIN over STARTTLS (certificate not verified), user1 sends user2 a message and user2
must receive it. Usage: check_login.py HOST PORT [--direct-tls] [--plaintext] [--timeout S].
Exit 0 on success, 1 with a reason otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys
import uuid

import slixmpp


class Client(slixmpp.ClientXMPP):
    def __init__(self, jid: str, password: str):
        super().__init__(jid, password, sasl_mech="PLAIN")
        self.ssl_context.check_hostname = False
        self.ssl_context.verify_mode = ssl.CERT_NONE
        self.started = asyncio.get_running_loop().create_future()
        self.messages: asyncio.Queue = asyncio.Queue()
        self.add_event_handler("session_start", self._on_start)
        self.add_event_handler("failed_all_auth", lambda _: self._fail("authentication failed"))
        self.add_event_handler("no_auth", lambda _: self._fail("no acceptable SASL mechanism"))
        self.add_event_handler("connection_failed", lambda e: self._fail(f"connection failed: {e}"))
        self.add_event_handler("disconnected", lambda _: self._fail("disconnected"))
        self.add_event_handler("message", lambda m: self.messages.put_nowait(m))

    def _on_start(self, _):
        self.send_presence()
        if not self.started.done():
            self.started.set_result(True)

    def _fail(self, why: str):
        if not self.started.done():
            self.started.set_exception(RuntimeError(why))

    def encrypted(self) -> bool:
        return isinstance(self.socket, (ssl.SSLObject, ssl.SSLSocket))


async def login(args, node: str) -> Client:
    c = Client(f"{node}@{args.domain}/check", args.password)
    c.enable_direct_tls = args.direct_tls
    c.enable_starttls = not args.direct_tls and not args.plaintext
    c.enable_plaintext = args.plaintext
    if args.plaintext:
        # slixmpp refuses PLAIN on an unencrypted stream unless told otherwise.
        c.plugin["feature_mechanisms"].unencrypted_plain = True
    c.connect(args.host, args.port)
    try:
        await asyncio.wait_for(asyncio.shield(c.started), args.timeout)
    except BaseException:
        c.abort()
        raise
    return c


async def main(args) -> str:
    a = await login(args, "user1")
    b = await login(args, "user2")
    try:
        body = f"check {uuid.uuid4()}"
        a.send_message(mto=f"user2@{args.domain}", mbody=body, mtype="chat")
        deadline = asyncio.get_running_loop().time() + args.timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise RuntimeError("user2 did not receive the message")
            m = await asyncio.wait_for(b.messages.get(), left)
            if m["body"] == body:
                break
        return f"ok: user1 and user2 logged in (encrypted={a.encrypted()}), message delivered"
    finally:
        for c in (a, b):
            try:
                await asyncio.wait_for(c.disconnect(wait=1), 5)
            except Exception:
                c.abort()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--domain", default="localhost")
    p.add_argument("--password", default="pw")
    p.add_argument("--direct-tls", action="store_true", help="TLS from the first byte (XEP-0368)")
    p.add_argument("--plaintext", action="store_true", help="no TLS at all, PLAIN in the clear")
    p.add_argument("--timeout", type=float, default=15)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR)
    try:
        print(asyncio.run(asyncio.wait_for(main(args), args.timeout * 3)))
    except Exception as e:  # noqa: BLE001 - one line for the operator
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
