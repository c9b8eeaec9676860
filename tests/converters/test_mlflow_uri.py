"""MLflow model URIs, credentials kept out of what we record, and signatures we cannot convert."""

from __future__ import annotations

import mlflow.types as types
import numpy as np
import pytest
from mlflow.models import ModelSignature

from converters.errors import ModelLoadError
from converters.mlflow_source import MlflowRef, input_schema, parse_uri, redact

URIS = [
    ("models:/wrist/3", MlflowRef("models:/wrist/3", name="wrist", version="3")),
    ("models:/wrist@champion", MlflowRef("models:/wrist@champion", name="wrist", alias="champion")),
    ("runs:/0a1b2c/model", MlflowRef("runs:/0a1b2c/model", run_id="0a1b2c")),
    ("runs:/0a1b2c/nested/model", MlflowRef("runs:/0a1b2c/nested/model", run_id="0a1b2c")),
]


@pytest.mark.parametrize(("text", "ref"), URIS, ids=[u[0] for u in URIS])
def test_model_uris_parse(text: str, ref: MlflowRef) -> None:
    assert parse_uri(text) == ref


@pytest.mark.parametrize(
    "text", ["models:/wrist", "models:/wrist/Production", "models:/wrist/latest", "runs:/abc"]
)
def test_other_forms_are_refused_with_the_forms_we_read(text: str) -> None:
    with pytest.raises(ModelLoadError, match="use models:/NAME/VERSION, models:/NAME@ALIAS"):
        parse_uri(text)


REDACT = [
    (
        "https://alice:s3cret@mlflow.example:8443/base?token=x#top",
        "https://mlflow.example:8443/base",
    ),
    ("http://token@127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:///srv/mlflow.db", "sqlite:///srv/mlflow.db"),
    ("databricks://profile", "databricks://profile"),
]


@pytest.mark.parametrize(("uri", "shown"), REDACT, ids=[r[1] for r in REDACT])
def test_redact_drops_user_password_and_query(uri: str, shown: str) -> None:
    assert redact(uri) == shown


def test_a_string_column_is_refused_naming_it() -> None:
    signature = ModelSignature(
        types.Schema([types.ColSpec("double", "speed"), types.ColSpec("string", "city")])
    )
    with pytest.raises(ModelLoadError, match="column 'city' of type string"):
        input_schema(signature, "the signature of models:/m/1")


def test_two_input_tensors_are_refused() -> None:
    specs: list[types.ColSpec | types.TensorSpec] = [
        types.TensorSpec(np.dtype("float32"), (-1, 3), name) for name in ("a", "b")
    ]
    with pytest.raises(ModelLoadError, match="declares 2 input tensors"):
        input_schema(ModelSignature(types.Schema(specs)), "the signature of models:/m/1")


def test_a_tensor_signature_gives_the_row_shape() -> None:
    spec = types.TensorSpec(np.dtype("float32"), (-1, 3, 128))
    schema = input_schema(ModelSignature(types.Schema([spec])), "sig")
    assert schema is not None
    assert (schema.row_shape, schema.dtypes, schema.feature_names) == ((3, 128), ("float32",), None)
