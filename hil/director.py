"""The rig's director: signs assignment sets for the devices on its bench.

A lab provisions its boards and rings with a root whose director key the rig holds, so it can
assign each device the bundle under test exactly as the fleet server would: one
:class:`~firmware_bundles.messages.AssignmentSet` per device, carrying the device's nonce.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from device_agent.link.model_group import IdentityResponse
from firmware_bundles import SigningKey, open_bundle
from firmware_bundles.messages import AssignmentSet


class LabDirector:
    """Signs assignment sets with a director key.

    Args:
        key: A key of the root's ``director`` role.
        valid_for_s: How long an assignment set stays valid.
        clock: The rig's clock.
    """

    def __init__(
        self,
        key: SigningKey,
        *,
        valid_for_s: float = 3600.0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.key = key
        self.valid_for_s = valid_for_s
        self.clock = clock or (lambda: datetime.now(UTC))

    def assign(
        self,
        identity: IdentityResponse,
        archives: list[bytes],
        *,
        confirmed: Mapping[str, int] | None = None,
        **overrides: Any,
    ) -> bytes:
        """The signed envelope assigning the bundles ``archives`` to the device of ``identity``.

        ``confirmed`` names, per model, the confirmed release counter its entry carries
        (``docs/rollback.md``); ``overrides`` replace fields of the set (``hardware_id``,
        ``nonce``, ...) so tests can make a set a device must refuse.
        """
        confirmed = confirmed or {}
        now = self.clock()
        entries = []
        for bundle in archives:
            manifest = open_bundle(bundle).manifest
            entries.append(
                {
                    "model": manifest.name,
                    "version": manifest.version,
                    "bundle_sha256": hashlib.sha256(bundle).hexdigest(),
                    "bundle_length": len(bundle),
                    "release_counter": manifest.release_counter,
                    "download_url": f"hil://{identity.device_id}/{manifest.name}",
                    "confirmed_release_counter": confirmed.get(manifest.name),
                }
            )
        fields: dict[str, Any] = {
            "_type": "assignments",
            "device_id": identity.device_id,
            "hardware_id": identity.hardware_id,
            "nonce": identity.nonce,
            "issued_at": now,
            "expires_at": now + timedelta(seconds=self.valid_for_s),
            "bundles": entries,
        }
        fields.update(overrides)
        return AssignmentSet.model_validate(fields).sign(self.key).to_bytes()
