#!/usr/bin/env python3
"""Builds the markdown comparison table from bench JSON reports (schema_version 1).

    report.py RESULTS_DIR [--out FILE] [--bound-ms 10]      gateway vs ejabberd vs Prosody
    report.py --scaling RESULTS_DIR [--out FILE]            gateway by shard count

Each report is classified by its content, not its file name: the server by the first word of
target.label (gateway, ejabberd, prosody), the figure by scenario, target.tls and sweep. When two
reports land on the same cell, the later file name (sorted) wins and a note says so.
Only the standard library: runs in CI without ejabberd or Prosody.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

SERVERS = ("gateway", "ejabberd", "prosody")
SERVER_TITLES = {"gateway": "gateway", "ejabberd": "ejabberd", "prosody": "Prosody"}
DASH = "—"


def load_reports(directory: Path) -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"report.py: skipping {path.name}: {e}", file=sys.stderr)
            continue
        if not isinstance(data, dict) or "scenario" not in data:
            continue
        if data.get("schema_version") != 1:
            print(f"report.py: {path.name}: schema_version {data.get('schema_version')}, expected 1",
                  file=sys.stderr)
        out.append((path, data))
    return out


def server_of(report: dict) -> str | None:
    label = ((report.get("target") or {}).get("label") or "").strip().lower()
    word = label.split()[0] if label else ""
    for s in SERVERS:
        if word.startswith(s):
            return s
    return None


def kind_of(report: dict) -> str:
    scenario = report.get("scenario", "")
    tls = (report.get("target") or {}).get("tls", "none")
    if scenario == "idle":
        return "idle-plain" if tls == "none" else "idle-tls"
    if scenario == "chat":
        params = report.get("parameters") or {}
        return "chat-sweep" if report.get("sweep") or params.get("sweep") else "chat-fixed"
    return scenario


def g(d: dict | None, *keys):
    """Nested get that tolerates nulls: g(r, 'server', 'bytes_per_session')."""
    for k in keys:
        if d is None:
            return None
        d = d.get(k) if isinstance(d, dict) else None
    return d


def max_held_rate(report: dict) -> float | None:
    held = [s for s in report.get("sweep") or [] if s.get("held")]
    if not held:
        return None
    return max(s.get("target_msgs_per_second") or 0.0 for s in held)


def bound_ms(report: dict, default: float) -> float:
    params = report.get("parameters") or {}
    for key in ("p99_bound_ms", "p99-bound-ms", "bound_ms"):
        if isinstance(params.get(key), (int, float)):
            return float(params[key])
    return default


# Formatters ---------------------------------------------------------------------------------

def fmt_kib(v):
    return DASH if v is None else f"{v / 1024:.1f} KiB"


def fmt_rate(v):
    if v is None:
        return DASH
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def fmt_ms(v_us):
    if v_us is None:
        return DASH
    ms = v_us / 1000
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:,.1f} ms"


def fmt_s(v):
    return DASH if v is None else f"{v:.2f} s"


def fmt_ratio(a, b):
    if a is None or b is None or b == 0:
        return DASH
    return f"{a / b:.2f}×"


# The rows: (title, kind, extractor, formatter). Extractors return a number or None.
def rows(bound: float):
    return [
        ("server memory per idle session, plaintext (lower is better)", "idle-plain",
         lambda r: g(r, "server", "bytes_per_session"), fmt_kib),
        ("server memory per idle session, TLS (lower is better)", "idle-tls",
         lambda r: g(r, "server", "bytes_per_session"), fmt_kib),
        ("client memory per idle session, plaintext (bench, same for all)", "idle-plain",
         lambda r: g(r, "client", "bytes_per_session"), fmt_kib),
        ("client memory per idle session, TLS (bench, same for all)", "idle-tls",
         lambda r: g(r, "client", "bytes_per_session"), fmt_kib),
        (f"1:1 chat: highest rate with p99 < {bound:g} ms, msg/s (higher is better)", "chat-sweep",
         max_held_rate, fmt_rate),
        ("1:1 chat at fixed rate: p50 (lower is better)", "chat-fixed",
         lambda r: g(r, "latency_us", "p50"), fmt_ms),
        ("1:1 chat at fixed rate: p99 (lower is better)", "chat-fixed",
         lambda r: g(r, "latency_us", "p99"), fmt_ms),
        ("logins/s (higher is better)", "login",
         lambda r: g(r, "rates", "sessions_per_second"), fmt_rate),
        ("reconnect storm: time to 100% (lower is better)", "reconnect",
         lambda r: g(r, "rates", "time_to_100pct_seconds"), fmt_s),
    ]


def describe_run(kind: str, r: dict) -> str:
    p = r.get("parameters") or {}
    t = r.get("target") or {}
    bits = [f"tls={t.get('tls', '?')}"]
    keys = {
        "idle-plain": ("sessions", "ramp", "hold", "procs"),
        "idle-tls": ("sessions", "ramp", "hold", "procs"),
        "chat-sweep": ("sessions", "users", "size", "duration", "sweep_start", "sweep_factor", "p99_bound_ms"),
        "chat-fixed": ("sessions", "users", "rate", "duration", "size"),
        "login": ("sessions", "ramp", "procs"),
        "reconnect": ("sessions", "reconnect_ramp", "procs"),
    }.get(kind, ("sessions",))
    for key in keys:
        if p.get(key) is not None:
            bits.append(f"{key}={p[key]}")
    if kind == "chat-fixed":
        bits.append(f"target {fmt_rate(g(r, 'rates', 'target_msgs_per_second'))} msg/s")
    return " ".join(bits)


def peers_table(reports: list[tuple[Path, dict]], default_bound: float) -> str:
    cells: dict[tuple[str, str], tuple[Path, dict]] = {}
    notes: list[str] = []
    labels: dict[str, str] = {}
    for path, r in reports:
        s = server_of(r)
        if s is None:
            notes.append(f"`{path.name}`: label {g(r, 'target', 'label')!r} names no known server; ignored")
            continue
        k = kind_of(r)
        if (s, k) in cells:
            notes.append(f"`{path.name}` replaces `{cells[(s, k)][0].name}` for {s} {k}")
        cells[(s, k)] = (path, r)
        labels.setdefault(s, g(r, "target", "label") or s)

    bound = default_bound
    sweeps = [r for (s, k), (_, r) in cells.items() if k == "chat-sweep"]
    if sweeps:
        bound = bound_ms(sweeps[0], default_bound)

    head = ["figure"] + [SERVER_TITLES[s] for s in SERVERS] + ["gateway/ejabberd", "gateway/Prosody"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    flagged: list[str] = []
    for title, kind, extract, fmt in rows(bound):
        values = {}
        shown = []
        for s in SERVERS:
            cell = cells.get((s, kind))
            if cell is None:
                values[s] = None
                shown.append(DASH)
                continue
            path, r = cell
            v = extract(r)
            values[s] = v
            text = fmt(v)
            if kind == "chat-sweep" and v is None and r.get("sweep"):
                # Not even the first step held: the rate is below it.
                first = r["sweep"][0].get("target_msgs_per_second")
                text = f"< {fmt_rate(first)}" if first else DASH
            failed = g(r, "counts", "failed") or 0
            if v is not None and (r.get("passed") is False or failed):
                text += " †"
                flagged.append(f"{SERVER_TITLES[s]} {kind} (`{path.name}`): passed={r.get('passed')}, "
                               f"failed={failed} {g(r, 'counts', 'failed_by_reason') or {}}, "
                               f"lost={g(r, 'counts', 'lost') or 0}")
            shown.append(text)
        shown.append(fmt_ratio(values["gateway"], values["ejabberd"]))
        shown.append(fmt_ratio(values["gateway"], values["prosody"]))
        lines.append("| " + " | ".join([title] + shown) + " |")

    out = ["## gateway vs ejabberd vs Prosody", ""]
    out.append("Servers: " + ", ".join(f"{SERVER_TITLES[s]} = `{labels[s]}`" for s in SERVERS if s in labels)
               + ". Ratios are gateway ÷ peer.")
    out.append("")
    out += lines
    out.append("")
    if flagged:
        out.append("† the run did not pass (sessions failed or messages lost); read the figure with care:")
        out += [f"- {f}" for f in dict.fromkeys(flagged)]
        out.append("")
    out.append("Runs:")
    for (s, k), (path, r) in sorted(cells.items(), key=lambda kv: (SERVERS.index(kv[0][0]), kv[0][1])):
        out.append(f"- {SERVER_TITLES[s]} {k}: `{path.name}` ({describe_run(k, r)})")
    out.append("")
    out += machine_lines([r for _, r in reports])
    if notes:
        out.append("")
        out.append("Notes:")
        out += [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def machine_lines(reports: list[dict]) -> list[str]:
    machines = [r.get("machine") for r in reports if r.get("machine")]
    if not machines:
        return ["Machine: unknown"]
    m = machines[0]
    mem = m.get("memory_bytes") or 0
    line = (f"Machine: {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores, "
            f"{mem / 2**30:.1f} GiB, kernel {m.get('kernel', '?')}, host `{m.get('hostname', '?')}`")
    out = [line]
    if any(x != m for x in machines[1:]):
        out.append("(warning: the reports come from more than one machine)")
    return out


# Scaling -------------------------------------------------------------------------------------

def shards_of(path: Path, r: dict) -> int | None:
    p = r.get("parameters") or {}
    for key in ("server_shards", "shards"):
        v = p.get(key)
        if isinstance(v, int) or (isinstance(v, str) and v.isdigit()):
            return int(v)
    for text in (g(r, "target", "label") or "", path.name):
        m = re.search(r"(\d+)[ _-]?shards?|shards?[ _=-]?(\d+)", text)
        if m:
            return int(m.group(1) or m.group(2))
    return None


def scaling_table(reports: list[tuple[Path, dict]]) -> str:
    by: dict[int, dict[str, dict]] = {}
    for path, r in reports:
        k = shards_of(path, r)
        if k is None:
            continue
        by.setdefault(k, {})[kind_of(r)] = r
    base = max_held_rate(by.get(1, {}).get("chat-sweep", {})) if 1 in by else None
    lines = ["| shards | max held chat rate, msg/s | efficiency rate(K) / (K × rate(1)) "
             "| server memory per idle session | idle sessions |",
             "|---|---|---|---|---|"]
    for k in sorted(by):
        sweep = by[k].get("chat-sweep")
        idle = by[k].get("idle-plain") or by[k].get("idle-tls")
        rate = max_held_rate(sweep) if sweep else None
        eff = f"{rate / (k * base):.2f}" if rate is not None and base else DASH
        lines.append(f"| {k} | {fmt_rate(rate)} | {eff} | "
                     f"{fmt_kib(g(idle, 'server', 'bytes_per_session')) if idle else DASH} | "
                     f"{g(idle, 'counts', 'established') if idle else DASH} |")
    out = ["## gateway: scaling by shard count", ""] + lines + [""]
    out += machine_lines([r for _, r in reports])
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Markdown tables from bench JSON reports.")
    ap.add_argument("results_dir", type=Path)
    ap.add_argument("--out", type=Path, help="write here too [default: RESULTS_DIR/table.md]")
    ap.add_argument("--bound-ms", type=float, default=10.0,
                    help="p99 bound of the sweep when the reports do not say [default: 10]")
    ap.add_argument("--scaling", action="store_true", help="the shard-scaling table instead")
    args = ap.parse_args(argv)
    if not args.results_dir.is_dir():
        print(f"report.py: {args.results_dir} is not a directory", file=sys.stderr)
        return 2
    reports = load_reports(args.results_dir)
    if not reports:
        print(f"report.py: no bench reports in {args.results_dir}", file=sys.stderr)
        return 1
    text = scaling_table(reports) if args.scaling else peers_table(reports, args.bound_ms)
    out = args.out or args.results_dir / "table.md"
    out.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
