"""EdgeFleet's live demo: a fleet server with its dashboard, and a simulated fleet rolling out.

One command, nothing else to start: the server on the embedded default (SQLite and blobs in one
data directory), the digits example converted three times (demo/fleet_models.py), a simulated
fleet of devices each running the real agent (demo/fleet_sim.py), two phones relaying to emulated
rings over Bumble and a host driving a board on a pty (demo/fleet_links.py). The story:

1. v1 is released; the devices enroll, install it, and play their last two days on it (device
   clocks only); a few of them stay offline.
2. v2 rolls out in stages (20%, 50%, 100%); the server's evaluator advances each stage when its
   gates pass against the control arm and the stage's minimum duration is up. Mid-way, the
   offline devices come back and upload days of windows late.
3. v3, into which the demo injected a regression (slower, and wrong on two digits), rolls out; its
   gates fail and the evaluator halts it and takes the treatment devices back to v2.

It prints the dashboard's URL and a line per decision as the server takes it, then keeps the
fleet running until Ctrl-C. With ``--once`` it exits after the story: 0 only if the decision logs
show the evaluator completing v2 and halting and rolling back v3, with the figures.

    python demo/live_fleet.py [--once] [--devices 1000] [--seed 16] [--out build/live-demo]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from fleet_demo import Background, free_port, wait_for  # noqa: E402
from fleet_links import Links  # noqa: E402
from fleet_models import HARDWARE_IDS, MODEL, build_versions  # noqa: E402
from fleet_sim import FleetSettings, SimulatedFleet  # noqa: E402
from narrator import Narrator, check_story  # noqa: E402

#: The whole --once story must end within this. It takes 7 minutes on a quiet 2-core machine (and
#: under a one-core CPU hog); beside CI's other tests it took more than 9.5 (tests/test_live_demo.py
#: gives it 15).
ONCE_DEADLINE_S = 840.0
#: The rollout evaluator's period in the demo's server (the default is a minute).
EVALUATION_S = 10
#: Each rollout's stages (percent of the selected devices in the treatment arm). The first is a
#: fifth of the fleet: at a tenth, 1,000 devices gave the first stage's gates enough treatment
#: data only after 3-4 minutes, and the story ran past its deadline on a busy machine.
STAGES = (20, 50, 100)
#: The default gates, but latency on the median with a 50% threshold: a simulated device's
#: latencies include waits for the Python GIL that a thousand devices in one process share,
#: far noisier than a phone's, and p95 of that noise would hold every stage for many minutes.
GATES: dict[str, Any] = {"latency": {"quantile": 0.5, "max_relative_increase": 0.5}}
#: How often the demo reads the decision logs.
POLL_S = 5.0


def say(text: str) -> None:
    print(text, flush=True)


#: When the story began (its clock, shown at each step and in a failure).
STARTED = time.monotonic()


def clock() -> str:
    """The story's time so far, as m:ss."""
    minutes, seconds = divmod(int(time.monotonic() - STARTED), 60)
    return f"{minutes}:{seconds:02d}"


def step(title: str) -> None:
    say(f"\n== {title}  [{clock()}]")


