"""Resumable bundle downloads: HTTP Range across restarts, stall timer, deadline, length cap.

The partial file ``<partial_dir>/<sha256>.part`` is the persisted state: its size is the offset
the next attempt (in this process or after a restart) asks for with ``Range: bytes=N-``. Nothing
here decides trust; the caller hands the bytes to :class:`device_agent.trust.TrustedState`.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from device_agent.config import AgentSettings
from device_agent.errors import (
    AuthError,
    DeadlineError,
    DownloadError,
    NotOfferedError,
    OversizeError,
    ServerRejected,
    ServerUnreachable,
    StallError,
)

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
#: Statuses that mean a gateway could not reach the server: offline, retry later.
GATEWAY_STATUSES = frozenset({502, 503, 504})


class _Restart(DownloadError):
    """The server's answer does not continue the partial; start again from zero."""


def resolve_url(base_url: str, ref: str) -> str:
    """``ref`` (a path such as ``/v1/bundles/...``, or an absolute URL) against the server URL,
    keeping any path prefix the server is mounted under."""
    if urlsplit(ref).scheme:
        return ref
    return f"{base_url.rstrip('/')}/{ref.lstrip('/')}"


def partial_path(partial_dir: Path, sha256: str) -> Path:
    """Where the partial download of bundle ``sha256`` lives."""
    return partial_dir / f"{sha256}.part"


def partial_bundles(partial_dir: Path) -> dict[str, int]:
    """SHA-256 to bytes on disk of every partial download in ``partial_dir``."""
    if not partial_dir.is_dir():
        return {}
    return {p.name[: -len(".part")]: p.stat().st_size for p in partial_dir.glob("*.part")}


