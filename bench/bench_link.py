"""Model upload throughput over emulated links against the link's ceiling and smpclient, in one run.

Measured: :meth:`DeviceClient.upload_model` (pipelined up to the device's ``buf_count``, SMP
model group). Baseline, same link and device: smpclient's own stop-and-wait
``SMPClient.upload()`` of the same number of bytes (image group, same request size). Links, paced
in real time by their timing models:

- BLE: emulated ring-gen3, 2M PHY, data length 251, ATT MTU 247, 15 ms interval, at most 10
  packet pairs per event each way: ceiling 10 x 244 B / 15 ms = 162,667 B/s of ATT payload.
  Targets: at least 75% of the ceiling and at least 2x stop-and-wait.
- Serial: emulated nRF52840 board on a pty, 115200 and 1,000,000 baud 8N1, SMP console framing
  (base64 lines): the ceiling is the SMP message bytes per second with the line always busy.
  Target: at least 85% of it.

    python bench/bench_link.py [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table
from smpclient import SMPClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from device_agent.link import LinkSettings, SMPTransportLink
from firmware_bundles import SigningKey, new_root
from hil.radio import RadioTiming
from hil.serial_device import UartTiming
from hil.targets import DeviceUnderTest, open_device

SETTINGS = LinkSettings(request_timeout_s=10, upload_timeout_s=10, connect_timeout_s=10)
#: The acceptance link (issue 6).
BLE_TIMING = RadioTiming(phy="2M", data_length=251, interval_s=0.015, max_pairs_per_event=10)


@dataclass(frozen=True)
class Case:
    name: str
    spec: str
    payload_bytes: int
    baud: int | None
    target_of_ceiling: float
    target_vs_baseline: float | None


CASES = [
    Case("BLE 2M, DLE 251, MTU 247, 15 ms", "emulated:ring-gen3", 150_000, None, 0.75, 2.0),
    Case("serial 115200 8N1", "emulated:devboard-nrf52840", 48_000, 115_200, 0.85, None),
    Case("serial 1,000,000 8N1", "emulated:devboard-nrf52840", 150_000, 1_000_000, 0.85, None),
]


@dataclass
class Row:
    link: str
    payload_bytes: int
    buf_size: int
    buf_count: int
    ceiling_bytes_per_s: float
    pipelined_bytes_per_s: float
    baseline_bytes_per_s: float
    target_of_ceiling: float
    target_vs_baseline: float | None

    @property
    def of_ceiling(self) -> float:
        return self.pipelined_bytes_per_s / self.ceiling_bytes_per_s

    @property
    def baseline_of_ceiling(self) -> float:
        return self.baseline_bytes_per_s / self.ceiling_bytes_per_s

    @property
    def vs_baseline(self) -> float:
        return self.pipelined_bytes_per_s / self.baseline_bytes_per_s

    @property
    def meets_targets(self) -> bool:
        ok = self.of_ceiling >= self.target_of_ceiling
        if self.target_vs_baseline is not None:
            ok = ok and self.vs_baseline >= self.target_vs_baseline
        return ok


async def measure(case: Case, work_dir: Path, repeat: int) -> Row:
    signer = SigningKey.generate()
    root = new_root(
        version=1,
        expires=datetime.now(UTC) + timedelta(days=1),
        role_keys={r: [signer.public] for r in ("root", "release", "director", "hil")},
        thresholds={},
    )
    dut: DeviceUnderTest = open_device(
        case.spec,
        work_dir=work_dir,
        root=root,
        settings=SETTINGS,
        uart=UartTiming(case.baud or 115_200),
        radio=BLE_TIMING,
    )
    await dut.start()
    try:
        client = await dut.connect()
        assert isinstance(client.link, SMPTransportLink)
        smp = SMPClient(client.link.transport, case.spec)
        pipelined, baseline = [], []
        for _ in range(repeat):
            # Fresh bytes each time, so neither upload resumes a previous session.
            payload = os.urandom(case.payload_bytes)
            result = await client.upload_model(payload)
            assert result.resumed_from == 0
            pipelined.append(result.throughput_bytes_per_s)
            payload = os.urandom(case.payload_bytes)
            started = time.perf_counter()
            async for _offset in smp.upload(payload, slot=1):
                pass
            baseline.append(case.payload_bytes / (time.perf_counter() - started))
        ceiling = dut.ceiling_bytes_per_s
        assert ceiling is not None
        return Row(
            link=case.name,
            payload_bytes=case.payload_bytes,
            buf_size=client.parameters.buf_size,
            buf_count=client.parameters.buf_count,
            ceiling_bytes_per_s=ceiling,
            pipelined_bytes_per_s=statistics.median(pipelined),
            baseline_bytes_per_s=statistics.median(baseline),
            target_of_ceiling=case.target_of_ceiling,
            target_vs_baseline=case.target_vs_baseline,
        )
    finally:
        await dut.stop()


def render(rows: list[Row]) -> Table:
    table = Table(title="Model upload over emulated links (median of runs; bytes of payload per s)")
    for column in (
        "link",
        "bytes",
        "buf",
        "ceiling B/s",
        "pipelined B/s",
        "of ceiling",
        "smpclient upload() B/s",
        "of ceiling",
        "pipelined / smpclient",
        "target",
        "met",
    ):
        table.add_column(column, justify="left" if column == "link" else "right")
    for row in rows:
        target = f">= {row.target_of_ceiling:.0%} of ceiling"
        if row.target_vs_baseline is not None:
            target += f", >= {row.target_vs_baseline:g}x"
        table.add_row(
            row.link,
            f"{row.payload_bytes:,}",
            f"{row.buf_size} x {row.buf_count}",
            f"{row.ceiling_bytes_per_s:,.0f}",
            f"{row.pipelined_bytes_per_s:,.0f}",
            f"{row.of_ceiling:.1%}",
            f"{row.baseline_bytes_per_s:,.0f}",
            f"{row.baseline_of_ceiling:.1%}",
            f"{row.vs_baseline:.2f}x",
            target,
            "yes" if row.meets_targets else "NO",
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="Uploads of each kind per link.")
    parser.add_argument("--json", action="store_true", help="Print rows as JSON instead.")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, case in enumerate(CASES):
            work_dir = Path(tmp) / str(index)
            work_dir.mkdir()
            rows.append(asyncio.run(measure(case, work_dir, args.repeat)))
    if args.json:
        out = [asdict(r) | {"of_ceiling": r.of_ceiling, "vs_baseline": r.vs_baseline} for r in rows]
        print(json.dumps(out, indent=2))
    else:
        Console(width=200).print(render(rows))
    sys.exit(0 if all(r.meets_targets for r in rows) else 1)


if __name__ == "__main__":
    main()
