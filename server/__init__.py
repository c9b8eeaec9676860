"""EdgeFleet server (see ../shared/ARCHITECTURE.md); grows with its issue."""
