"""A fleet server per test on SQLite and on PostgreSQL, each in a database of its own.

PostgreSQL is at ``EDGEFLEET_TEST_POSTGRES_URL`` (default the local server, user postgres). If it
does not answer, the PostgreSQL runs fail with the reason (never skipped).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from firmware_bundles import SigningKey, build, new_root, sign_root
from server.app import build_state, create_app, ensure_admin_token
from server.config import Settings
from server.db import upgrade
from tests.conftest import MODEL_BYTES, manifest_draft, target_entry, tflite_placeholder
from tests.procs import ServerProcess

PG_URL = os.environ.get(
    "EDGEFLEET_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
#: Catalogue targets whose bundles are TFLite (rings and nRF boards).
MICRO_TARGETS = {"ring-gen3", "ring-gen4", "devboard-nrf52840"}
CAPS = {
    "ring-gen3": {
        "hardware_id": "ring-gen3",
        "generation": "ring-gen3",
        "platform": "nrf52840",
        "firmware_version": "3.1.0",
        "free_flash_bytes": 300_000,
        "free_ram_bytes": 65_536,
    },
    "phone-android": {
        "hardware_id": "phone-android",
        "generation": "phone",
        "platform": "android",
        "firmware_version": "14.0.0",
        "onnxruntime_version": "1.20.0",
        "free_flash_bytes": 10**9,
        "free_ram_bytes": 10**9,
    },
}


def _pg_admin_url() -> str:
    return PG_URL.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture(scope="session")
def postgres_available() -> str | None:
    """None if PostgreSQL answers, else why not."""
    try:
        import psycopg

        with psycopg.connect(_pg_admin_url(), connect_timeout=3):
            return None
    except Exception as exc:  # any connection failure
        return f"no PostgreSQL at {PG_URL}: {exc}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_available: str | None
) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    if postgres_available:
        # A missing database is a failure with its reason, never a skip.
        pytest.fail(postgres_available)
    with fresh_pg_database() as url:
        yield url


@pytest.fixture()
def pg_database_url(postgres_available: str | None) -> Iterator[str]:
    """A fresh, empty PostgreSQL database (a failure, never a skip, without PostgreSQL)."""
    if postgres_available:
        pytest.fail(postgres_available)
    with fresh_pg_database() as url:
        yield url


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A new database on the machine's PostgreSQL, dropped afterwards; its SQLAlchemy URL."""
    import psycopg

    name = f"edgefleet_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_pg_admin_url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(_pg_admin_url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_bundle(
    keys: list[SigningKey],
    *,
    target: str = "phone-android",
    version: str = "1.0.0",
    counter: int = 1,
    name: str = "wrist-activity",
    changes: dict[str, Any] | None = None,
    mlflow: dict[str, Any] | None = None,
    **runtime: Any,
) -> bytes:
    """A signed test bundle of ``name`` ``version`` for ``target`` (TFLite for micro targets);
    ``changes`` replace top-level manifest fields (reference histograms, say); ``mlflow`` is the
    manifest's ``provenance.mlflow`` (see :func:`mlflow_source`)."""
    draft = manifest_draft(
        name=name,
        version=version,
        release_counter=counter,
        targets=[target_entry(target)],
        **(changes or {}),
    )
    if mlflow is not None:
        draft["provenance"] = {**draft["provenance"], "mlflow": mlflow}
    files = {"model.onnx": MODEL_BYTES}
    if target in MICRO_TARGETS:
        # Rings take TFLite Micro bundles (the catalogue says format tflite).
        files = tflite_placeholder(draft, (0.5, 0.5), tolerance=1e-4, tflm_version="test")
    draft["runtime"] = {**draft["runtime"], **runtime}
    return build(draft, files, keys)


def mlflow_source(
    run_id: str,
    name: str | None = None,
    version: str | None = None,
    tracking_uri: str = "http://127.0.0.1:5000",
) -> dict[str, Any]:
    """A manifest's ``provenance.mlflow`` for a sklearn model from ``models:/NAME/VERSION``
    (``runs:/RUN_ID/model`` when ``name`` is None), as `edgefleet convert` records it."""
    uri = f"models:/{name}/{version}" if name else f"runs:/{run_id}/model"
    source = {
        "tracking_uri": tracking_uri,
        "registry_uri": tracking_uri,
        "model_uri": uri,
        "model_name": name,
        "model_version": version,
        "run_id": run_id,
        "flavour": "sklearn",
    }
    return {k: v for k, v in source.items() if v is not None}


