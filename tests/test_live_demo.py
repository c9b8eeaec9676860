"""`make demo ARGS=--once`: the live fleet's story, run as a user runs it, judged by its log.

The demo exits 0 only when the server's decision logs show its own evaluator completing v2 and
halting and rolling back v3 (demo/narrator.py's ``check_story``); this test reads the same from
the demo's printed log, so a demo that took the decisions itself, or printed success without
them, fails here.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: The demo's own deadline (demo/live_fleet.py's ONCE_DEADLINE_S, 14 minutes) is inside this.
DEMO_TIMEOUT_S = 900


@pytest.mark.timeout(DEMO_TIMEOUT_S + 60)
def test_the_live_demo_tells_its_story_by_the_evaluators_decisions(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "demo" / "live_fleet.py"), "--once", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        env=env,
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert re.search(r"Dashboard: http://127\.0\.0\.1:\d+/ui/", log)
    # v2 went through its stages on the evaluator's word, and completed on it, with figures.
    assert re.search(r"\[v2\.0\.0 stage \d\] evaluator: advance \(running -> running\)", log)
    assert re.search(r"\[v2\.0\.0 stage \d\] evaluator: complete \(running -> completed\)", log)
    # v3 was halted and rolled back by the evaluator on a failed gate, with its figures.
    halt = re.search(
        r"\[v3\.0\.0 stage \d\] evaluator: halt \(running -> rolled-back\): gate failed: .*\n"
        r"    figures: treatment \d+ devices/\d+ inferences, control \d+/\d+.*fail: estimate",
        log,
    )
    assert halt, log[-6000:]
    assert "devices are back online after two days away" in log
    assert "v2 completed and v3 halted and rolled back, each by the server's evaluator" in log
    assert "MISSING" not in log
    # Each step shows the story's clock.
    assert re.search(r"\n== 6\. Roll out 3\.0\.0.*  \[\d+:\d\d\]\n", log)


def test_a_story_out_of_time_names_the_wait_the_limit_and_what_it_found(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [
            *(sys.executable, str(REPO / "demo" / "live_fleet.py"), "--once"),
            *("--devices", "20", "--deadline-s", "1", "--out", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    # The one-second deadline has run out by the first wait (the history's upload, unless the
    # 20 devices' uploads all landed before its first look; then the next), and what it found.
    failed = re.search(
        r"demo failed at \d+:\d\d: waited \d+ s for (.+), the story's deadline of 1 s ran out;"
        r" (.+)\n",
        log,
    )
    assert failed, log[-3000:]
    found = {
        "the fleet's history on the server": r"\d+ of \d+ on the server",
        "2.0.0 to finish its rollout": r"v2\.0\.0 is running; its last decision: .+",
    }
    assert failed.group(1) in found, failed.group(0)
    assert re.fullmatch(found[failed.group(1)], failed.group(2)), failed.group(0)
    # Everything it started was stopped: no server is left answering.
    port = re.search(r"Dashboard: http://127\.0\.0\.1:(\d+)/ui/", log)
    assert port, log[-3000:]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(port.group(1))), timeout=2).close()
