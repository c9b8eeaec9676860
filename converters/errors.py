"""Errors raised by the converter, split by whose input is at fault.

ConverterError
├── ModelLoadError    the model file is not a model we can read
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
