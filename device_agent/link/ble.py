"""BLE links: bleak for real rings and boards, Bumble for an adopted connection (tests, rigs).

Both are smpclient transports behind :class:`~device_agent.link.transport.SMPTransportLink`, so
everything above the transport is shared with serial. Importing this module needs neither
bleak nor Bumble; each factory imports its stack and names the missing extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from device_agent.link.transport import SMPTransportLink

if TYPE_CHECKING:
    from bumble.device import Connection

#: ATT MTU asked for after connecting: one 244-byte write per 251-byte link-layer packet.
DEFAULT_PREFERRED_MTU = 247


class BumbleConnectionLink(SMPTransportLink):
    """A link over a Bumble connection someone else made (a rig, a test, a Bumble-based app).

    ``open`` adopts the connection (GATT discovery, notifications, MTU exchange); ``close``
    only unsubscribes: the connection belongs to its maker. A dropped connection cannot be
    reopened; make a new link on the new connection.
    """

    def __init__(
        self,
        connection: Connection,
        *,
        preferred_mtu: int = DEFAULT_PREFERRED_MTU,
        connect_timeout_s: float = 10.0,
    ) -> None:
        transport = _bumble_transport(preferred_mtu)
        super().__init__(
            transport,
            str(connection.peer_address),
            f"ble:{connection.peer_address}",
            connect_timeout_s,
        )
        self._connection = connection

    async def _connect(self) -> None:
        await self.transport.use_connection(self._connection)  # type: ignore[attr-defined]


def _bumble_transport(preferred_mtu: int) -> Any:
    try:
        from smpclient.transport.bumble import SMPBumbleTransport
    except ImportError as exc:
        raise ImportError(
            "BLE over Bumble needs the 'ble' extra: pip install 'edgefleet[ble]'"
        ) from exc
    return SMPBumbleTransport(preferred_mtu=preferred_mtu)


def bleak_link(address: str, *, connect_timeout_s: float = 10.0) -> SMPTransportLink:
    """A link to a real BLE device by address or advertised name, through bleak.

    On Linux bleak needs BlueZ over D-Bus; this is the path real-hardware tests take (opt-in).

    Raises:
        ImportError: If bleak is missing (the ``ble`` extra).
    """
    try:
        from smpclient.transport.ble import SMPBLETransport
    except ImportError as exc:
        raise ImportError(
            "BLE through bleak needs the 'ble' extra: pip install 'edgefleet[ble]'"
        ) from exc
    return SMPTransportLink(SMPBLETransport(), address, f"ble:{address}", connect_timeout_s)
