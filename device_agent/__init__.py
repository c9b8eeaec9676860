"""EdgeFleet device_agent (see ../shared/ARCHITECTURE.md); grows with its issue."""
