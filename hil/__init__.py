"""EdgeFleet hil (see ../shared/ARCHITECTURE.md); grows with its issue."""
