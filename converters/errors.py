"""Errors raised by the converter, split by whose input is at fault.

ConverterError
├── ModelLoadError    the model file is not a model we can read
│   └── UnsupportedFlavourError  an MLflow model has no flavour we convert
├── RegistryError     an MLflow registry could not give us the model
│   ├── RegistryUnreachableError  the tracking server did not answer
│   └── RegistryLookupError       no such model, version, alias, run or artifact path
├── DataError         the data does not match the model (features, labels, format)
├── ParityError       the exported ONNX disagrees with the original model
├── QuantisationError a variant could not be produced
└── TargetFitError    no variant fits a target (carries the reason per variant)
"""

from __future__ import annotations


class ConverterError(Exception):
    """Root of every error raised by ``converters``."""


class ModelLoadError(ConverterError):
    """The model file cannot be read as a supported model."""


class UnsupportedFlavourError(ModelLoadError):
    """An MLflow model carries none of the flavours we convert (sklearn, pytorch, onnx)."""


class RegistryError(ConverterError):
    """An MLflow tracking server or registry could not give us the model or its run.

    Attributes:
        uri: The tracking URI tried, without credentials.
    """

    def __init__(self, message: str, uri: str) -> None:
        self.uri = uri
        super().__init__(message)


class RegistryUnreachableError(RegistryError):
    """The tracking server did not answer (refused, timed out, name not resolved)."""


class RegistryLookupError(RegistryError):
    """The server answered that the model, version, alias, run or artifact path does not exist."""


class DataError(ConverterError):
    """Training, eval or calibration data is malformed or does not match the model."""


class ParityError(ConverterError):
    """The float ONNX export disagrees with the original beyond tolerance.

    Attributes:
        index: Row of the eval data with the worst disagreement.
        difference: The worst absolute difference.
    """

    def __init__(self, message: str, index: int, difference: float) -> None:
        self.index = index
        self.difference = difference
        super().__init__(message)


class QuantisationError(ConverterError):
    """A quantised or reduced-precision variant could not be produced."""


class TargetFitError(ConverterError):
    """No variant fits a target; ``reasons`` maps each variant to why not."""

    def __init__(self, hardware_id: str, reasons: dict[str, list[str]]) -> None:
        self.hardware_id = hardware_id
        self.reasons = reasons
        detail = "; ".join(f"{name}: {', '.join(r)}" for name, r in reasons.items())
        super().__init__(f"nothing fits {hardware_id}: {detail}")
