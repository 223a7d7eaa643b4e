"""scripts/peers/report.py on the hand-written reports in scripts/peers/testdata.
Needs neither ejabberd nor Prosody: only Python's standard library and pytest."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "scripts" / "peers" / "report.py"
TESTDATA = ROOT / "scripts" / "peers" / "testdata"


def run_report(tmp_path: Path, *extra: str) -> tuple[str, str]:
    data = tmp_path / "results"
    shutil.copytree(TESTDATA, data)
    proc = subprocess.run([sys.executable, str(REPORT), str(data), *extra],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    table = (data / "table.md").read_text()
    assert proc.stdout == table
    return table, proc.stderr


def row(table: str, starts: str) -> list[str]:
    for line in table.splitlines():
        if line.startswith("| " + starts):
            return [c.strip() for c in line.strip().strip("|").split("|")]
    raise AssertionError(f"no row starting {starts!r} in:\n{table}")


def test_header_and_machine(tmp_path):
    table, _ = run_report(tmp_path)
    assert "| figure | gateway | ejabberd | Prosody | gateway/ejabberd | gateway/Prosody |" in table
    assert "Test CPU @ 2.0GHz, 2 cores, 4.0 GiB, kernel 6.1.0-test" in table
    assert "`ejabberd 23.01`" in table and "`Prosody 0.12.3`" in table


def test_memory_row_and_ratios(tmp_path):
    table, _ = run_report(tmp_path)
    r = row(table, "server memory per idle session, plaintext")
    assert r[1:] == ["4.0 KiB", "60.0 KiB", "36.0 KiB †", "0.07×", "0.11×"]


def test_failed_run_is_flagged(tmp_path):
    table, _ = run_report(tmp_path)
    assert "Prosody idle-plain (`prosody.idle-none.json`): passed=False, failed=10" in table


def test_sweep_takes_highest_held_step(tmp_path):
    table, _ = run_report(tmp_path)
    r = row(table, "1:1 chat: highest rate with p99 < 10 ms")
    assert r[1] == "4,000"  # 8000 msg/s broke the bound
    assert r[2:] == ["—"] * 4


def test_missing_figures_are_dashes(tmp_path):
    table, _ = run_report(tmp_path)
    assert row(table, "logins/s")[1:] == ["—"] * 5
    assert row(table, "server memory per idle session, TLS")[1:] == ["—"] * 5


def test_classification_is_by_content_not_name(tmp_path):
    # The same report under another name still lands in the gateway plaintext cell, and the later
    # file (sorted by name) wins, with a note.
    data = tmp_path / "results"
    shutil.copytree(TESTDATA, data)
    r = json.loads((data / "gateway.idle-none.json").read_text())
    r["server"]["bytes_per_session"] = 8192.0
    (data / "zz-anything.json").write_text(json.dumps(r))
    proc = subprocess.run([sys.executable, str(REPORT), str(data)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert row(proc.stdout, "server memory per idle session, plaintext")[1] == "8.0 KiB"
    assert "`zz-anything.json` replaces `gateway.idle-none.json`" in proc.stdout


def test_scaling_table(tmp_path):
    data = tmp_path / "scaling"
    data.mkdir()
    sweep = json.loads((TESTDATA / "gateway.chat-sweep.json").read_text())
    for k, top in ((1, 3000.0), (2, 5400.0)):
        r = json.loads(json.dumps(sweep))
        r["target"]["label"] = f"gateway {k} shards"
        for s in r["sweep"]:
            s["held"] = s["target_msgs_per_second"] <= top
        r["sweep"].append({"target_msgs_per_second": top, "delivered_msgs_per_second": top,
                           "latency_us": r["latency_us"], "lost": 0, "held": True})
        (data / f"shards-{k}.chat-sweep.json").write_text(json.dumps(r))
    proc = subprocess.run([sys.executable, str(REPORT), "--scaling", str(data)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert row(proc.stdout, "1 ")[1:3] == ["3,000", "1.00"]
    assert row(proc.stdout, "2 ")[1:3] == ["5,400", "0.90"]


def test_empty_directory_fails(tmp_path):
    proc = subprocess.run([sys.executable, str(REPORT), str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "no bench reports" in proc.stderr


def test_sweep_that_held_nothing_says_below_first_step(tmp_path):
    data = tmp_path / "results"
    shutil.copytree(TESTDATA, data)
    r = json.loads((data / "gateway.chat-sweep.json").read_text())
    r["target"]["label"] = "ejabberd 23.01"
    r["sweep"] = r["sweep"][:1]
    r["sweep"][0]["held"] = False
    r["passed"] = False
    (data / "ejabberd.chat-sweep.json").write_text(json.dumps(r))
    proc = subprocess.run([sys.executable, str(REPORT), str(data)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert row(proc.stdout, "1:1 chat: highest rate")[1:4] == ["4,000", "< 1,000", "—"]
