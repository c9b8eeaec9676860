"""A timing model of the BLE radio, applied in real time to Bumble's in-process ``LocalLink``.

A ``LocalLink`` hands data between controllers at once; :class:`PacedLocalLink` holds each
L2CAP PDU until the connection event that would carry it. Per the Core spec's link layer: every
connection interval one connection event; in it, up to ``max_pairs_per_event`` packet pairs
(central to peripheral, then peripheral to central, 150 us apart), each link-layer packet
carrying at most ``data_length`` bytes of L2CAP; a PDU is delivered when its last packet has
been sent. Only PDUs queued before an event starts go in it, so a response leaves no earlier
than the connection event after its request's last packet.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

try:
    from bumble import core
    from bumble.link import LocalLink
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the emulated BLE ring needs the 'ble' extra: pip install 'edgefleet[ble]'"
    ) from exc

#: Inter-frame space between packets of a connection event.
T_IFS_S = 150e-6
#: Preamble bytes per PHY; access address 4, header 2, CRC 3 bytes on both.
_PREAMBLE = {"1M": 1, "2M": 2}
_RATE_BITS_PER_S = {"1M": 1_000_000, "2M": 2_000_000}
_L2CAP_HEADER = 4
_ATT_WRITE_HEADER = 3


@dataclass(frozen=True)
class RadioTiming:
    """The link parameters the model paces by.

    Attributes:
        phy: ``1M`` or ``2M``.
        data_length: Link-layer payload bytes per packet (27 without DLE, up to 251 with it).
        interval_s: The connection interval (7.5 ms to 4 s; iOS allows 15 ms and up).
        max_pairs_per_event: The controllers' cap on packet pairs per connection event.
    """

    phy: Literal["1M", "2M"] = "2M"
    data_length: int = 251
    interval_s: float = 0.015
    max_pairs_per_event: int = 10

    def air_time_s(self, payload_bytes: int) -> float:
        """Time on air of one link-layer packet carrying ``payload_bytes``."""
        octets = _PREAMBLE[self.phy] + 4 + 2 + payload_bytes + 3
        return octets * 8 / _RATE_BITS_PER_S[self.phy]

    def pair_time_s(self, central_bytes: int, peripheral_bytes: int) -> float:
        """One packet each way plus the two inter-frame spaces."""
        return self.air_time_s(central_bytes) + self.air_time_s(peripheral_bytes) + 2 * T_IFS_S

    @property
    def pairs_per_event(self) -> int:
        """Full-size packet pairs (data one way, empty the other) that fit in an event."""
        fit = math.floor(self.interval_s / self.pair_time_s(self.data_length, 0))
        return max(1, min(self.max_pairs_per_event, fit))

    def att_payload_per_packet(self, att_mtu: int) -> float:
        """ATT write payload per link-layer packet, writes of ``att_mtu - 3`` bytes back to back.

        A write is an L2CAP PDU of ``att_mtu + 4`` bytes, cut into packets of ``data_length``.
        """
        packets = math.ceil((att_mtu + _L2CAP_HEADER) / self.data_length)
        return (att_mtu - _ATT_WRITE_HEADER) / packets

    def ceiling_bytes_per_s(self, att_mtu: int) -> float:
        """ATT payload bytes per second one way with every event full."""
        return self.pairs_per_event * self.att_payload_per_packet(att_mtu) / self.interval_s


@dataclass
class _Pdu:
    queued_at: float
    data: bytes
    deliver: Any  # zero-argument callable that hands the PDU to the receiving controller
    sender: str
    sent: int = 0


@dataclass
class _Connection:
    """The two directions of one controller pair's connection."""

    anchor: float
    queues: dict[Any, deque[_Pdu]] = field(default_factory=dict)
    next_event: asyncio.TimerHandle | None = None


@dataclass
class RadioStats:
    """What the model put on the air.

    Attributes:
        delivered: The latest delivered PDUs as (connection event number, sender's name).
    """

    events: int = 0
    packets: int = 0
    pdus: int = 0
    dropped_pdus: int = 0
    delivered: deque[tuple[int, str]] = field(default_factory=lambda: deque(maxlen=256))


