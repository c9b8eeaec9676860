"""The live demo's device links: two phones of the fleet relay to emulated rings over Bumble, and
a Raspberry Pi of the fleet drives an emulated nRF52840 board on a pty, so every link is used.

Each ring and the board runs ``wrist-activity`` (the HIL sample model, TFLite Micro) on its own
emulated flash; its host enrolls it through the relay, fetches and verifies its assignment as a
Primary, pushes the bundle over the link (the device verifies it again as a Secondary), and
carries the device's telemetry back through the host's durable outbox
(:class:`device_agent.link.relay.RingRelay`). The hosts are simulated fleet devices with their
own credentials and state directories.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from fleet_sim import SimDevice, SimulatedFleet

from device_agent.client import FleetClient
from device_agent.fetch import BundleFetcher
from device_agent.link.config import LinkSettings
from device_agent.link.relay import RingRelay
from device_agent.outbox import Outbox
from firmware_bundles import SigningKey, TrustedRoot, parse_root
from hil.samples import heldout, sample_bundle
from hil.targets import DeviceUnderTest, open_device

LINK_MODEL = "wrist-activity"
#: (emulated device spec, the host's hardware id) per link.
LINKS = (
    ("emulated:ring-gen3", "phone-android"),
    ("emulated:ring-gen3", "phone-android"),
    ("emulated:devboard-nrf52840", "devboard-rpi4"),
)
SYNC_EVERY_S = 5.0


@dataclass
class Link:
    """One host and the device it serves."""

    host: SimDevice
    device: DeviceUnderTest
    relay: RingRelay | None = None
    device_id: str = ""
    inferences: int = 0
    installed: list[str] = field(default_factory=list)
    uploaded: int = 0
    errors: list[str] = field(default_factory=list)


class Links:
    """The demo's rings and board, and the hosts relaying for them."""

    def __init__(
        self,
        url: str,
        token: str,
        data_dir: Path,
        work_dir: Path,
        edgefleet: Callable[..., subprocess.CompletedProcess[str]],
    ) -> None:
        self.url = url
        self.admin = ["--server", url, "--token", token]
        self.data_dir = data_dir
        self.work_dir = work_dir
        self.edgefleet = edgefleet
        self.links: list[Link] = []
        self.stop = threading.Event()
        self.fleet: SimulatedFleet | None = None
        self.enroll_token = ""
        self.devices: list[DeviceUnderTest] = []
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self) -> None:
        """Publish and release the sample model for the ring and the board."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        key = SigningKey.from_pem((self.data_dir / "keys" / "release.pem").read_bytes())
        for target in ("ring-gen3", "devboard-nrf52840"):
            path = self.work_dir / f"{LINK_MODEL}-1.0.0-{target}.efb"
            path.write_bytes(sample_bundle([key], [target]))
            self.edgefleet("publish", str(path), *self.admin, quiet=True)
        self.edgefleet("release", LINK_MODEL, "1.0.0", *self.admin)
        self.enroll_token = json.loads(
            self.edgefleet(
                "tokens", "enroll", "--max-uses", "3", "--json", *self.admin, quiet=True
            ).stdout
        )["token"]

    def open(self, stop: threading.Event) -> None:
        """Power the devices on and connect to them, before the fleet opens its thousands of
        files: pyserial waits on the pty with ``select()``, which takes no descriptor above
        1023."""
        self.stop = stop
        root = parse_root((self.data_dir / "root.json").read_bytes())[1]
        self.devices = [
            open_device(spec, work_dir=self.work_dir, root=root, settings=LinkSettings(), index=i)
            for i, (spec, _) in enumerate(LINKS)
        ]
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), name="links")
        self._thread.start()
        if not self._connected.wait(120):
            raise SystemExit("demo failed: the rings and the board did not connect")

    def start(self, fleet: SimulatedFleet) -> None:
        """Give each device a host from ``fleet`` (online devices of the right hardware)."""
        taken: set[str] = set()
        links = []
        for device, (_, host_hardware) in zip(self.devices, LINKS, strict=True):
            host = next(
                d
                for d in fleet.devices
                if d.hardware_id == host_hardware and d.online and d.agent.device_id not in taken
            )
            taken.add(host.agent.device_id)
            links.append(Link(host, device))
        self.fleet = fleet
        self.links = links

    async def _serve(self) -> None:
        try:
            for device in self.devices:
                await device.start()
                await device.connect()
        finally:
            self._connected.set()
        try:
            while not self.stop.is_set():
                for link in self.links:
                    try:
                        await self._round(link)
                    except Exception as exc:  # a link's trouble is reported, never fatal
                        error = f"{type(exc).__name__}: {exc}"
                        if error not in link.errors:
                            print(f"-- link {link.device.spec}: {error}", flush=True)
                        link.errors.append(error)
                        del link.errors[:-5]
                        with contextlib.suppress(Exception):
                            await link.device.disconnect()
                        link.device.client = None
                await asyncio.sleep(SYNC_EVERY_S)
        finally:
            for device in self.devices:
                await device.stop()

    def _relay(self, link: Link) -> RingRelay:
        assert self.fleet is not None and link.device.client is not None
        host = link.host.agent
        state = host.state_dir
        client = FleetClient(self.fleet.http, self.url, state, host.settings.http_timeout_s)
        credential = client.credential()
        assert credential is not None, "the host is enrolled"
        return RingRelay(
            ring=link.device.client,
            fleet=client,
            credential=credential,
            root=TrustedRoot.from_pinned(
                (self.data_dir / "root.json").read_bytes(), datetime.now(UTC)
            ),
            fetcher=BundleFetcher(client, host.settings),
            work_dir=state / f"relay-{link.device.spec.rpartition(':')[2]}",
            outbox=Outbox(state / "relayed-outbox.sqlite", host.settings.outbox_max_bytes),
        )

    async def _round(self, link: Link) -> None:
        if link.device.client is None:
            await link.device.connect()  # again, after a failure
            link.relay = None
        if link.relay is None:
            link.relay = self._relay(link)
            if not link.device_id:
                link.device_id = await link.relay.enroll_ring(
                    link.host.agent.device_id, self.enroll_token
                )
        assert link.relay is not None and link.device.client is not None
        if link.installed:
            rows = heldout(4, seed=len(link.errors) + link.inferences)[0]
            for row in rows:
                await link.device.client.infer({"input": np.asarray(row[None, :], np.float32)})
            link.inferences += len(rows)
        outcome = await link.relay.sync()
        link.installed += outcome.installed
        link.uploaded += outcome.telemetry_uploaded

    def report(self) -> None:
        for link in self.links:
            via = "Bumble BLE" if "ring" in link.device.spec else "a pty (UART)"
            print(
                f"{link.device_id or link.device.spec} over {via} from {link.host.agent.device_id}:"
                f" installed {', '.join(link.installed) or 'nothing'}, {link.inferences}"
                f" inferences, {link.uploaded} telemetry pieces carried to the server"
                + (f"; last error: {link.errors[-1]}" if link.errors else ""),
                flush=True,
            )

    def problems(self) -> list[str]:
        """Links that never installed the model or carried telemetry back (empty: all did)."""
        return [
            f"{link.device.spec} from {link.host.agent.device_id}: installed"
            f" {link.installed or 'nothing'}, {link.uploaded} telemetry pieces carried"
            + (f" ({link.errors[-1]})" if link.errors else "")
            for link in self.links
            if not link.installed or not link.uploaded
        ]

    def close(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
