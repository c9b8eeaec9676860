"""A model's declared input (its MLflow signature), and fitting data files to it.

Column signatures name the features: table data is put in the signature's column order (columns
the signature does not name are left out, as MLflow's own schema enforcement does), ``.npz`` data
must have as many features and takes the names. Tensor signatures fix each row's shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from converters.errors import DataError

if TYPE_CHECKING:
    from converters.sources import Dataset

#: numpy kinds a feature may have: bool, signed and unsigned integers, floats.
NUMERIC_KINDS = "biuf"


@dataclass(frozen=True)
class InputSchema:
    """What a model says its input is.

    Attributes:
        origin: Where it was declared, for messages (``the signature of models:/wrist/1``).
        feature_names: Column names, in order (column signatures), else None.
        row_shape: Shape of one row (tensor signatures; None for a free dimension), else None.
        dtypes: numpy dtype names, one per column or one for the tensor.
    """

    origin: str
    feature_names: tuple[str, ...] | None = None
    row_shape: tuple[int | None, ...] | None = None
    dtypes: tuple[str, ...] = ()


def conform(data: Dataset, schema: InputSchema) -> Dataset:
    """``data`` with its features checked against ``schema`` (and ordered and named by it).

    Raises:
        DataError: If the data lacks a column the schema names, has another number of features
            or another row shape, naming the data file and the schema's origin.
    """
    if schema.feature_names is not None:
        return _conform_columns(data, schema, list(schema.feature_names))
    if schema.row_shape is not None:
        got = tuple(data.x.shape[1:])
        want = schema.row_shape
        if len(got) != len(want) or any(
            w is not None and w != g for w, g in zip(want, got, strict=True)
        ):
            shown = tuple(-1 if w is None else w for w in want)
            raise DataError(
                f"{data.path} rows have shape {got}; {schema.origin} expects rows of shape {shown}"
            )
    return data


def _conform_columns(data: Dataset, schema: InputSchema, names: list[str]) -> Dataset:
    if data.feature_names is None:
        width = int(np.prod(data.x.shape[1:]))
        if data.x.ndim != 2 or width != len(names):
            raise DataError(
                f"{data.path} rows have shape {tuple(data.x.shape[1:])}; {schema.origin} names"
                f" {len(names)} features: {names[:10]}"
            )
        return dataclasses.replace(data, feature_names=names)
    have = {name: i for i, name in enumerate(data.feature_names)}
    missing = [name for name in names if name not in have]
    if missing:
        raise DataError(
            f"{data.path} lacks columns {missing[:10]} that {schema.origin} names;"
            f" it has {data.feature_names[:20]}"
        )
    order = [have[name] for name in names]
    return dataclasses.replace(data, x=np.ascontiguousarray(data.x[:, order]), feature_names=names)
