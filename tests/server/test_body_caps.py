"""Upload bodies are refused at their cap, through a real uvicorn server process: a huge
``Content-Length`` is refused before a byte of body is read, and an endless chunked body as soon as
it passes the cap, while the server's peak memory grows by under 64 MB."""

from __future__ import annotations

import itertools
import os
import select
import socket
import time
from pathlib import Path

import httpx
import pytest

from firmware_bundles import build
from tests.conftest import manifest_draft
from tests.procs import ServerProcess
from tests.server.conftest import CAPS

MiB = 1024 * 1024
#: Set low for publish in this test (default 256 MiB), so an endless body meets it quickly.
PUBLISH_CAP_BYTES = 16 * MiB
#: Peak RSS growth allowed while refusing a hostile body, whatever it claims.
MAX_GROWTH_BYTES = 64 * 1000 * 1000
#: The client gives up here: a server that reads on past its cap has failed.
GIVE_UP_BYTES = 512 * MiB
CHUNK = b"x" * (64 * 1024)


@pytest.fixture(autouse=True)
def _low_publish_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set before the ``server`` fixture starts the process (autouse fixtures come first)."""
    monkeypatch.setenv("EDGEFLEET_MAX_BUNDLE_UPLOAD_BYTES", str(PUBLISH_CAP_BYTES))


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _reset_peak(pid: int) -> int:
    """Reset the process's peak RSS to its current RSS (Linux: clear_refs 5); that RSS in bytes."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status_kib(pid, "VmHWM") * 1024


def _answer(sock: socket.socket) -> tuple[int, bytes]:
    """The status and bytes of the response (headers and its JSON body)."""
    answer = b""
    while not answer.endswith(b"}"):
        try:
            data = sock.recv(4096)
        except ConnectionResetError:
            break
        if not data:
            break
        answer += data
    return int(answer.split(b" ", 2)[1]), answer


def _send_until_answered(
    port: int, path: str, token: str, *, chunked: bool, body: bytes | None = None
) -> tuple[int, bytes, int]:
    """Send ``body`` (else an endless one) chunked, or under a 1 TB Content-Length, until the
    server answers; the status, the answer, and the body bytes sent before it came."""
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {10**12}"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/octet-stream\r\n{framing}\r\n\r\n"
    ).encode()
    pieces = (
        (body[i : i + len(CHUNK)] for i in range(0, len(body), len(CHUNK)))
        if body is not None
        else itertools.repeat(CHUNK)
    )
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        deadline = time.monotonic() + 120
        while sent < GIVE_UP_BYTES and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 5)
            if readable:
                return *_answer(sock), sent
            if writable:
                chunk = next(pieces, b"")
                try:
                    sock.sendall((b"%x\r\n" % len(chunk) + chunk + b"\r\n") if chunked else chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return *_answer(sock), sent
                sent += len(chunk)
    raise AssertionError(f"no answer after {sent} body bytes sent")


def _routes(server: ServerProcess) -> dict[str, tuple[str, str, int]]:
    """Each upload route: its path, a credential it accepts, and its cap in bytes."""
    device = server.enroll("phone-1", CAPS["phone-android"])
    admin = server.admin_token
    return {
        "check-in": ("/v1/devices/phone-1/check-in", device, 64 * 1024),
        "telemetry": ("/v1/devices/phone-1/telemetry", device, 4 * MiB),
        "publish": ("/v1/bundles", admin, PUBLISH_CAP_BYTES),
        "hil-report": ("/v1/bundles/" + "a" * 64 + "/hil-report", admin, 4 * MiB),
        "reference": ("/v1/bundles/" + "a" * 64 + "/reference", admin, 4 * MiB),
    }


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length-1TB", "chunked-endless"])
def test_bodies_over_their_cap_are_refused_with_413_and_bounded_memory(
    server: ServerProcess, chunked: bool
) -> None:
    assert server.proc is not None
    pid = server.proc.pid
    for name, (path, token, cap) in _routes(server).items():
        before = _reset_peak(pid)
        status, answer, sent = _send_until_answered(server.port, path, token, chunked=chunked)
        growth = _status_kib(pid, "VmHWM") * 1024 - before
        print(f"{name} chunked={chunked}: {status} after {sent} B sent, peak RSS +{growth} B")
        if chunked and name == "publish":
            # A bundle is verified as it streams in: bytes that are no bundle archive are
            # refused at once, long before the cap.
            assert status == 400, (name, answer)
            assert b"not a bundle archive" in answer, (name, answer)
            assert sent < 8 * MiB, (name, sent)
            assert growth < MAX_GROWTH_BYTES, (name, growth)
            continue
        assert status == 413, (name, answer)
        assert str(cap).encode() in answer, (name, answer)
        if not chunked:
            # Refused on the header: no more body than the socket buffers held was needed.
            assert sent < 8 * MiB, (name, sent)
        else:
            assert sent < cap + 8 * MiB, (name, sent)
        assert growth < MAX_GROWTH_BYTES, (name, growth)
    # The server goes on serving.
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_a_bundle_over_the_cap_is_refused_at_its_member_header_and_nothing_is_kept(
    server: ServerProcess,
) -> None:
    """A signed bundle whose model is over the publish cap, streamed: refused as soon as the
    member header arrives (just after the manifest), not after the whole body; no blob or spool
    file is left behind; the server's memory stays bounded."""
    assert server.proc is not None
    model = os.urandom(40 * MiB)
    bundle = build(
        manifest_draft({"model.onnx": model}), {"model.onnx": model}, [server.release_key]
    )
    before = _reset_peak(server.proc.pid)
    status, answer, sent = _send_until_answered(
        server.port, "/v1/bundles", server.admin_token, chunked=True, body=bundle
    )
    growth = _status_kib(server.proc.pid, "VmHWM") * 1024 - before
    print(f"40 MiB model, cap {PUBLISH_CAP_BYTES}: {status} after {sent} B sent, +{growth} B RSS")
    assert status == 400, answer
    assert str(PUBLISH_CAP_BYTES).encode() in answer, answer
    assert sent < 8 * MiB, sent
    assert growth < MAX_GROWTH_BYTES, growth
    blobs = server.data_dir / "blobs"
    assert not [p for p in blobs.rglob("*") if p.is_file()], "a refused upload left a file behind"
