"""Pipelined, resumable SMP uploads: up to ``buf_count`` chunks in flight, resumed by SHA-256.

The same engine serves the model group's upload and the image group's firmware upload; only
the request class differs. The first request (offset 0, with ``len`` and ``sha`` and no data) is a
probe: a device holding a session for the same SHA-256 answers its offset and the upload
continues from there, never from zero.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from smp import message

from device_agent.link.errors import LinkError, ProtocolError, UploadMismatch

if TYPE_CHECKING:
    from device_agent.link.client import DeviceClient

#: Builds the request carrying ``data`` at ``off``; ``first`` adds ``len`` and ``sha``.
RequestFactory = Callable[[int, bytes, bool], message.WriteRequest]
#: Called with the device's acknowledged offset after each response.
ProgressHook = Callable[[int], None]


@dataclass(frozen=True)
class UploadResult:
    """How an upload went.

    Attributes:
        length: Bytes of the whole image or bundle.
        resumed_from: The offset the device resumed from; 0 when it started afresh.
        requests: Requests sent in this call, the probe included.
        data_bytes_sent: Payload bytes sent in this call (re-sent ones included).
        elapsed_s: Wall time of this call.
        window: Requests kept in flight.
    """

    length: int
    resumed_from: int
    requests: int
    data_bytes_sent: int
    elapsed_s: float
    window: int

    @property
    def throughput_bytes_per_s(self) -> float:
        """New bytes moved per second in this call."""
        moved = self.length - self.resumed_from
        return moved / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _bstr_header(n: int) -> int:
    return 1 if n < 24 else 2 if n < 256 else 3 if n < 65536 else 5


def fit_data(make: RequestFactory, off: int, first: bool, budget: int) -> int:
    """The most payload bytes a request at ``off`` can carry within ``budget`` frame bytes.

    Raises:
        LinkError: If not even one byte fits (a device buffer too small for the request).
    """
    overhead = len(make(off, b"", first).BYTES) - 1  # an empty bstr costs 1 byte
    for header in (5, 3, 2, 1):
        n = budget - overhead - header
        if n > 0 and _bstr_header(n) <= header:
            return n
    raise LinkError(f"device buffer of {budget} bytes cannot carry an upload request")


async def pipelined_upload(
    client: DeviceClient,
    data: bytes,
    make: RequestFactory,
    *,
    command: str,
    sha256_hex: str,
    window: int,
    timeout_s: float,
    on_progress: ProgressHook | None = None,
) -> UploadResult:
    """Upload ``data`` with up to ``window`` requests in flight, resuming at the device's offset.

    Raises:
        DeviceRejected: If the device refuses a chunk (the other responses are drained first).
        UploadMismatch: If the device's SHA-256 of the finished upload differs.
        Disconnected, LinkTimeout: If the link fails; call again to resume.
    """
    started = time.perf_counter()
    total = len(data)
    budget = client.link.max_frame_bytes
    requests = 0
    sent_bytes = 0

    # The probe carries no data, so its answer is unambiguous: 0 for a new session, or the
    # offset the device resumes from.
    probe = await client.request_as(make(0, b"", True), command, timeout_s)
    requests += 1
    off = _offset(probe, command)
    resumed_from = off
    if on_progress:
        on_progress(off)

    in_flight: deque[int] = deque()  # the offset each outstanding response should report
    next_off = off
    last = probe
    while off < total:
        while len(in_flight) < window and next_off < total:
            first = next_off == 0
            size = min(fit_data(make, next_off, first, budget), total - next_off)
            await client.send_request(make(next_off, data[next_off : next_off + size], first))
            requests += 1
            sent_bytes += size
            next_off += size
            in_flight.append(next_off)
        expected = in_flight.popleft()
        last = await client.next_response(command, timeout_s, drain_on_error=True)
        off = _offset(last, command)
        if on_progress:
            on_progress(off)
        if off != expected:
            # A chunk went missing or the device restarted its session: let the outstanding
            # answers arrive (the device writes nothing out of order), then follow its offset.
            while client.outstanding:
                last = await client.next_response(command, timeout_s, drain_on_error=True)
                off = _offset(last, command)
            in_flight.clear()
            next_off = off
    if getattr(last, "match", None) is False:
        raise UploadMismatch(sha256_hex, client.link.name)
    return UploadResult(
        length=total,
        resumed_from=resumed_from,
        requests=requests,
        data_bytes_sent=sent_bytes,
        elapsed_s=time.perf_counter() - started,
        window=window,
    )


def _offset(response: message.Response, command: str) -> int:
    off = getattr(response, "off", None)
    if not isinstance(off, int):
        raise ProtocolError(f"{command}: the device's answer carries no offset")
    return off
