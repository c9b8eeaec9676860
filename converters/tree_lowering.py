"""Tree ensembles lowered to tensor ops that TFLite Micro has, so forests can go to a ring.

ONNX's ``TreeEnsembleClassifier`` has no TFLite or TFLM kernel. This writes the ensemble as a
plain graph in the spirit of Hummingbird's GEMM strategy, but with gathers so the size grows with
the number of nodes, not its square:

1. ``Gather`` the feature each internal node tests; a node's decision is
   ``min(relu((t' - x) * 2^100), 1)``, exactly 1.0 when ``x <= t`` and 0.0 otherwise, where
   ``t'`` is the next float32 above the threshold (scikit-learn compares float32 features with
   ``<=``; the product saturates for any positive float32 difference).
2. ``Concat`` the decisions, their complements and a constant 1; ``Gather`` for every leaf the
   ``depth`` entries on its path (padded with the constant), ``ReduceSum`` them: a leaf is
   reached exactly when the sum is ``depth``, so ``relu(sum - (depth - 1))`` is its indicator.
3. ``MatMul`` the indicators with the leaves' values (averaged over trees for forests, scaled by
   the learning rate for gradient boosting) and finish as scikit-learn does (sigmoid/softmax).

TFLM's GATHER takes int32 positions only, so indices are int32. Ops: Gather, Sub, Mul, Relu,
Min, Concat, Reshape, ReduceSum, MatMul, Add, Sigmoid, Softmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converters.errors import ModelLoadError
from converters.onnx_export import INPUT, PROBABILITIES, serialise

OPSET = 17
#: Saturates (t' - x) to at least 1.0 for every positive float32 difference (smallest 2^-149).
_STEP_GAIN = float(2.0**100)


@dataclass
class _Leaves:
    node_feature: list[int]
    node_threshold: list[float]
    paths: list[list[int]]  # per leaf: indices into [d, 1 - d] (node i left = i, right = M + i)
    values: list[np.ndarray]  # per leaf: contribution to each output column


def supports(estimator: Any) -> bool:
    """Whether :func:`lower` can lower ``estimator`` (a fitted scikit-learn model)."""
    name = type(estimator).__name__
    return name in (
        "RandomForestClassifier",
        "ExtraTreesClassifier",
        "DecisionTreeClassifier",
        "GradientBoostingClassifier",
    )


def _walk(tree: Any, leaves: _Leaves, value_of: Any) -> None:
    left, right = tree.children_left, tree.children_right
    base = len(leaves.node_feature)
    internal: dict[int, int] = {}
    for node in range(tree.node_count):
        if left[node] != -1:
            internal[node] = base + len(internal)
            leaves.node_feature.append(int(tree.feature[node]))
            threshold = np.float32(tree.threshold[node])
            if float(threshold) > float(tree.threshold[node]):  # largest float32 <= threshold
                threshold = np.nextafter(threshold, np.float32(-np.inf))
            leaves.node_threshold.append(float(np.nextafter(threshold, np.float32(np.inf))))
    stack: list[tuple[int, list[int]]] = [(0, [])]
    while stack:
        node, path = stack.pop()
        if left[node] == -1:
            leaves.paths.append(path)
            leaves.values.append(value_of(node))
            continue
        # Decision entries are resolved to absolute indices once the node count is known.
        stack.append((int(left[node]), [*path, internal[node]]))
        stack.append((int(right[node]), [*path, -1 - internal[node]]))


def lower(estimator: Any) -> bytes:
    """The ensemble as float ONNX bytes: input ``input`` ``[N, F]``, output ``probabilities``.

    Raises:
        ModelLoadError: If the estimator is of a kind this cannot lower.
    """
    if not supports(estimator):
        raise ModelLoadError(f"cannot lower {type(estimator).__name__} to tensor ops")
    leaves = _Leaves([], [], [], [])
    name = type(estimator).__name__
    classes = len(estimator.classes_)
    bias = np.zeros(classes, dtype=np.float64)
    finish = "none"
    if name == "GradientBoostingClassifier":
        columns = 1 if classes == 2 else classes
        rate = float(estimator.learning_rate)
        bias = np.zeros(columns)
        init = estimator._raw_predict_init(np.zeros((1, estimator.n_features_in_)))
        bias = np.asarray(init, dtype=np.float64).reshape(-1)
        for stage in estimator.estimators_:
            for column, tree in enumerate(stage):

                def gb_value(node: int, t: Any = tree.tree_, c: int = column) -> np.ndarray:
                    v = np.zeros(columns)
                    v[c] = rate * float(t.value[node].reshape(-1)[0])
                    return v

                _walk(tree.tree_, leaves, gb_value)
        finish = "sigmoid" if classes == 2 else "softmax"
    else:
        trees = estimator.estimators_ if hasattr(estimator, "estimators_") else [estimator]
        for tree in trees:

            def rf_value(node: int, t: Any = tree.tree_, n: int = len(trees)) -> np.ndarray:
                v = np.asarray(t.value[node][0], dtype=np.float64)
                return v / v.sum() / n

            _walk(tree.tree_, leaves, rf_value)
    return serialise(_graph(leaves, estimator.n_features_in_, bias, finish, classes))


def _graph(leaves: _Leaves, features: int, bias: np.ndarray, finish: str, classes: int) -> Any:
    nodes = len(leaves.node_feature)
    depth = max(1, max(len(p) for p in leaves.paths))
    one = 2 * nodes  # index of the constant 1 in [d, 1 - d, 1]
    index = np.full((len(leaves.paths), depth), one, dtype=np.int64)
    for leaf, path in enumerate(leaves.paths):
        for step, entry in enumerate(path):
            index[leaf, step] = entry if entry >= 0 else nodes + (-1 - entry)
    values = np.stack(leaves.values).astype(np.float32)
    init = [
        numpy_helper.from_array(np.asarray(leaves.node_feature, dtype=np.int32), "feature"),
        numpy_helper.from_array(np.asarray(leaves.node_threshold, dtype=np.float32), "threshold"),
        numpy_helper.from_array(np.asarray([_STEP_GAIN], dtype=np.float32), "gain"),
        numpy_helper.from_array(np.asarray([1.0], dtype=np.float32), "one"),
        numpy_helper.from_array(np.ones((1, 1), dtype=np.float32), "one_column"),
        numpy_helper.from_array(index.reshape(-1).astype(np.int32), "path"),
        numpy_helper.from_array(np.asarray([-1, len(leaves.paths), depth]), "path_shape"),
        numpy_helper.from_array(np.asarray([2]), "depth_axis"),
        numpy_helper.from_array(np.asarray([depth - 1.0], dtype=np.float32), "depth_less_one"),
        numpy_helper.from_array(values, "leaf_values"),
    ]
    ops = [
        helper.make_node("Gather", [INPUT, "feature"], ["tested"], axis=1),
        helper.make_node("Sub", ["threshold", "tested"], ["margin"]),
        helper.make_node("Mul", ["margin", "gain"], ["scaled"]),
        helper.make_node("Relu", ["scaled"], ["positive"]),
        helper.make_node("Min", ["positive", "one"], ["left"]),
        helper.make_node("Sub", ["one", "left"], ["right"]),
        # The constant 1 column takes the batch from the input (Mul by a [1, 1] ones broadcast).
        helper.make_node("Gather", ["left", "first"], ["left_first"], axis=1),
        helper.make_node("Mul", ["left_first", "zero"], ["zeros_column"]),
        helper.make_node("Add", ["zeros_column", "one_column"], ["ones_column"]),
        helper.make_node("Concat", ["left", "right", "ones_column"], ["decisions"], axis=1),
        helper.make_node("Gather", ["decisions", "path"], ["on_path"], axis=1),
        helper.make_node("Reshape", ["on_path", "path_shape"], ["paths"]),
        helper.make_node("ReduceSum", ["paths", "depth_axis"], ["met"], keepdims=0),
        helper.make_node("Sub", ["met", "depth_less_one"], ["excess"]),
        helper.make_node("Relu", ["excess"], ["reached"]),
        helper.make_node("MatMul", ["reached", "leaf_values"], ["raw"]),
    ]
    init += [
        numpy_helper.from_array(np.asarray([0], dtype=np.int32), "first"),
        numpy_helper.from_array(np.asarray([0.0], dtype=np.float32), "zero"),
    ]
    if finish == "none":
        ops.append(helper.make_node("Identity", ["raw"], [PROBABILITIES]))
    else:
        init.append(numpy_helper.from_array(bias.astype(np.float32), "init_score"))
        ops.append(helper.make_node("Add", ["raw", "init_score"], ["score"]))
        if finish == "softmax":
            ops.append(helper.make_node("Softmax", ["score"], [PROBABILITIES], axis=1))
        else:
            ops.append(helper.make_node("Sigmoid", ["score"], ["positive_class"]))
            ops.append(helper.make_node("Sub", ["ones_column", "positive_class"], ["negative"]))
            ops.append(
                helper.make_node("Concat", ["negative", "positive_class"], [PROBABILITIES], axis=1)
            )
    graph = helper.make_graph(
        ops,
        "lowered_trees",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [None, features])],
        [helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, [None, classes])],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    model.producer_name = "edgefleet"
    onnx.checker.check_model(model)
    return model
