"""The server's JSON request log says how many body bytes each request was served, so resumed
downloads can be audited: a client that hangs up mid-body is logged with what it got, not with
the Content-Length the response announced."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx

from firmware_bundles import build
from tests.conftest import manifest_draft
from tests.procs import ServerProcess, wait_for

#: Larger than loopback's socket buffers (4 MiB send + the receiver's), so a client that stops
#: reading and hangs up cannot have been sent the whole body.
BIG_MODEL_BYTES = 12 * 1024 * 1024


def _publish_big_bundle(server: ServerProcess, tmp_path: Path) -> tuple[str, int]:
    key = server.release_key
    model = bytes(range(256)) * (BIG_MODEL_BYTES // 256)
    draft = manifest_draft(
        {"model.onnx": model},
        targets=[
            {
                "target_id": "devboard-rpi4",
                "generation": "devboard",
                "platform": "rpi4",
                "firmware": {"minimum": "1.0.0"},
            }
        ],
    )
    data = build(draft, {"model.onnx": model}, [key])
    path = tmp_path / "big.efb"
    path.write_bytes(data)
    published = server.cli("publish", str(path), "--json")
    assert published.returncode == 0, published.stderr
    return str(json.loads(published.stdout)[0]["sha256"]), len(data)


def test_log_counts_body_bytes_served_for_ranges_and_hang_ups(
    server: ServerProcess, tmp_path: Path
) -> None:
    bundle_sha256, length = _publish_big_bundle(server, tmp_path)
    path = f"/v1/bundles/{bundle_sha256}"
    auth = {"Authorization": f"Bearer {server.admin_token}"}

    part = httpx.get(f"{server.url}{path}", headers={**auth, "Range": "bytes=1000-"}, timeout=60)
    assert part.status_code == 206 and len(part.content) == length - 1000

    # A client that reads 64 KiB of the whole bundle, then hangs up.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth['Authorization']}\r\n"
        sock.sendall(request.encode() + b"\r\n")
        received = 0
        while received < 64 * 1024:
            chunk = sock.recv(16 * 1024)
            assert chunk
            received += len(chunk)

    def logged() -> list[dict[str, object]]:
        lines = [r for r in server.requests() if r["path"] == path]
        return lines if len(lines) == 2 else []

    ranged, hung_up = wait_for(logged, "both downloads in the request log")
    assert ranged["range"] == "bytes=1000-" and ranged["status"] == 206
    assert ranged["bytes_sent"] == length - 1000 == int(str(ranged["bytes"]))
    assert hung_up["status"] == 200 and int(str(hung_up["bytes"])) == length
    assert 0 < int(str(hung_up["bytes_sent"])) < length
