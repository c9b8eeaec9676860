"""Small models trained here and logged to an MLflow server as a training pipeline would: with
parameters, metrics, a signature and the datasets (``mlflow.log_input``), then registered.

Training runs before the server answers (it takes tens of seconds to start); logging after.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

FEATURES = ["acc_x", "acc_y", "acc_z", "gyro_x", "gyro_y", "gyro_z"]
MODEL = "wrist-activity"


@dataclass
class Trained:
    """The data, and models fitted on it that are not logged yet."""

    train: pd.DataFrame
    y: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray
    sklearn: dict[str, tuple[Any, dict[str, Any]]] = field(default_factory=dict)
    net: Any = None
    onnx_model: Any = None

    def accuracy(self, name: str) -> float:
        """A trained model's accuracy on the held-out rows, as the original computes it."""
        if name == "torch":
            import torch

            with torch.no_grad():
                scores = self.net(torch.from_numpy(self.x_eval)).numpy()
            return float((scores.argmax(1) == self.y_eval).mean())
        estimator = self.sklearn[name][0]
        return float(estimator.score(pd.DataFrame(self.x_eval, columns=FEATURES), self.y_eval))


def train() -> Trained:
    """Two scikit-learn pipelines (v1, v2), a PyTorch MLP and an ONNX logistic regression."""
    import torch
    from skl2onnx import to_onnx
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = make_classification(
        n_samples=800, n_features=6, n_informative=4, n_redundant=0, random_state=3
    )
    x = x.astype(np.float32)
    trained = Trained(pd.DataFrame(x[:600], columns=FEATURES), y[:600], x[600:], y[600:])
    for name, c in (("v1", 1.0), ("v2", 0.01)):
        pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500))
        trained.sklearn[name] = (
            pipeline.fit(trained.train, trained.y),
            {"model": "logreg", "C": c},
        )
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    rows, target = torch.from_numpy(trained.train.to_numpy()), torch.from_numpy(trained.y)
    optimiser = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(150):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(net(rows), target).backward()
        optimiser.step()
    trained.net = net.eval()
    plain = LogisticRegression(max_iter=500).fit(trained.train.to_numpy(), trained.y)
    trained.onnx_model = to_onnx(
        plain, x[:1], options={id(plain): {"zipmap": False}}, target_opset=17
    )
    return trained


def log_all(mlflow: Any, trained: Trained) -> dict[str, str]:
    """Log and register every model; alias ``champion`` names v2. Returns run ids by model.

    Registered: ``wrist-activity`` 1 and 2 (sklearn, skops format), ``wrist-activity-torch`` 1
    (``.pt2``, MLflow's default) and 2 (pickled module), ``wrist-activity-onnx`` 1, and ``echo`` 1
    (a pyfunc model, no flavour we convert).
    """
    runs = {name: _log_sklearn(mlflow, trained, name) for name in ("v1", "v2")}
    mlflow.MlflowClient().set_registered_model_alias(MODEL, "champion", "2")
    for fmt in ("pt2", "pickle"):
        runs[f"torch-{fmt}"] = _log_torch(mlflow, trained, fmt)
    with mlflow.start_run():
        mlflow.onnx.log_model(
            trained.onnx_model,
            name="model",
            registered_model_name=f"{MODEL}-onnx",
            pip_requirements=["onnx"],
        )

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context: Any, model_input: Any) -> Any:
            return model_input

    with mlflow.start_run():
        mlflow.pyfunc.log_model(
            name="model",
            python_model=Echo(),
            registered_model_name="echo",
            pip_requirements=["mlflow"],
        )
    return runs


def _log_sklearn(mlflow: Any, trained: Trained, name: str) -> str:
    from mlflow.models import infer_signature

    estimator, params = trained.sklearn[name]
    with mlflow.start_run() as run:
        mlflow.log_params(params)
        mlflow.log_metrics({"accuracy": trained.accuracy(name), "train_rows": 600.0})
        table = trained.train.assign(label=trained.y)
        mlflow.log_input(
            mlflow.data.from_pandas(table, name="wrist-train", targets="label"), context="training"
        )
        mlflow.log_input(
            mlflow.data.from_numpy(trained.x_eval, targets=trained.y_eval, name="wrist-eval"),
            context="eval",
        )
        mlflow.sklearn.log_model(
            estimator,
            name="model",
            signature=infer_signature(trained.train, estimator.predict(trained.train)),
            registered_model_name=MODEL,
            pip_requirements=["scikit-learn"],
        )
    return str(run.info.run_id)


def _log_torch(mlflow: Any, trained: Trained, fmt: str) -> str:
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        scores = trained.net(torch.from_numpy(trained.x_eval)).numpy()
    with mlflow.start_run() as run:
        mlflow.log_params({"hidden": 16, "epochs": 150, "format": fmt})
        mlflow.log_metric("accuracy", trained.accuracy("torch"))
        rows = trained.train.to_numpy()
        mlflow.log_input(mlflow.data.from_numpy(rows, targets=trained.y, name="wrist-train-np"))
        mlflow.pytorch.log_model(
            trained.net,
            name="model",
            signature=infer_signature(trained.x_eval, scores),
            input_example=trained.x_eval[:2],
            registered_model_name=f"{MODEL}-torch",
            serialization_format=fmt,
            pip_requirements=["torch"],
        )
    return str(run.info.run_id)
