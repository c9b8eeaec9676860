"""Where a model came from beyond its files: the MLflow registry entry and training run.

Optional in every manifest format (``provenance.mlflow``); absent, a manifest reads and
serialises exactly as it did before the field existed.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from firmware_bundles.schema import Document

#: ``scheme://user[:password]@host``: credentials in a URI.
_CREDENTIALS = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/]*@")


class MlflowDataset(Document):
    """A dataset the training run logged as an input (``mlflow.log_input``)."""

    name: str = Field(min_length=1, max_length=500)
    #: MLflow's own short digest of the dataset (e.g. 8 hex digits for pandas and numpy data).
    digest: str = Field(min_length=1, max_length=64)
    #: The run's ``mlflow.data.context`` tag for it: ``training``, ``eval``, ...
    context: str | None = Field(default=None, max_length=500)
    source_type: str | None = Field(default=None, max_length=100)


class MlflowSource(Document):
    """The MLflow registry entry and run a bundle's model was converted from.

    URIs are recorded without credentials (a manifest naming a user or password is refused).
    ``model_name`` and ``model_version`` are set for ``models:/`` sources (``alias`` too when
    one was named, with the version it resolved to), absent for ``runs:/`` sources.
    """

    tracking_uri: str = Field(min_length=1, max_length=2000)
    registry_uri: str = Field(min_length=1, max_length=2000)
    model_uri: str = Field(min_length=1, max_length=2000)
    model_name: str | None = Field(default=None, max_length=500)
    model_version: str | None = Field(default=None, max_length=64)
    alias: str | None = Field(default=None, max_length=500)
    run_id: str | None = Field(default=None, max_length=64)
    experiment_id: str | None = Field(default=None, max_length=64)
    logged_model_id: str | None = Field(default=None, max_length=64)
    flavour: Literal["sklearn", "pytorch", "onnx"]
    params: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=dict)
    datasets: list[MlflowDataset] = Field(default_factory=list)

    @field_validator("tracking_uri", "registry_uri", "model_uri")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        if _CREDENTIALS.search(v) or "?" in v:
            raise ValueError("must not carry credentials (user, password or query string)")
        return v

    @model_validator(mode="after")
    def _registered(self) -> MlflowSource:
        if (self.model_name is None) != (self.model_version is None):
            raise ValueError("model_name and model_version come together")
        if self.alias is not None and self.model_name is None:
            raise ValueError("an alias needs model_name and model_version")
        return self
