"""The OpenAPI document describes every answer: each 2xx JSON response has a schema in which every
object declares its properties or maps keys to a typed value, and downloads and /metrics declare
their own media types."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.server.conftest import running_fleet


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("openapi")
    with running_fleet(f"sqlite:///{tmp / 'fleet.db'}", tmp) as fleet:
        r = fleet.client.get("/openapi.json")
        assert r.status_code == 200
        result: dict[str, Any] = r.json()
        return result


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = doc
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _untyped_objects(doc: dict[str, Any], schema: Any, where: str, seen: set[str]) -> Iterator[str]:
    """Where ``schema`` has an object with neither properties nor typed additionalProperties, or
    a value of no type at all (``{}``)."""
    if not isinstance(schema, dict):
        return
    if "$ref" in schema:
        if schema["$ref"] in seen:
            return
        seen = seen | {schema["$ref"]}
        yield from _untyped_objects(doc, _resolve(doc, schema), schema["$ref"], seen)
        return
    if not schema or set(schema) <= {"title", "description", "default"}:
        yield f"{where}: a value of any type"
        return
    for key in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(schema.get(key, [])):
            yield from _untyped_objects(doc, sub, f"{where}.{key}[{i}]", seen)
    if schema.get("type") == "array":
        yield from _untyped_objects(doc, schema.get("items"), f"{where}[]", seen)
    if schema.get("type") == "object":
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        if not properties and not isinstance(extra, dict):
            yield f"{where}: an object with no properties and untyped values"
        for name, sub in (properties or {}).items():
            yield from _untyped_objects(doc, sub, f"{where}.{name}", seen)
        if isinstance(extra, dict):
            yield from _untyped_objects(doc, extra, f"{where}.*", seen)


def _operations(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            yield f"{method.upper()} {path}", operation


def test_every_2xx_json_answer_has_a_fully_typed_schema(document: dict[str, Any]) -> None:
    problems, checked = [], 0
    for name, operation in _operations(document):
        for status, response in operation["responses"].items():
            if not status.startswith("2"):
                continue
            for media, content in response.get("content", {}).items():
                if "json" not in media:
                    continue
                checked += 1
                if "schema" not in content:
                    problems.append(f"{name} {status}: no schema")
                    continue
                problems += [
                    f"{name} {status}: {p}"
                    for p in _untyped_objects(document, content["schema"], "body", set())
                ]
    assert checked >= 25, checked
    assert not problems, "\n".join(problems)


def test_downloads_and_metrics_declare_their_media_types(document: dict[str, Any]) -> None:
    download = document["paths"]["/v1/bundles/{sha256}"]["get"]["responses"]
    assert set(download["200"]["content"]) == {"application/x-tar"}
    assert set(download["206"]["content"]) == {"application/x-tar"}
    metrics = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert metrics and all(m.startswith("text/plain") for m in metrics), list(metrics)


def test_the_walker_finds_an_untyped_object() -> None:
    doc: dict[str, Any] = {
        "components": {"schemas": {"A": {"type": "object", "properties": {"x": {}}}}}
    }
    found = list(_untyped_objects(doc, {"$ref": "#/components/schemas/A"}, "body", set()))
    assert found == ["#/components/schemas/A.x: a value of any type"]
    loose = {"type": "object", "additionalProperties": True}
    assert list(_untyped_objects({}, loose, "body", set())) == [
        "body: an object with no properties and untyped values"
    ]