@dataclass
class Fleet:
    """A running app (in process, real database) and helpers that act as its users."""

    client: TestClient
    admin: str
    release_key: SigningKey
    director_key: SigningKey
    hil_key: SigningKey
    root: Any
    state: Any
    tokens: dict[str, str] = field(default_factory=dict)

    def auth(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def token(self, role: str) -> str:
        if role not in self.tokens:
            r = self.client.post(
                "/v1/tokens", json={"name": role, "role": role}, headers=self.auth(self.admin)
            )
            assert r.status_code == 201, r.text
            self.tokens[role] = r.json()["token"]
        return self.tokens[role]

    def bundle(
        self,
        target: str = "phone-android",
        version: str = "1.0.0",
        counter: int = 1,
        name: str = "wrist-activity",
        keys: list[SigningKey] | None = None,
        mlflow: dict[str, Any] | None = None,
        **runtime: Any,
    ) -> bytes:
        return make_bundle(
            [self.release_key] if keys is None else keys,
            target=target,
            version=version,
            counter=counter,
            name=name,
            mlflow=mlflow,
            **runtime,
        )

    def publish(self, data: bytes, expect: int = 201) -> dict[str, Any]:
        r = self.client.post(
            "/v1/bundles", content=data, headers=self.auth(self.token("publisher"))
        )
        assert r.status_code == expect, r.text
        return r.json()

    def release(self, model: str, version: str, target: str | None = None) -> None:
        r = self.client.post(
            f"/v1/models/{model}/versions/{version}/release",
            json={"target": target},
            headers=self.auth(self.token("operator")),
        )
        assert r.status_code == 200, r.text

    def enroll(self, device_id: str, target: str = "phone-android", **caps: Any) -> str:
        r = self.client.post(
            "/v1/enrollment-tokens", json={"max_uses": 1}, headers=self.auth(self.token("operator"))
        )
        body = {
            "enroll_token": r.json()["token"],
            "device_id": device_id,
            "capabilities": {**CAPS[target], **caps},
        }
        r = self.client.post("/v1/devices/enroll", json=body)
        assert r.status_code == 201, r.text
        return r.json()["credential"]

    def check_in(
        self, device_id: str, credential: str, nonce: str | None = None, firmware: str = "14.0.0"
    ) -> Any:
        body = {
            "device_id": device_id,
            "nonce": nonce or uuid.uuid4().hex,
            "firmware_version": firmware,
        }
        return self.client.post(
            f"/v1/devices/{device_id}/check-in", json=body, headers=self.auth(credential)
        )


@contextmanager
def running_fleet(database_url: str, tmp_path: Path, **settings: Any) -> Iterator[Fleet]:
    """A fresh root and keys, a migrated database and the app in a TestClient (``settings``
    override the server's defaults)."""
    keys = {r: SigningKey.generate() for r in ("root", "release", "director", "hil")}
    root = new_root(
        version=1,
        expires=datetime.now(UTC) + timedelta(days=30),
        role_keys={r: [k.public] for r, k in keys.items()},
        thresholds={},
    )
    data_dir = tmp_path / "data"
    (data_dir / "keys").mkdir(parents=True)
    (data_dir / "root.json").write_bytes(sign_root(root, [keys["root"]]).to_bytes())
    (data_dir / "keys" / "director.pem").write_bytes(keys["director"].to_pem())
    upgrade(database_url)
    state = build_state(Settings(data_dir=data_dir, database_url=database_url, **settings))
    admin = ensure_admin_token(state)
    assert admin is not None
    with TestClient(create_app(state)) as client:
        yield Fleet(
            client=client,
            admin=admin,
            release_key=keys["release"],
            director_key=keys["director"],
            hil_key=keys["hil"],
            root=root,
            state=state,
        )
    state.engine.dispose()


@pytest.fixture()
def fleet(database_url: str, tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet(database_url, tmp_path) as running:
        yield running


@pytest.fixture()
def unfolded_fleet(database_url: str, tmp_path: Path) -> Iterator[Fleet]:
    """A fleet whose fold job runs only at start: windows wait until a test folds them
    (:func:`server.fold.fold`)."""
    with running_fleet(database_url, tmp_path, telemetry_fold_s=3600.0) as running:
        yield running


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """`edgefleet serve --init` as a user runs it: uvicorn on loopback, SQLite under tmp_path."""
    proc = ServerProcess(data_dir=tmp_path / "data", log_dir=tmp_path)
    try:
        yield proc.start()
    finally:
        proc.stop()
