"""MLflow out: the tags a model version's registry entry gets, and writing them over MLflow's REST
API. Tags are read from the version's current state when the write goes out, so late, repeated or
reordered writes leave the right values (docs/webhooks.md, "MLflow tags")."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
from sqlmodel import Session, col, select

from server.models import Bundle, ModelVersion, Rollout
from server.offers import current_versions

SET_TAG_PATH = "/api/2.0/mlflow/model-versions/set-tag"
PREFIX = "edgefleet."


def lineage_url(public_url: str, model: str, version: str) -> str:
    """The dashboard's lineage page of a model version."""
    name, number = quote(model, safe=""), quote(version, safe="")
    return f"{public_url.rstrip('/')}/ui/models/{name}/versions/{number}/lineage"


def current_tags(
    session: Session, model: str, version: str, *, kind: str, public_url: str
) -> dict[str, str]:
    """The tags that say where ``model`` ``version`` is now: bundle per hardware id, where it is
    released, its newest rollout and the lineage link."""
    found = session.exec(
        select(ModelVersion).where(
            ModelVersion.model_name == model, ModelVersion.version == version
        )
    ).first()
    tags = {
        f"{PREFIX}version": f"{model} {version}",
        f"{PREFIX}lineage_url": lineage_url(public_url, model, version),
        f"{PREFIX}event": kind,
    }
    if found is None:
        return tags
    bundles = session.exec(
        select(Bundle).where(Bundle.version_id == found.id).order_by(col(Bundle.target_id))
    ).all()
    released = []
    for bundle in bundles:
        tags[f"{PREFIX}bundle_sha256.{bundle.target_id}"] = bundle.sha256
        current = current_versions(session, bundle.target_id).get(model)
        if current is not None and current.id == found.id:
            released.append(bundle.target_id)
    tags[f"{PREFIX}released_for"] = ", ".join(released) or "none"
    rollout = session.exec(
        select(Rollout).where(Rollout.version_id == found.id).order_by(col(Rollout.id).desc())
    ).first()
    if rollout is None:
        tags[f"{PREFIX}rollout"] = tags[f"{PREFIX}rollout.state"] = "none"
    else:
        stage = f"stage {rollout.stage + 1}/{len(rollout.stages)}"
        percent = rollout.stages[rollout.stage]["percent"]
        tags[f"{PREFIX}rollout"] = f"{rollout.id} {rollout.state} {stage} ({percent:g}%)"
        tags[f"{PREFIX}rollout.state"] = rollout.state
    return tags


def write_tags(
    client: httpx.Client,
    uri: str,
    name: str,
    version: str,
    tags: dict[str, str],
    *,
    token: str | None,
    timeout_s: float,
) -> httpx.Response:
    """Set each tag on registered model ``name`` version ``version``, stopping at the first
    answer that is not 2xx. ``edgefleet.event`` goes last: once it names an event, the other
    tags of that write are there.

    Returns:
        That answer, or the last one when every tag was set.

    Raises:
        httpx.TransportError: When MLflow cannot be reached (the caller retries).
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response: httpx.Response | None = None
    last = f"{PREFIX}event"
    for key, value in sorted(tags.items(), key=lambda kv: (kv[0] == last, kv[0])):
        body: dict[str, Any] = {"name": name, "version": version, "key": key, "value": value}
        response = client.post(
            uri.rstrip("/") + SET_TAG_PATH, json=body, headers=headers, timeout=timeout_s
        )
        if not response.is_success:
            return response
    assert response is not None  # there is always at least the version tag
    return response


def error_message(response: httpx.Response) -> str:
    """MLflow's own words for a refusal (``error_code: message``), else the body's start."""
    try:
        body = response.json()
        return f"{body.get('error_code', 'error')}: {body.get('message', '')}"[:500]
    except (ValueError, AttributeError):
        return response.text[:500]
