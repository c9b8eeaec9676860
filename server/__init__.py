"""The fleet server: registry, devices, signed assignments, downloads and telemetry ingest."""
