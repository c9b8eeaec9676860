"""The link timing models: ceilings from the Bluetooth and UART arithmetic, and event pacing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from device_agent.link import DeviceClient
from device_agent.link.ble import BumbleConnectionLink
from firmware_bundles.root import Root
from hil.ble_device import BleRing
from hil.device import EmulatedDevice
from hil.profiles import profile_for
from hil.radio import RadioTiming
from hil.serial_device import UartTiming
from tests.cases import named_cases


def test_ble_ceiling_of_the_acceptance_link() -> None:
    timing = RadioTiming(phy="2M", data_length=251, interval_s=0.015, max_pairs_per_event=10)
    assert timing.att_payload_per_packet(247) == 244
    assert timing.pairs_per_event == 10
    assert timing.ceiling_bytes_per_s(247) == pytest.approx(10 * 244 / 0.015)


CEILINGS = [
    # (phy, data length, interval, cap, ATT MTU, pairs per event, ceiling B/s)
    ("1M-no-dle", "1M", 27, 0.015, 10, 247, 10, 10 * (244 / 10) / 0.015),
    ("1M-dle", "1M", 251, 0.015, 10, 247, 6, 6 * 244 / 0.015),
    ("2M-dle-7.5ms", "2M", 251, 0.0075, 10, 247, 5, 5 * 244 / 0.0075),
    ("2M-dle-small-mtu", "2M", 251, 0.015, 10, 23, 10, 10 * 20 / 0.015),
    ("2M-cap-4", "2M", 251, 0.015, 4, 247, 4, 4 * 244 / 0.015),
]


@named_cases(("phy", "dle", "interval", "cap", "mtu", "pairs", "ceiling"), CEILINGS)
def test_ble_ceilings(
    phy: str, dle: int, interval: float, cap: int, mtu: int, pairs: int, ceiling: float
) -> None:
    timing = RadioTiming(phy=phy, data_length=dle, interval_s=interval, max_pairs_per_event=cap)  # type: ignore[arg-type]
    assert timing.pairs_per_event == pairs
    assert timing.ceiling_bytes_per_s(mtu) == pytest.approx(ceiling)


def test_uart_framed_ceilings_match_the_console_framing() -> None:
    # 2044-byte SMP messages (buf_size 2048): base64 lines of 128 bytes cost about x1.37.
    assert UartTiming(115200).framed_ceiling_bytes_per_s(2044) == pytest.approx(8406, rel=0.01)
    assert UartTiming(1_000_000).framed_ceiling_bytes_per_s(2044) == pytest.approx(72974, rel=0.01)
    assert UartTiming(115200).bytes_per_s == 11520


def test_a_response_leaves_in_the_connection_event_after_its_request(
    tmp_path: Path, root: Root
) -> None:
    async def scenario() -> list[tuple[int, str]]:
        device = EmulatedDevice(profile_for("ring-gen3"), tmp_path / "r.flash", root, device_id="r")
        ring = BleRing(device, RadioTiming())
        await ring.start()
        try:
            client = DeviceClient(BumbleConnectionLink(await ring.connect()))
            await client.connect()
            ring.link.stats.delivered.clear()
            await client.echo("x" * 600)  # three ATT writes, one notification back
            return list(ring.link.stats.delivered)
        finally:
            await ring.stop()

    delivered = asyncio.run(scenario())
    requests = [event for event, sender in delivered if sender == "phone"]
    responses = [event for event, sender in delivered if sender == "ring"]
    # Three writes, in order (on an idle machine all in one event; on a busy one the client may
    # queue the last after that event has closed, so they can span two).
    assert len(requests) == 3 and requests == sorted(requests), delivered
    assert len(responses) == 3, delivered
    # No earlier than the event after the request's last write (on an idle machine exactly the
    # next one).
    assert min(responses) > max(requests), delivered