class PacedLocalLink(LocalLink):
    """A Bumble ``LocalLink`` whose LE data moves at the pace of :class:`RadioTiming`."""

    def __init__(self, timing: RadioTiming | None = None) -> None:
        super().__init__()
        self.timing = timing or RadioTiming()
        self.stats = RadioStats()
        self._connections: dict[frozenset[Any], _Connection] = {}

    def send_acl_data(
        self, sender_controller: Any, destination_address: Any, transport: Any, data: bytes
    ) -> None:
        if transport != core.PhysicalTransport.LE:
            super().send_acl_data(sender_controller, destination_address, transport, data)
            return
        destination = self.find_le_controller(destination_address)
        if destination is None:
            self.stats.dropped_pdus += 1
            return
        loop = asyncio.get_running_loop()
        source = sender_controller.random_address
        key = frozenset((id(sender_controller), id(destination)))
        connection = self._connections.get(key)
        if connection is None:
            connection = self._connections[key] = _Connection(anchor=loop.time())
        queue = connection.queues.setdefault(id(sender_controller), deque())

        def deliver() -> None:
            if destination.le_connections.get(source) is None:
                self.stats.dropped_pdus += 1  # the connection went down while it was on the air
                return
            destination.on_link_acl_data(source, transport, data)

        queue.append(_Pdu(loop.time(), data, deliver, str(sender_controller.name)))
        self._schedule(connection, loop)

    def drop_pending(self) -> int:
        """Forget every PDU not yet on the air (the connection is gone); returns how many."""
        dropped = 0
        for connection in self._connections.values():
            for queue in connection.queues.values():
                dropped += len(queue)
                queue.clear()
            if connection.next_event is not None:
                connection.next_event.cancel()
                connection.next_event = None
        self._connections.clear()
        self.stats.dropped_pdus += dropped
        return dropped

    def _schedule(self, connection: _Connection, loop: asyncio.AbstractEventLoop) -> None:
        if connection.next_event is not None:
            return
        interval = self.timing.interval_s
        now = loop.time()
        # The first event that starts strictly after now: data queued now cannot make an
        # event that has already begun.
        index = math.floor((now - connection.anchor) / interval) + 1
        start = connection.anchor + index * interval
        connection.next_event = loop.call_at(start, self._event, connection, start)

    def _event(self, connection: _Connection, start: float) -> None:
        connection.next_event = None
        loop = asyncio.get_running_loop()
        timing = self.timing
        number = round((start - connection.anchor) / timing.interval_s)
        directions = list(connection.queues.values())
        elapsed = 0.0
        pairs = 0
        self.stats.events += 1
        while pairs < timing.pairs_per_event:
            heads = [_eligible(queue, start) for queue in directions]
            if not any(heads):
                break
            sizes = [self._next_packet(pdu) for pdu in heads]
            while len(sizes) < 2:
                sizes.append(0)
            duration = timing.pair_time_s(sizes[0], sizes[1])
            if elapsed + duration > timing.interval_s:
                break
            elapsed += duration
            pairs += 1
            for queue, pdu, size in zip(directions, heads, sizes, strict=False):
                if pdu is None:
                    continue
                pdu.sent += size
                self.stats.packets += 1
                if pdu.sent >= len(pdu.data):
                    queue.popleft()
                    self.stats.pdus += 1
                    self.stats.delivered.append((number, pdu.sender))
                    loop.call_at(start + elapsed, pdu.deliver)
        if any(directions):
            # Next interval, even if this callback ran late: eligibility uses nominal event
            # times, so a busy host loop delays delivery without changing the link's pace.
            following = start + timing.interval_s
            connection.next_event = loop.call_at(following, self._event, connection, following)

    def _next_packet(self, pdu: _Pdu | None) -> int:
        if pdu is None:
            return 0
        return min(self.timing.data_length, len(pdu.data) - pdu.sent)


def _eligible(queue: deque[_Pdu], event_start: float) -> _Pdu | None:
    if queue and queue[0].queued_at < event_start:
        return queue[0]
    return None
