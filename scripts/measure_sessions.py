#!/usr/bin/env python3
"""Quick figures for a running gateway until `bench` lands: open N authenticated, bound, present
direct-TLS sessions (SASL PLAIN), hold them, and report the server's RSS per session and logins
per server CPU-second, read from /proc/PID.

    scripts/measure_sessions.py --pid PID --port 5223 --sessions 10000 --prefix user --password pw

Loopback only. Every loop is bounded: N sessions, a timeout per step, and a hold time.
"""
import argparse
import asyncio
import base64
import os
import ssl
import sys
import time

HEADER = ("<stream:stream to='{d}' version='1.0' xmlns='jabber:client' "
          "xmlns:stream='http://etherx.jabber.org/streams'>")
STEP_TIMEOUT_SECONDS = 20


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


async def read_until(reader, needle):
    buf = b""
    while needle not in buf:
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionError(f"closed before {needle!r}: {buf[-200:]!r}")
        buf += chunk
    return buf


async def login(args, ctx, i):
    reader, writer = await asyncio.open_connection(args.host, args.port, ssl=ctx,
                                                   server_hostname=args.domain)
    hdr = HEADER.format(d=args.domain).encode()
    writer.write(hdr)
    await read_until(reader, b"</stream:features>")
    cred = base64.b64encode(f"\0{args.prefix}{i}\0{args.password}".encode()).decode()
    writer.write(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{cred}</auth>".encode())
    out = await read_until(reader, b"/>")
    if b"success" not in out:
        raise ConnectionError(f"auth failed for {args.prefix}{i}: {out!r}")
    writer.write(hdr)
    await read_until(reader, b"</stream:features>")
    writer.write(b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
    await read_until(reader, b"</iq>")
    writer.write(b"<presence/>")
    await writer.drain()
    return reader, writer


async def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pid", type=int, required=True, help="the gateway's pid")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5223, help="direct TLS port")
    p.add_argument("--domain", default="localhost")
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--first", type=int, default=1, help="first user number")
    p.add_argument("--prefix", default="user")
    p.add_argument("--password", default="pw")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--hold", type=float, default=3.0, help="seconds to hold before measuring")
    args = p.parse_args()
    host = args.host
    if not (host.startswith("127.") or host in ("::1", "localhost")):
        sys.exit("loopback targets only")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    rss0, cpu0 = rss_bytes(args.pid), cpu_seconds(args.pid)
    sem = asyncio.Semaphore(args.concurrency)
    held, failed = [], 0
    started = time.monotonic()

    async def one(i):
        nonlocal failed
        async with sem:
            try:
                held.append(await asyncio.wait_for(login(args, ctx, i), STEP_TIMEOUT_SECONDS))
            except Exception as e:  # counted and reported, never silent
                failed += 1
                if failed <= 3:
                    print(f"session {i} failed: {e}", file=sys.stderr)

    await asyncio.gather(*(one(i) for i in range(args.first, args.first + args.sessions)))
    wall = time.monotonic() - started
    cpu1 = cpu_seconds(args.pid)
    await asyncio.sleep(args.hold)
    rss1 = rss_bytes(args.pid)
    n = len(held)
    print(f"sessions established: {n}, failed: {failed}, in {wall:.2f} s ({n / wall:.0f}/s wall)")
    print(f"server CPU during logins: {cpu1 - cpu0:.2f} s -> {n / max(cpu1 - cpu0, 1e-9):.0f} logins per server CPU-second")
    print(f"server RSS: before {rss0 / 1024:.0f} KiB, with sessions {rss1 / 1024:.0f} KiB, "
          f"{(rss1 - rss0) / max(n, 1):.0f} bytes per session")
    for _, w in held:
        w.close()


if __name__ == "__main__":
    asyncio.run(main())
