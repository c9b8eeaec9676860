"""Resumable bundle downloads: HTTP Range across restarts, stall timer, deadline, length cap.

The partial file ``<partial_dir>/<bundle_sha256>.part`` is the persisted state: its size is the
offset the next attempt (in this process or after a restart) asks for with ``Range: bytes=N-``.
Nothing here decides trust; the caller hands the bytes to :class:`device_agent.trust.TrustedState`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

from device_agent.client import BundleStream, FleetClient
from device_agent.config import AgentSettings
from device_agent.errors import (
    DeadlineError,
    DownloadError,
    NotOfferedError,
    OversizeError,
    ResumeRefused,
    ServerError,
    ServerUnreachable,
    StallError,
)
from device_agent.fsutil import fsync_dir


def partial_path(partial_dir: Path, bundle_sha256: str) -> Path:
    """Where the partial download of bundle ``bundle_sha256`` lives."""
    return partial_dir / f"{bundle_sha256}.part"


def partial_bundles(partial_dir: Path) -> dict[str, int]:
    """SHA-256 to bytes on disk of every partial download in ``partial_dir``."""
    if not partial_dir.is_dir():
        return {}
    return {p.name[: -len(".part")]: p.stat().st_size for p in partial_dir.glob("*.part")}


def discard_partial(partial_dir: Path, bundle_sha256: str) -> None:
    """Remove the partial download of ``bundle_sha256``, if any."""
    with contextlib.suppress(FileNotFoundError):
        partial_path(partial_dir, bundle_sha256).unlink()


@dataclass(eq=False)
class BundleFetcher:
    """Fetches one bundle into a partial file, resuming what an earlier attempt left.

    Attributes:
        client: The fleet client, which makes each request and maps its failures.
        settings: Limits: ``stall_timeout_s``, ``download_deadline_s``,
            ``max_download_attempts``, ``backoff_initial_s``/``backoff_max_s``.
        monotonic: Clock for the stall timer and deadline.
        sleep: How to wait between attempts.
        checkpoint: Called with ``"download"`` once half the bundle is on disk and fsynced
            (the crash-test hook of ``test_pause_at``).
    """

    client: FleetClient
    settings: AgentSettings
    _: KW_ONLY
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    checkpoint: Callable[[str], None] | None = None

    def fetch(
        self,
        url: str,
        bundle_sha256: str,
        length: int,
        partial_dir: Path,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        """Download the bundle, resuming a partial, and return its ``length`` bytes.

        Retryable failures (stall, connection lost, gateway and server errors, a refused resume,
        a short body) are retried up to ``max_download_attempts`` times with exponential
        backoff, each retry resuming where the last stopped. The bytes are not verified here.

        Raises:
            StallError: If no bytes arrived for ``stall_timeout_s`` on the last attempt.
            DeadlineError: If ``download_deadline_s`` passed.
            OversizeError: If the server sent or announced more than ``length`` bytes (the
                partial is discarded: its bytes came from a server that does not follow the
                assignment).
            NotOfferedError: On 404 or 410 (the partial is discarded).
            ResumeRefused: If the last attempt's resume was refused (the partial is discarded).
            ServerUnreachable: If the server could not be reached on the last attempt.
            AuthError: On 401/403.
            ServerRejected: On another error status.
        """
        partial_dir.mkdir(parents=True, exist_ok=True)
        deadline = self.monotonic() + self.settings.download_deadline_s
        delay = self.settings.backoff_initial_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._attempt(
                    url, bundle_sha256, length, partial_dir, headers or {}, deadline
                )
            except (OversizeError, NotOfferedError):
                discard_partial(partial_dir, bundle_sha256)
                raise
            except (DownloadError, ServerError) as exc:
                if isinstance(exc, ResumeRefused):
                    discard_partial(partial_dir, bundle_sha256)
                if isinstance(exc, StallError):
                    exc.received_bytes = self._on_disk(partial_dir, bundle_sha256)
                left_s = deadline - self.monotonic()
                if not exc.retryable or attempt >= self.settings.max_download_attempts:
                    raise
                if left_s <= delay:
                    raise DeadlineError(
                        f"download of {url} would pass its {self.settings.download_deadline_s}"
                        " s deadline before the next attempt",
                        url,
                        self._on_disk(partial_dir, bundle_sha256),
                    ) from exc
                self.sleep(delay)
                delay = min(delay * 2, self.settings.backoff_max_s)

    def _on_disk(self, partial_dir: Path, bundle_sha256: str) -> int:
        try:
            return partial_path(partial_dir, bundle_sha256).stat().st_size
        except FileNotFoundError:
            return 0

    def _attempt(
        self,
        url: str,
        bundle_sha256: str,
        length: int,
        partial_dir: Path,
        headers: Mapping[str, str],
        deadline: float,
    ) -> bytes:
        path = partial_path(partial_dir, bundle_sha256)
        offset = self._on_disk(partial_dir, bundle_sha256)
        if offset > length:
            discard_partial(partial_dir, bundle_sha256)
            offset = 0
        if offset == length:
            return path.read_bytes()
        with self.client.download(
            url, offset=offset, headers=headers, stall_timeout_s=self.settings.stall_timeout_s
        ) as stream:
            self._check_lengths(stream, offset, length)
            self._receive(stream, path, length, deadline)
        return path.read_bytes()

    @staticmethod
    def _check_lengths(stream: BundleStream, offset: int, length: int) -> None:
        """Refuse what the server states beyond the assignment's length, or a resume elsewhere."""
        url = stream.url
        if stream.total is not None and stream.total > length:
            raise OversizeError(
                f"server says the bundle is {stream.total} bytes, the assignment {length}",
                url,
                offset,
            )
        # A 200 (the server ignored the Range) starts the bundle afresh from byte 0.
        if stream.partial and stream.start != offset:
            raise ResumeRefused(
                f"server resumed at {stream.start}, the partial ends at {offset}", url
            )
        if stream.announced is not None and stream.start + stream.announced > length:
            raise OversizeError(
                f"server announces {stream.start + stream.announced} bytes, the assignment"
                f" {length}",
                url,
                offset,
            )

    def _receive(self, stream: BundleStream, path: Path, length: int, deadline: float) -> None:
        url, offset = stream.url, stream.start
        half = length // 2
        stall_s = self.settings.stall_timeout_s
        mode = "r+b" if path.exists() else "wb"
        with open(path, mode) as out:
            out.truncate(offset)
            out.seek(offset)
            last_progress = self.monotonic()
            # Unbuffered: every chunk is written as it arrives, so a stall keeps what came.
            for chunk in stream.chunks():
                now = self.monotonic()
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
                if crossed_half and self.checkpoint is not None:
                    out.flush()
                    os.fsync(out.fileno())
                    fsync_dir(path.parent)
                    self.checkpoint("download")
            out.flush()
            os.fsync(out.fileno())
        if offset < length:
            raise ServerUnreachable(f"{url} ended after {offset} of {length} bytes")