def discard_partial(partial_dir: Path, sha256: str) -> None:
    """Remove the partial download of ``sha256``, if any."""
    with contextlib.suppress(FileNotFoundError):
        partial_path(partial_dir, sha256).unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BundleFetcher:
    """Fetches one bundle into a partial file, resuming what an earlier attempt left.

    Args:
        client: The HTTP client (a test hands one with a ``MockTransport``).
        settings: Limits: ``stall_timeout_s``, ``download_deadline_s``,
            ``max_download_attempts``, ``backoff_initial_s``/``backoff_max_s``,
            ``http_timeout_s``.
        monotonic: Clock for the stall timer and deadline.
        sleep: How to wait between attempts.
        checkpoint: Called with ``"download"`` once half the bundle is on disk and fsynced
            (the crash-test hook of ``test_pause_at``).
    """

    def __init__(
        self,
        client: httpx.Client,
        settings: AgentSettings,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        checkpoint: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self._monotonic = monotonic
        self._sleep = sleep
        self._checkpoint = checkpoint

    def fetch(
        self,
        url: str,
        sha256: str,
        length: int,
        partial_dir: Path,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        """Download the bundle, resuming a partial, and return its ``length`` bytes.

        Transient failures (stall, connection lost, gateway errors, a short body) are retried up
        to ``max_download_attempts`` times with exponential backoff, each retry resuming where
        the last stopped. The bytes are not verified here.

        Raises:
            StallError: If no bytes arrived for ``stall_timeout_s`` on the last attempt.
            DeadlineError: If ``download_deadline_s`` passed.
            OversizeError: If the server sent or announced more than ``length`` bytes (the
                partial is discarded: its bytes came from a server that does not follow the
                assignment).
            NotOfferedError: On 404 or 410 (the partial is discarded).
            ServerUnreachable: If the server could not be reached on the last attempt.
            AuthError: On 401/403.
            ServerRejected: On another error status.
        """
        partial_dir.mkdir(parents=True, exist_ok=True)
        deadline = self._monotonic() + self.settings.download_deadline_s
        delay = self.settings.backoff_initial_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._attempt(url, sha256, length, partial_dir, headers or {}, deadline)
            except (OversizeError, NotOfferedError):
                discard_partial(partial_dir, sha256)
                raise
            except (StallError, ServerUnreachable, _Restart, ServerRejected) as exc:
                transient = not isinstance(exc, ServerRejected) or exc.status >= 500
                if isinstance(exc, _Restart):
                    discard_partial(partial_dir, sha256)
                left_s = deadline - self._monotonic()
                if not transient or attempt >= self.settings.max_download_attempts:
                    raise
                if left_s <= delay:
                    raise DeadlineError(
                        f"download of {url} would pass its {self.settings.download_deadline_s}"
                        " s deadline before the next attempt",
                        url,
                        self._on_disk(partial_dir, sha256),
                    ) from exc
                self._sleep(delay)
                delay = min(delay * 2, self.settings.backoff_max_s)

    def _on_disk(self, partial_dir: Path, sha256: str) -> int:
        try:
            return partial_path(partial_dir, sha256).stat().st_size
        except FileNotFoundError:
            return 0

    def _attempt(
        self,
        url: str,
        sha256: str,
        length: int,
        partial_dir: Path,
        headers: Mapping[str, str],
        deadline: float,
    ) -> bytes:
        path = partial_path(partial_dir, sha256)
        offset = self._on_disk(partial_dir, sha256)
        if offset > length:
            discard_partial(partial_dir, sha256)
            offset = 0
        if offset == length:
            return path.read_bytes()
        request_headers = dict(headers)
        if offset > 0:
            request_headers["Range"] = f"bytes={offset}-"
        timeout = httpx.Timeout(self.settings.http_timeout_s, read=self.settings.stall_timeout_s)
        try:
            with self.client.stream("GET", url, headers=request_headers, timeout=timeout) as resp:
                offset = self._check_response(resp, url, offset, length)
                self._receive(resp, path, url, offset, length, deadline)
        except httpx.ReadTimeout as exc:
            raise StallError(
                f"no bytes from {url} for {self.settings.stall_timeout_s} s",
                url,
                self._on_disk(partial_dir, sha256),
            ) from exc
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"download of {url} failed: {exc!r}") from exc
        return path.read_bytes()

    def _check_response(self, resp: httpx.Response, url: str, offset: int, length: int) -> int:
        """Check the status and headers; return the offset the body starts at."""
        status = resp.status_code
        if status in (404, 410):
            raise NotOfferedError(f"server no longer offers {url} ({status})", url, offset)
        if status in (401, 403):
            resp.read()
            raise AuthError(status, resp.text[:200])
        if status in GATEWAY_STATUSES:
            raise ServerUnreachable(f"gateway answered {status} for {url}")
        if status == 416:
            raise _Restart(f"server refused the range from {offset}; restarting", url, offset)
        if status >= 400:
            resp.read()
            raise ServerRejected(status, resp.text[:200])
        start = 0
        if status == 206:
            match = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
            if match is None:
                raise _Restart(f"206 from {url} without a usable Content-Range", url, offset)
            start = int(match.group(1))
            total = match.group(3)
            if total != "*" and int(total) > length:
                raise OversizeError(
                    f"server says the bundle is {total} bytes, the assignment {length}",
                    url,
                    offset,
                )
            if start != offset:
                raise _Restart(f"server resumed at {start}, the partial ends at {offset}", url)
        announced = resp.headers.get("content-length")
        if announced is not None and announced.isdigit() and start + int(announced) > length:
            raise OversizeError(
                f"server announces {start + int(announced)} bytes, the assignment {length}",
                url,
                offset,
            )
        return start

    def _receive(
        self,
        resp: httpx.Response,
        path: Path,
        url: str,
        offset: int,
        length: int,
        deadline: float,
    ) -> None:
        half = length // 2
        stall_s = self.settings.stall_timeout_s
        mode = "r+b" if path.exists() else "wb"
        with open(path, mode) as out:
            out.truncate(offset)
            out.seek(offset)
            last_progress = self._monotonic()
            # Unbuffered: every chunk is written as it arrives, so a stall keeps what came.
            for chunk in resp.iter_bytes():
                now = self._monotonic()
                if now - last_progress > stall_s:
                    raise StallError(f"no bytes from {url} for {stall_s} s", url, offset)
                if now > deadline:
                    raise DeadlineError(
                        f"download of {url} passed its {self.settings.download_deadline_s} s"
                        " deadline",
                        url,
                        offset,
                    )
                if offset + len(chunk) > length:
                    raise OversizeError(
                        f"server sent more than the assigned {length} bytes", url, offset
                    )
                out.write(chunk)
                crossed_half = offset < half <= offset + len(chunk)
                offset += len(chunk)
                last_progress = now
                if crossed_half and self._checkpoint is not None:
                    out.flush()
                    os.fsync(out.fileno())
                    _fsync_dir(path.parent)
                    self._checkpoint("download")
            out.flush()
            os.fsync(out.fileno())
        if offset < length:
            raise ServerUnreachable(f"{url} ended after {offset} of {length} bytes")
