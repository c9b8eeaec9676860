"""Limits of the device link, typed and with units in their names (env prefix EDGEFLEET_LINK_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class LinkSettings(BaseSettings):
    """Timeouts and pipelining of a :class:`~device_agent.link.client.DeviceClient`."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_LINK_", extra="forbid")

    #: Answer time for ordinary requests (identity, slots, telemetry, echo).
    request_timeout_s: float = Field(default=5.0, gt=0)
    #: Answer time for each upload chunk (a ring may erase flash on the first one).
    upload_timeout_s: float = Field(default=15.0, gt=0)
    #: Answer time for activate and self-test (verification, model load, test vectors).
    activate_timeout_s: float = Field(default=30.0, gt=0)
    #: How long opening the link may take.
    connect_timeout_s: float = Field(default=10.0, gt=0)
    #: Upload requests in flight; None means the device's ``buf_count``.
    max_in_flight: int | None = Field(default=None, ge=1)
    #: UART speed for serial links (ignored by USB CDC ACM).
    serial_baudrate: int = Field(default=115200, gt=0)
    #: ATT MTU asked for on BLE links.
    ble_preferred_mtu: int = Field(default=247, ge=23, le=517)
