"""The device target catalogue: what each hardware id can hold and run.

The default catalogue ships inside the package (``catalogue.toml``); an operator may load their
own file with :meth:`TargetCatalogue.from_bytes`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from pydantic import Field, ValidationError

from firmware_bundles.errors import CatalogueError
from firmware_bundles.manifest import FirmwareRange, Manifest
from firmware_bundles.schema import Document, schema_error

ANY_OP = "*"
_PRECISION_OF_SCHEME = {
    "float32": "float32",
    "fp16": "float16",
    "int8-dynamic": "int8",
    "int8-static": "int8",
    "int16x8": "int16",
}


class DeviceTarget(Document):
    """One catalogue entry; its ``hardware_id`` is ``id`` in the catalogue file.

    ``reference`` says where a bundle for this target keeps its reference histograms (manifest
    format 3): in the bundle (``bundle``: the device counts inputs on their bins), or published
    beside it (``detached``: the device never receives them and counts outputs only).
    """

    hardware_id: str = Field(alias="id", pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    generation: str
    platform: str
    description: str = ""
    max_bundle_bytes: int = Field(gt=0)
    ram_arena_bytes: int = Field(gt=0)
    allowed_ops: list[str]
    precisions: list[Literal["float32", "float16", "int8", "int16"]]
    format: Literal["onnx", "ort", "tflite"]
    links: list[Literal["ble", "serial", "https"]]
    firmware: FirmwareRange
    reference: Literal["bundle", "detached"] = "bundle"
    #: Flash set aside for models (the A/B slots of ``max_bundle_bytes`` each, and a shadow
    #: slot if it fits); None where models live in a file system (phones, Linux boards).
    model_flash_bytes: int | None = Field(default=None, gt=0)

    def shadow_slot_shortfall(self, candidate_bytes: int) -> tuple[int, int] | None:
        """Bytes a shadow slot for a ``candidate_bytes`` bundle needs beside the two A/B
        slots, and bytes available, when the flash budget does not hold it; None when it does
        (or the target keeps models in a file system)."""
        if self.model_flash_bytes is None:
            return None
        available = self.model_flash_bytes - 2 * self.max_bundle_bytes
        return None if candidate_bytes <= available else (candidate_bytes, max(available, 0))

    def allows_op(self, op: str) -> bool:
        """Whether the device's runtime implements ``op``."""
        return ANY_OP in self.allowed_ops or op in self.allowed_ops

    def misfits(self, manifest: Manifest, bundle_bytes: int) -> list[str]:
        """Every reason a bundle of ``bundle_bytes`` cannot run here; empty if it fits."""
        reasons = []
        if bundle_bytes > self.max_bundle_bytes:
            reasons.append(
                f"bundle is {bundle_bytes} bytes, over the {self.max_bundle_bytes} byte budget"
                f" by {bundle_bytes - self.max_bundle_bytes}"
            )
        ram = manifest.runtime.ram_estimate.bytes
        if ram > self.ram_arena_bytes:
            reasons.append(f"needs about {ram} bytes of RAM, arena is {self.ram_arena_bytes}")
        bad_ops = [op for op in manifest.runtime.op_types if not self.allows_op(op)]
        if bad_ops:
            reasons.append("ops not allowed: " + ", ".join(bad_ops))
        if manifest.runtime.precision not in self.precisions:
            reasons.append(f"precision {manifest.runtime.precision} not supported")
        if manifest.runtime.format != self.format:
            reasons.append(f"format {manifest.runtime.format}, target wants {self.format}")
        return reasons


@dataclass(frozen=True)
class TargetCatalogue:
    """All known device targets, by id."""

    targets: dict[str, DeviceTarget]

    @classmethod
    def from_bytes(cls, data: bytes) -> TargetCatalogue:
        """Parse a catalogue TOML file.

        Raises:
            CatalogueError: If it is not TOML or an entry is malformed (naming the field).
        """
        try:
            doc = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise CatalogueError(f"catalogue is not valid TOML: {exc}") from exc
        op_sets: dict[str, list[str]] = {
            k[: -len("_ops")]: list(v.get("ops", []))
            for k, v in doc.items()
            if k.endswith("_ops") and isinstance(v, dict)
        }
        targets: dict[str, DeviceTarget] = {}
        for i, raw in enumerate(doc.get("target", [])):
            targets_entry = _entry(raw, op_sets, i)
            if targets_entry.hardware_id in targets:
                raise CatalogueError(f"catalogue lists target {targets_entry.hardware_id!r} twice")
            targets[targets_entry.hardware_id] = targets_entry
        if not targets:
            raise CatalogueError("catalogue has no [[target]] entries")
        return cls(targets)

    @classmethod
    def load_default(cls) -> TargetCatalogue:
        """The catalogue shipped with the package."""
        data = resources.files("firmware_bundles").joinpath("catalogue.toml").read_bytes()
        return cls.from_bytes(data)

    def get(self, hardware_id: str) -> DeviceTarget:
        """The target with id ``hardware_id``.

        Raises:
            CatalogueError: If there is none, listing the known ids.
        """
        try:
            return self.targets[hardware_id]
        except KeyError:
            known = ", ".join(sorted(self.targets))
            raise CatalogueError(f"unknown target {hardware_id!r}; known: {known}") from None

    def check_fits(self, manifest: Manifest, hardware_id: str, bundle_bytes: int) -> None:
        """Check the bundle is built for ``hardware_id`` and fits it.

        Raises:
            CatalogueError: With every reason it does not.
        """
        target = self.get(hardware_id)
        if manifest.target(hardware_id) is None:
            built = ", ".join(t.hardware_id for t in manifest.targets)
            raise CatalogueError(f"bundle is built for {built}, not for {hardware_id}")
        reasons = target.misfits(manifest, bundle_bytes)
        if reasons:
            raise CatalogueError(f"bundle does not fit {hardware_id}: " + "; ".join(reasons))


def _entry(raw: Any, op_sets: dict[str, list[str]], index: int) -> DeviceTarget:
    if not isinstance(raw, dict):
        raise CatalogueError(f"target[{index}] is not a table")
    entry = dict(raw)
    ops = entry.get("allowed_ops")
    if isinstance(ops, str):
        if ops == ANY_OP:
            entry["allowed_ops"] = [ANY_OP]
        elif ops in op_sets:
            entry["allowed_ops"] = op_sets[ops]
        else:
            raise CatalogueError(f"target[{index}] names unknown op set {ops!r}")
    entry["firmware"] = {"minimum": entry.pop("firmware_minimum", None)}
    if "firmware_below" in entry:
        entry["firmware"]["below"] = entry.pop("firmware_below")
    try:
        return DeviceTarget.model_validate(entry)
    except ValidationError as exc:
        err = schema_error(f"catalogue target[{index}]", exc)
        raise CatalogueError(str(err)) from exc


def precision_of_scheme(scheme: str) -> str:
    """The arithmetic precision a quantisation scheme runs in."""
    return _PRECISION_OF_SCHEME[scheme]
