"""Server settings (pydantic-settings): environment variables ``EDGEFLEET_*`` or arguments."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from firmware_bundles.messages import MAX_NEXT_CHECK_IN_S
from firmware_bundles.telemetry import DEFAULT_RELATIVE_ACCURACY, MIN_RELATIVE_ACCURACY


class Settings(BaseSettings):
    """Everything the server is configured with; limits carry their unit in the name."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", extra="ignore")

    data_dir: Path = Path("edgefleet-data")
    #: SQLAlchemy URL; default: SQLite file ``fleet.db`` in the data directory.
    database_url: str | None = None
    #: Trusted root the server verifies bundles against (default: data_dir/root.json).
    root_path: Path | None = None
    #: Director private key that signs assignments (default: data_dir/keys/director.pem).
    director_key_path: Path | None = None
    #: Target catalogue TOML (default: the one shipped with firmware_bundles).
    catalogue_path: Path | None = None
    assignment_ttl_s: int = 24 * 3600
    #: How long a worker reuses what is released per target before re-reading the database;
    #: the worker that made a change sees it at once, others within this time.
    release_cache_ttl_s: float = 2.0
    #: Signed into every assignment set; a device refuses a set asking for more than a day.
    next_check_in_s: int = Field(default=3600, ge=1, le=MAX_NEXT_CHECK_IN_S)
    max_bundle_upload_bytes: int = 256 * 1024 * 1024
    max_telemetry_batch_bytes: int = 4 * 1024 * 1024
    #: A check-in's body (its installed models, with their last errors): refused past this.
    max_check_in_bytes: int = Field(default=64 * 1024, ge=1024)
    max_windows_per_batch: int = 1000
    #: The latency-sketch relative accuracy rollups merge at; windows at another are refused.
    telemetry_relative_accuracy: float = Field(
        default=DEFAULT_RELATIVE_ACCURACY, ge=MIN_RELATIVE_ACCURACY, lt=1
    )
    #: A figure over fewer distinct devices is withheld from viewers ("too few devices");
    #: operators and the rollout gates see it with its device count.
    min_devices_shown: int = Field(default=5, ge=1)
    #: Stored windows older than this (event time) are dropped; rollups are kept.
    telemetry_retention_days: int = Field(default=30, ge=1)
    telemetry_retention_check_s: float = Field(default=3600.0, gt=0)
    #: How often the fold job adds appended windows into the day rollups (one process at a
    #: time, under a lease), and the most windows one fold transaction takes.
    telemetry_fold_s: float = Field(default=1.0, gt=0)
    telemetry_fold_max_windows: int = Field(default=5000, ge=1)
    #: How long the fold's lease outlives a holder that died mid-run (at least 10 fold
    #: intervals; renewed between rounds of at most telemetry_fold_max_windows windows each, and
    #: given up after each run).
    telemetry_fold_lease_s: float = Field(default=60.0, gt=0)
    #: Folds the job runs at once on PostgreSQL (each its own transaction; SQLite runs one).
    telemetry_fold_folders: int = Field(default=2, ge=1)
    #: Fold in a child process of the server (started when windows first wait), so the fold's
    #: CPU never holds the interpreter lock the API's event loop needs (server/fold_worker.py);
    #: off, the fold runs in a worker thread of the server.
    telemetry_fold_in_child: bool = True
    #: How often the rollout evaluator runs (one process at a time, under a lease).
    rollout_evaluation_s: float = Field(default=60.0, gt=0)
    enrollment_token_ttl_s: int = 7 * 24 * 3600
    #: Release a version for a target only if its bundle carries a passing rig report signed by
    #: the root's ``hil`` role (``edgefleet publish --hil-report``).
    require_hil_report: bool = False
    max_hil_report_bytes: int = 4 * 1024 * 1024
    #: Signs dashboard sessions (HMAC); default: generated once into data_dir/ui-session.key.
    ui_session_secret: SecretStr | None = None
    #: A dashboard login lasts this long.
    ui_session_ttl_s: int = Field(default=12 * 3600, ge=60)
    #: The Fleet page counts a device as silent when it has not checked in for this long.
    ui_silent_after_s: int = Field(default=24 * 3600, ge=60)
    #: Outbound events (webhooks, MLflow tags; docs/webhooks.md): how often due rows are looked
    #: for, the retry delays (doubling from the base, capped), one attempt's timeout, and the
    #: age past which an undelivered row is given up.
    outbound_poll_s: float = Field(default=2.0, gt=0)
    outbound_backoff_base_s: float = Field(default=5.0, gt=0)
    outbound_backoff_max_s: float = Field(default=3600.0, gt=0)
    outbound_timeout_s: float = Field(default=10.0, gt=0)
    outbound_max_age_s: float = Field(default=3 * 24 * 3600.0, gt=0)
    #: How often threshold conditions (drift, feedback, accuracy, data quality) are checked.
    threshold_check_s: float = Field(default=300.0, gt=0)
    #: Hosts webhook URLs may name (None: any).
    webhook_allowed_hosts: list[str] | None = None
    #: MLflow tracking server whose registry gets tags (``http(s)://``; None: no MLflow).
    mlflow_uri: str | None = None
    #: Bearer token for MLflow (or credentials in ``mlflow_uri``).
    mlflow_token: str | None = None
    #: Where users reach this server (links in MLflow tags); ``serve`` sets it from host and port.
    public_url: str = "http://127.0.0.1:8080"
    #: Cap on a detached reference file uploaded beside its bundle.
    max_reference_bytes: int = 4 * 1024 * 1024

    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite in the data directory."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'fleet.db').resolve()}"

    def resolved_root_path(self) -> Path:
        return self.root_path or self.data_dir / "root.json"

    def resolved_director_key_path(self) -> Path:
        return self.director_key_path or self.data_dir / "keys" / "director.pem"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"