def edgefleet(*args: str, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, echoing the command (and its output unless ``quiet``)."""
    say("$ edgefleet " + " ".join(a if not a.startswith("efa_") else "efa_..." for a in args))
    env = {**os.environ, "COLUMNS": "160"}
    proc = subprocess.run(
        [sys.executable, "-m", "edgefleet", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if not quiet or proc.returncode != 0:
        sys.stdout.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"demo failed: edgefleet {args[0]} exited {proc.returncode}")
    return proc


class Story:
    """The demo's state: the server, the fleet, the links and the narrator."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = threading.Event()
        self.background: list[Background] = []
        self.threads: list[threading.Thread] = []
        self.fleet: SimulatedFleet | None = None
        self.links: Links | None = None
        self.narrator: Narrator | None = None
        self.url = ""
        self.token = ""
        self.ram_dir: Path | None = None

    # -- helpers --------------------------------------------------------------------------------

    def left_s(self) -> float:
        return self.args.deadline_s - (time.monotonic() - STARTED)

    def admin(self) -> list[str]:
        return ["--server", self.url, "--token", self.token]

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        answer = httpx.request(
            method,
            self.url + path,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
            **kwargs,
        )
        answer.raise_for_status()
        return answer.json()

    def inferences(self, version: str | None = None) -> int:
        rows = self.api("GET", "/v1/telemetry/rollups", params={"model": MODEL})
        return sum(
            int(r["inference_count"]) for r in rows if version is None or r["version"] == version
        )

    def wait(
        self,
        done: Callable[[], bool],
        what: str,
        timeout_s: float,
        status: Callable[[], str] | None = None,
    ) -> None:
        """Narrate while waiting for ``done``; exit naming ``what``, which limit ran out and
        ``status()`` (what was there instead) after ``timeout_s`` (and, with --once, at the
        story's deadline)."""
        began = time.monotonic()
        while not done():
            if self.narrator is not None:
                self.narrator.poll()
            waited = time.monotonic() - began
            if waited > timeout_s or (self.args.once and self.left_s() < 0):
                limit = (
                    f"its {timeout_s:.0f} s"
                    if waited > timeout_s
                    else f"the story's deadline of {self.args.deadline_s:.0f} s"
                )
                found = f"; {status()}" if status is not None else ""
                raise SystemExit(
                    f"demo failed at {clock()}: waited {waited:.0f} s for {what}, {limit} ran"
                    f" out{found}"
                )
            time.sleep(POLL_S)
        if self.narrator is not None:
            self.narrator.poll()

    def spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    # -- the story ------------------------------------------------------------------------------

    def serve(self) -> None:
        step("1. The fleet server: SQLite and blobs in one data dir, the dashboard under /ui/")
        os.environ["EDGEFLEET_ROLLOUT_EVALUATION_S"] = str(EVALUATION_S)
        port = self.args.port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        server = Background(
            Path("server.log"), "serve", "--init", "--data-dir", "fleet-data", "--port", str(port)
        )
        self.background.append(server)  # stopped on the way out, even if it never answers

        def healthy() -> bool:
            if server.proc.poll() is not None:
                raise SystemExit(f"demo failed: the server exited: {server.log.read_text()}")
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200

        wait_for(healthy, "the server to answer /healthz")
        found = re.search(r"efa_[A-Za-z0-9_-]+", Path("server.log").read_text())
        if found is None:
            raise SystemExit("demo failed: the server printed no admin token")
        self.token = found.group(0)
        Path("admin-token.txt").write_text(self.token + "\n")
        say(f"the server's rollout evaluator runs every {EVALUATION_S} s, on its own (real) clock")

    def publish(self) -> dict[str, list[Path]]:
        step("2. Convert the digits example three times; publish all, release 1.0.0")
        release_key = Path("fleet-data") / "keys" / "release.pem"
        bundles = build_versions(edgefleet, [release_key], Path("."))
        for paths in bundles.values():
            for path in paths:
                edgefleet("publish", str(path), *self.admin(), quiet=True)
        edgefleet("release", MODEL, "1.0.0", *self.admin())
        return bundles

    def device_dir(self) -> Path:
        """Where the devices keep their state: on a RAM disk when there is one (a thousand
        devices' fsyncs on one shared disk would measure the disk, not the fleet)."""
        shm = Path("/dev/shm")
        if shm.is_dir() and os.access(shm, os.W_OK):
            self.ram_dir = Path(tempfile.mkdtemp(prefix="edgefleet-demo-devices-", dir=shm))
            say(f"device state dirs: {self.ram_dir} (a RAM disk)")
            return self.ram_dir
        return Path("devices")

    def enroll(self) -> SimulatedFleet:
        count = self.args.devices
        step(f"3. A simulated fleet of {count} devices, each the real agent: enroll, install 1.0.0")
        token = json.loads(
            edgefleet(
                "tokens",
                "enroll",
                "--max-uses",
                str(count + 10),
                "--json",
                *self.admin(),
                quiet=True,
            ).stdout
        )["token"]
        x = np.load("examples/digits-1.0.0/eval.npz")
        fleet = SimulatedFleet(
            server_url=self.url,
            root_path=Path("fleet-data") / "root.json",
            enroll_token=token,
            state_dir=self.device_dir(),
            count=count,
            seed=self.args.seed,
            data=(x["X"], x["y"]),
            model=MODEL,
            hardware_mix={"phone-android": 0.85, "devboard-rpi4": 0.15},
            settings=FleetSettings(),
        )
        self.fleet = fleet
        started = time.monotonic()
        done = fleet.enroll_and_install()
        versions = fleet.active_versions()
        say(
            f"{len(fleet.devices)} devices enrolled, {done.check_ins} check-ins in"
            f" {time.monotonic() - started:.0f} s; running: {dict(versions)}"
        )
        if versions.get("1.0.0", 0) < 0.95 * count:
            errors = fleet.recent_errors()
            raise SystemExit(f"demo failed: too few devices installed 1.0.0: {errors}")
        return fleet

    def history(self, fleet: SimulatedFleet) -> list[str]:
        step("4. The fleet's last two days on 1.0.0, played in device time; 6% of devices offline")
        offline = fleet.pick(0.06, self.args.seed + 1)
        fleet.set_online(offline, False)
        played = fleet.play_history(days=2, step_h=12, per_step=12)
        say(
            f"{played.predictions} predictions with event times over the last two days (device"
            f" clocks); {len(offline)} devices are offline and keep theirs in their outboxes"
        )
        self.spawn(lambda: fleet.run(self.stop, tick_s=3.0), "fleet")
        self.wait(
            lambda: self.inferences("1.0.0") >= 0.8 * played.predictions,
            "the fleet's history on the server",
            240,
            status=lambda: f"{self.inferences('1.0.0')} of {played.predictions} on the server",
        )
        say(f"on the server: {self.inferences('1.0.0')} inferences of 1.0.0 (uploaded late)")
        return offline

    def roll_out(self, version: str, *, stage_s: int) -> int:
        """Create and start a rollout of ``version``, as an operator would (the API's plan)."""
        plan = {
            "model": MODEL,
            "version": version,
            "selector": {"hardware_ids": list(HARDWARE_IDS)},
            "stages": [
                {"percent": p, "min_duration_s": stage_s, "min_devices": 10, "min_inferences": 500}
                for p in STAGES
            ],
            "gates": GATES,
        }
        say(f"$ POST /v1/rollouts {json.dumps(plan)}")
        created = self.api("POST", "/v1/rollouts", json=plan)
        assert self.narrator is not None
        self.narrator.watch(int(created["id"]), version)
        shares = ", ".join(f"{p}%" for p in STAGES)
        say(
            f"rollout {created['id']}: {version} to {', '.join(HARDWARE_IDS)} in stages of"
            f" {shares}, each at least {stage_s} s; gates against the control arm"
        )
        say(f"watch it: {self.url}/ui/rollouts/{created['id']}")
        return int(created["id"])

    def run(self) -> int:
        self.serve()
        token_file = Path("admin-token.txt").resolve()
        say(f"\nDashboard: {self.url}/ui/  (log in with the token in {token_file})")
        if not self.args.once:
            say("It runs until Ctrl-C, which stops the fleet, the links and the server.")
        self.publish()
        self.links = Links(self.url, self.token, Path("fleet-data"), Path("links"), edgefleet)
        self.links.publish()
        self.links.open(self.stop)
        fleet = self.enroll()
        narrator = self.narrator = Narrator(self.url, self.token, say)
        offline = self.history(fleet)
        self.links.start(fleet)

        step("5. Roll out 2.0.0: each stage advances when its gates pass")
        v2 = self.roll_out("2.0.0", stage_s=self.args.stage_s)
        back = False

        def v2_done() -> bool:
            nonlocal back
            detail = narrator.watched[v2]
            if not back and any(d["action"] == "advance" for d in detail.decisions):
                back = True
                fleet.set_online(offline, True)
                say(
                    f"-- {len(offline)} devices are back online after two days away: their"
                    " windows from then on arrive now, late; the evaluator judges again with them"
                )
            return detail.state != "running"

        self.wait(v2_done, "2.0.0 to finish its rollout", 480, status=lambda: narrator.status(v2))
        say(f"devices running each version: {dict(fleet.active_versions())}")

        step("6. Roll out 3.0.0, into which the demo injected a regression: slower, wrong on 8s/9s")
        v3 = self.roll_out("3.0.0", stage_s=self.args.stage_s)
        self.wait(
            lambda: narrator.state(v3) != "running",
            "3.0.0 to be judged",
            300,
            status=lambda: narrator.status(v3),
        )
        self.wait(
            lambda: fleet.active_versions().get("3.0.0", 0) == 0,
            "the treatment devices to be back on 2.0.0",
            120,
            status=lambda: (
                f"devices running each version: {dict(fleet.active_versions())}; recent device"
                f" errors: {fleet.recent_errors() or 'none'}"
            ),
        )
        say(f"devices running each version: {dict(fleet.active_versions())}")
        if self.args.screenshot:
            from screenshot import rollout_page

            rollout_page(self.url, self.token, v3, Path(self.args.screenshot))
        self.links.report()

        step("The story's decisions, as the server's decision logs record them")
        problems = check_story(narrator, v2, v3) + self.links.problems()
        for problem in problems:
            say(f"MISSING: {problem}")
        if not problems:
            say("v2 completed and v3 halted and rolled back, each by the server's evaluator")
        elapsed = time.monotonic() - STARTED
        say(f"story told in {elapsed:.0f} s; fleet errors: {fleet.totals.errors}")
        if self.args.once:
            return 1 if problems else 0
        say(f"\nThe fleet keeps running. Dashboard: {self.url}/ui/ ; Ctrl-C to stop.")
        while True:
            narrator.poll()
            time.sleep(2)

    def close(self) -> None:
        """Stop everything this started; the server last, and whatever else failed to stop."""
        self.stop.set()
        try:
            for thread in self.threads:
                thread.join(timeout=60)
            for part in (self.links, self.fleet, self.narrator):
                if part is not None:
                    part.close()
        finally:
            for process in reversed(self.background):
                process.stop()
            if self.ram_dir is not None:
                shutil.rmtree(self.ram_dir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="Tell the story once and exit.")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--stage-s", type=int, default=30, help="Minimum duration of a stage.")
    parser.add_argument(
        "--deadline-s", type=float, default=ONCE_DEADLINE_S, help="--once gives up after this."
    )
    parser.add_argument("--port", type=int, default=0, help="Server port (default: a free one).")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "live-demo")
    parser.add_argument("--screenshot", help="Write the v3 rollout page here once it halted.")
    args = parser.parse_args()
    if args.screenshot:
        args.screenshot = str(Path(args.screenshot).resolve())
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    os.chdir(out)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # Shorter GIL slices: a device's inference waits less for the other devices' Python.
    sys.setswitchinterval(0.0005)
    story = Story(args)
    try:
        return story.run()
    except KeyboardInterrupt:
        say("\nstopping: the fleet, the links, the server")
        return 0 if not args.once else 130
    finally:
        story.close()


if __name__ == "__main__":
    sys.exit(main())
