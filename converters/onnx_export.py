"""Export a trained model to one float ONNX graph, preprocessing inside, with a uniform contract.

Every classifier graph has one output, ``probabilities`` ``[N, classes]`` (labels travel in the
manifest: label = class_labels[argmax]); every regressor one output, ``prediction``. Levers for
small devices: ``Scaler`` (ai.onnx.ml) is lowered to standard Sub+Mul, and label branches
(ArgMax, ArrayFeatureExtractor) are pruned, so MLP pipelines run on micro runtimes and quantise.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from converters.errors import DataError, ModelLoadError, ParityError
from converters.sources import Dataset, SourceModel

Task = Literal["classification", "regression"]
PROBABILITIES = "probabilities"
PREDICTION = "prediction"
INPUT = "input"
SKLEARN_OPSET = {"": 17, "ai.onnx.ml": 3}
TORCHSCRIPT_OPSET = 17


@dataclass
class Exported:
    """The float ONNX model and how to compare it with the original."""

    model: bytes
    task: Task
    class_labels: list[Any] | None
    reference: Callable[[np.ndarray], np.ndarray]
    output_name: str


def export(source: SourceModel, train: Dataset) -> Exported:
    """Export ``source`` to float ONNX bytes with the uniform output contract.

    Raises:
        DataError: If the data does not fit the model (feature count, label set).
        ModelLoadError: If the model cannot be exported.
    """
    if source.kind == "sklearn":
        model, task, labels, ref = _sklearn(source.obj, train)
    elif source.kind in ("torch-export", "torchscript", "torch-module"):
        model, task, labels, ref = _torch(source, train)
    else:
        model, task, labels, ref = _onnx(source.obj, train)
    model = finalise(model, task)
    out = PROBABILITIES if task == "classification" else PREDICTION
    return Exported(
        model=serialise(model), task=task, class_labels=labels, reference=ref, output_name=out
    )


def serialise(model: onnx.ModelProto) -> bytes:
    """Deterministic protobuf bytes."""
    return model.SerializeToString(deterministic=True)


def _check_features(expected: int | None, x: np.ndarray, what: str) -> None:
    got = int(np.prod(x.shape[1:]))
    if expected is not None and expected != got and x.ndim == 2:
        raise DataError(f"{what} has {got} features per row, the model expects {expected}")


def _sklearn(est: Any, train: Dataset) -> tuple[onnx.ModelProto, Task, list[Any] | None, Any]:
    from skl2onnx import to_onnx
    from sklearn.base import is_classifier

    if train.x.ndim != 2:
        raise DataError(f"scikit-learn models take 2-D data, got shape {train.x.shape}")
    _check_features(getattr(est, "n_features_in_", None), train.x, f"data {train.path}")
    final = est.steps[-1][1] if hasattr(est, "steps") else est
    classifier = is_classifier(est)
    options = {id(final): {"zipmap": False}} if classifier else None
    try:
        model = to_onnx(est, train.x[:1], options=options, target_opset=SKLEARN_OPSET)
    except Exception as exc:  # skl2onnx raises many kinds for unsupported models
        raise ModelLoadError(f"skl2onnx cannot export {type(est).__name__}: {exc}") from exc
    model = rename_input(model, INPUT)
    if classifier:
        labels = [_plain(c) for c in est.classes_]
        _check_labels(train.y, labels, train)
        keep = next(o.name for o in model.graph.output if o.name != "label")
        model = keep_output(model, keep, PROBABILITIES)
        return model, "classification", labels, lambda x: np.asarray(est.predict_proba(x))
    model = keep_output(model, model.graph.output[0].name, PREDICTION)
    return model, "regression", None, lambda x: np.asarray(est.predict(x)).reshape(len(x), -1)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _check_labels(y: np.ndarray, labels: list[Any], data: Dataset) -> None:
    unknown = sorted({_plain(v) for v in np.unique(y)} - set(labels), key=str)
    if unknown:
        raise DataError(
            f"data {data.path} has labels {unknown[:5]} the model does not know;"
            f" its classes are {labels[:20]}"
        )


def _infer_task(width: int, y: np.ndarray, data: Dataset) -> tuple[Task, list[Any] | None]:
    integral = y.dtype.kind in "iub" or (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0))
    if width > 1 and integral:
        labels = list(range(width))
        _check_labels(y.astype(np.int64), labels, data)
        return "classification", labels
    if width > 1:
        raise DataError(f"model has {width} outputs but labels in {data.path} are not class ids")
    return "regression", None


def _torch(
    source: SourceModel, train: Dataset
) -> tuple[onnx.ModelProto, Task, list[Any] | None, Any]:
    import torch

    module = source.obj.module() if source.kind == "torch-export" else source.obj
    sample = torch.from_numpy(train.x[:2])
    try:
        with torch.no_grad():
            width = int(np.prod(module(sample).shape[1:]))
    except Exception as exc:  # a shape mismatch surfaces as RuntimeError from torch
        raise DataError(
            f"model does not accept data of shape {tuple(train.x.shape[1:])}: {exc}"
        ) from exc
    task, labels = _infer_task(width, train.y, train)
    try:
        if source.kind == "torch-export":
            from converters.quantise import quiet

            with quiet():  # the exporter logs progress and torchvision notices
                program = torch.onnx.export(
                    source.obj, (sample,), dynamo=True, external_data=False, verbose=False
                )
            if program is None:
                raise ModelLoadError("torch.onnx.export returned no program")
            model = program.model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(
                module,
                (sample,),
                buf,  # type: ignore[arg-type]
                dynamo=False,
                input_names=[INPUT],
                output_names=["output"],
                opset_version=TORCHSCRIPT_OPSET,
                dynamic_axes={INPUT: {0: "batch"}, "output": {0: "batch"}},
            )
            model = onnx.load_from_string(buf.getvalue())
    except Exception as exc:  # torch.onnx raises many kinds
        raise ModelLoadError(f"torch.onnx cannot export this model: {exc}") from exc
    model = rename_input(model, INPUT)

    def reference(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = module(torch.from_numpy(x)).reshape(len(x), -1)
            return (torch.softmax(out, dim=1) if task == "classification" else out).numpy()

    out_name = model.graph.output[0].name
    if task == "classification":
        model = append_softmax(model, out_name, PROBABILITIES)
    else:
        model = keep_output(model, out_name, PREDICTION)
    return model, task, labels, reference


def _onnx(
    model: onnx.ModelProto, train: Dataset
) -> tuple[onnx.ModelProto, Task, list[Any] | None, Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(serialise(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    try:
        outs = session.run(None, {name: train.x[:2]})
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise DataError(
            f"model does not accept data of shape {tuple(train.x.shape[1:])}: {exc}"
        ) from exc
    float_outs = [i for i, o in enumerate(outs) if np.asarray(o).dtype.kind == "f"]
    if not float_outs:
        raise ModelLoadError("ONNX model has no float output to use as scores or predictions")
    index = float_outs[-1]
    width = int(np.prod(np.asarray(outs[index]).shape[1:]))
    task, labels = _infer_task(width, train.y, train)
    out_name = session.get_outputs()[index].name
    model = rename_input(model, INPUT)

    def reference(x: np.ndarray) -> np.ndarray:
        return np.asarray(session.run(None, {name: x})[index]).reshape(len(x), -1)

    target = PROBABILITIES if task == "classification" else PREDICTION
    return keep_output(model, out_name, target), task, labels, reference


# -- graph transforms ---------------------------------------------------------------------------


def rename_input(model: onnx.ModelProto, new: str) -> onnx.ModelProto:
    """Rename the first graph input (and its uses) to ``new``."""
    old = model.graph.input[0].name
    if old == new:
        return model
    model.graph.input[0].name = new
    for node in model.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
    return model


def keep_output(model: onnx.ModelProto, name: str, new_name: str) -> onnx.ModelProto:
    """Keep only graph output ``name`` (renamed ``new_name``) and the nodes it needs."""
    kept = [o for o in model.graph.output if o.name == name]
    if not kept:
        raise ModelLoadError(f"graph has no output {name!r}")
    output = onnx.ValueInfoProto()
    output.CopyFrom(kept[0])
    if name != new_name:
        model.graph.node.append(helper.make_node("Identity", [name], [new_name]))
        output.name = new_name
    del model.graph.output[:]
    model.graph.output.append(output)
    return prune(model)


def prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes and initializers no graph output depends on."""
    needed = {o.name for o in model.graph.output}
    kept = []
    for node in reversed(list(model.graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    inits = [i for i in model.graph.initializer if i.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    return model


def append_softmax(model: onnx.ModelProto, logits: str, out: str) -> onnx.ModelProto:
    """Add Softmax over axis 1 after ``logits`` and make it the only output."""
    model.graph.node.append(helper.make_node("Softmax", [logits], [out], axis=1))
    shape = [
        d.dim_value or d.dim_param or None for d in model.graph.output[0].type.tensor_type.shape.dim
    ]
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, shape))
    return prune(model)


def lower_scaler(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace ai.onnx.ml ``Scaler`` (y = (x - offset) * scale) with standard Sub and Mul."""
    nodes = []
    for i, node in enumerate(model.graph.node):
        if node.op_type != "Scaler" or node.domain != "ai.onnx.ml":
            nodes.append(node)
            continue
        attrs = {a.name: list(a.floats) for a in node.attribute}
        off = f"scaler{i}_offset"
        scale = f"scaler{i}_scale"
        model.graph.initializer.extend(
            [
                numpy_helper.from_array(np.asarray(attrs.get("offset", [0.0]), np.float32), off),
                numpy_helper.from_array(np.asarray(attrs.get("scale", [1.0]), np.float32), scale),
            ]
        )
        centred = f"scaler{i}_centred"
        nodes.append(helper.make_node("Sub", [node.input[0], off], [centred]))
        nodes.append(helper.make_node("Mul", [centred, scale], [node.output[0]]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def dedupe_opsets(model: onnx.ModelProto) -> onnx.ModelProto:
    """One import per domain (skl2onnx can list ai.onnx twice, which breaks quantisation), and
    none for ai.onnx.ml once no node uses it."""
    versions: dict[str, int] = {}
    for imp in model.opset_import:
        versions[imp.domain] = max(versions.get(imp.domain, 0), imp.version)
    used = {n.domain for n in model.graph.node}
    del model.opset_import[:]
    for domain in sorted(versions):
        if domain in ("", "ai.onnx") or domain in used:
            model.opset_import.append(helper.make_opsetid(domain, versions[domain]))
    return model


def finalise(model: onnx.ModelProto, task: Task) -> onnx.ModelProto:
    """Apply the levers and fix metadata so the bytes are deterministic."""
    model = lower_scaler(model)
    model = dedupe_opsets(model)
    model.producer_name = "edgefleet"
    model.producer_version = ""
    model.doc_string = ""
    model.graph.doc_string = ""
    del model.metadata_props[:]
    onnx.checker.check_model(model)
    return model


def check_parity(exported: Exported, data: Dataset, tolerance: float = 1e-4) -> float:
    """Compare the float ONNX model with the original on ``data``.

    Returns:
        The worst absolute difference.

    Raises:
        ParityError: If it exceeds ``tolerance`` (relative for regression), naming the row.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(exported.model, providers=["CPUExecutionProvider"])
    ours = np.asarray(session.run(None, {INPUT: data.x})[0]).reshape(len(data.x), -1)
    theirs = np.asarray(exported.reference(data.x), dtype=np.float64).reshape(len(data.x), -1)
    scale = 1.0 if exported.task == "classification" else np.maximum(1.0, np.abs(theirs))
    diff = np.abs(ours - theirs) / scale
    worst = int(np.argmax(diff.max(axis=1)))
    worst_diff = float(diff[worst].max())
    if worst_diff > tolerance:
        raise ParityError(
            f"ONNX export disagrees with the original on eval row {worst}: difference"
            f" {worst_diff:.3g} > {tolerance:g};"
            f" original {np.round(theirs[worst][:6], 5).tolist()},"
            f" onnx {np.round(ours[worst][:6], 5).tolist()}",
            worst,
            worst_diff,
        )
    return worst_diff
