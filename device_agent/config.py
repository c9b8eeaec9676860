"""The agent's typed settings (env prefix ``EDGEFLEET_AGENT_``) and the device's conditions.

Every limit lives here with its unit in the name; defaults that depend on the device's hardware
come from the target catalogue entry of ``hardware_id``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from device_agent.errors import ConfigError
from device_agent.fsutil import write_atomic
from firmware_bundles import BundleError, TargetCatalogue
from firmware_bundles.catalogue import DeviceTarget

_MIB = 1024 * 1024

#: Install steps at which ``test_pause_at`` can freeze the agent (see :class:`AgentSettings`).
PauseStep = Literal["download", "written", "fsynced", "switched", "self-tested"]
PAUSE_STEPS: tuple[str, ...] = ("download", "written", "fsynced", "switched", "self-tested")


class AgentSettings(BaseSettings):
    """How one agent runs: where its server, root and state are, and every limit it keeps.

    ``firmware_version``, ``free_flash_bytes`` and ``free_ram_bytes`` default from the catalogue
    entry of ``hardware_id`` (the firmware minimum, twice the bundle budget, the RAM arena).
    """

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_AGENT_", extra="forbid")

    server_url: str
    state_dir: Path
    root_path: Path
    hardware_id: str
    enroll_token: str | None = None
    device_id: str | None = None
    firmware_version: str | None = None
    free_flash_bytes: int | None = Field(default=None, ge=0)
    free_ram_bytes: int | None = Field(default=None, ge=0)
    check_in_interval_s: float = Field(default=300.0, gt=0)
    check_in_jitter: float = Field(default=0.2, ge=0, lt=1)
    backoff_initial_s: float = Field(default=1.0, ge=0)
    backoff_max_s: float = Field(default=300.0, ge=0)
    http_timeout_s: float = Field(default=10.0, gt=0)
    stall_timeout_s: float = Field(default=30.0, gt=0)
    download_deadline_s: float = Field(default=600.0, gt=0)
    max_download_attempts: int = Field(default=5, ge=1)
    #: A crash during self-test this many times for one bundle marks it failed (boot-loop guard).
    max_interrupted_installs: int = Field(default=3, ge=1)
    unmetered_only: bool = False
    charging_only: bool = False
    telemetry_window_s: int = Field(default=3600, gt=0, le=86400)
    telemetry_flush_every: int = Field(default=256, ge=1)
    outbox_max_bytes: int = Field(default=16 * _MIB, ge=64 * 1024)
    upload_batch_windows: int = Field(default=50, ge=1)
    ort_threads: int = Field(default=1, ge=1)
    #: Sampled calls waiting for the shadow candidate at most; more are dropped and counted.
    shadow_queue_size: int = Field(default=64, ge=1)
    #: Seeds which calls a shadow candidate samples (None: from the OS); tests set it.
    shadow_seed: int | None = None
    #: Oldest prediction a late label may name (``predicted_at``), seconds before now.
    label_max_age_s: float = Field(default=30 * 86400.0, gt=0)
    #: How far in the agent's future a labelled prediction's time may lie (clock disagreement
    #: between the labelling app and the agent), seconds.
    label_clock_skew_s: float = Field(default=300.0, ge=0)
    #: Crash-test hook, for fault tests only: at the named install step the agent writes
    #: ``<state_dir>/paused-at-<step>`` and sleeps forever, so a test can SIGKILL it there.
    #: ``download``: half the bundle's bytes on disk, partial file fsynced; ``written``: bundle
    #: written to the inactive slot, not fsynced; ``fsynced``: slot fsynced, slot state not
    #: switched; ``switched``: slot state switched to self-test, self-test not run;
    #: ``self-tested``: self-test passed, activation not recorded.
    test_pause_at: PauseStep | None = None
    #: Clock hook, for end-to-end tests only: the agent's clock (check-ins, telemetry event
    #: time, label ages) runs this many seconds from the system's, so a test can make a
    #: prediction "7 days ago" in a real process. Never set on a device.
    test_clock_offset_s: float = 0.0

    @model_validator(mode="after")
    def _backoff(self) -> AgentSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be at least backoff_initial_s")
        return self

    def target(self, catalogue: TargetCatalogue | None = None) -> DeviceTarget:
        """The catalogue entry of ``hardware_id``.

        Raises:
            ConfigError: If the catalogue has no such target.
        """
        try:
            return (catalogue or TargetCatalogue.load_default()).get(self.hardware_id)
        except BundleError as exc:
            raise ConfigError(str(exc)) from exc

    def resolved_firmware_version(self, target: DeviceTarget) -> str:
        """``firmware_version``, or the target's firmware minimum."""
        return self.firmware_version or target.firmware.minimum

    def resolved_free_flash_bytes(self, target: DeviceTarget) -> int:
        """``free_flash_bytes``, or room for two slots of the target's bundle budget."""
        if self.free_flash_bytes is not None:
            return self.free_flash_bytes
        return 2 * target.max_bundle_bytes

    def resolved_free_ram_bytes(self, target: DeviceTarget) -> int:
        """``free_ram_bytes``, or the target's RAM arena."""
        if self.free_ram_bytes is not None:
            return self.free_ram_bytes
        return target.ram_arena_bytes


class DeviceConditions(Protocol):
    """What the phone or board knows about its network and power right now."""

    def unmetered(self) -> bool:
        """Whether the current network is unmetered (Wi-Fi, Ethernet)."""
        ...

    def charging(self) -> bool:
        """Whether the device is charging."""
        ...


class FileConditions:
    """Conditions read from ``<state_dir>/conditions.json`` (``{"unmetered": bool, "charging":
    bool}``), so the phone app and tests can set them; both True when the file is absent.

    A malformed file counts as "conditions not met": a download must not start on a metered
    network because a file was garbled.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def unmetered(self) -> bool:
        data = self._read()
        return True if data is None else data.get("unmetered") is True

    def charging(self) -> bool:
        data = self._read()
        return True if data is None else data.get("charging") is True


def write_conditions(state_dir: Path, *, unmetered: bool, charging: bool) -> None:
    """Write ``conditions.json`` atomically (what a phone app's listener would do)."""
    data = json.dumps({"unmetered": unmetered, "charging": charging}).encode()
    write_atomic(state_dir / "conditions.json", data)
