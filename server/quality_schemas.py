"""What the metrics and drift APIs answer about data quality (server.quality)."""

from __future__ import annotations

from pydantic import BaseModel


class FeatureQualityCounts(BaseModel):
    """One input feature's data-quality counts; each share is of the feature's values (in
    bins plus missing)."""

    values: int
    #: NaN or None: in no bin.
    missing: int
    missing_rate: float | None
    #: Outside the training range (numeric: the under- and overflow bins).
    out_of_range: int
    out_of_range_rate: float | None
    #: A category training never saw (categorical: the last bin).
    unseen: int
    unseen_rate: float | None


class FeatureQuality(FeatureQualityCounts):
    name: str
    #: ``numeric`` or ``categorical`` (None: the manifest has no histogram of this name).
    kind: str | None


class DataQualityFigures(BaseModel):
    features: list[FeatureQuality]
    #: Calls the schema check refused (wrong shape, dtype, feature count), per input.
    refused: dict[str, int]
    refused_total: int
    #: Per call.
    refused_rate: float | None
