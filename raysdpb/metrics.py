"""Evaluation metrics (section 7 of docs/method.md): pure functions of predictions and labels.

Classification metrics take class ids (lists or numpy arrays) and delegate to scikit-learn; every value is a
python float and never NaN (a degenerate case, such as Matthews correlation of a constant prediction, is
0.0, the value scikit-learn documents for it). `exact_match` compares extracted answers of generation tasks.

`METRICS` maps a metric name (as used in `TaskSpec.metrics`) to its function; `compute_metrics` evaluates
several at once, keyed by name.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

__all__ = ["accuracy", "f1", "macro_f1", "matthews", "exact_match", "METRICS", "compute_metrics"]


def _class_ids(predictions: Sequence[int], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    y_pred = np.asarray(predictions, dtype=np.int64).reshape(-1)
    y_true = np.asarray(labels, dtype=np.int64).reshape(-1)
    if y_pred.shape != y_true.shape:
        raise ValueError(f"{len(y_pred)} predictions for {len(y_true)} labels")
    if y_true.size == 0:
        raise ValueError("no predictions to score")
    return y_pred, y_true


def _finite(value: float) -> float:
    value = float(value)
    return 0.0 if math.isnan(value) else value


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to the label."""
    y_pred, y_true = _class_ids(predictions, labels)
    return _finite(accuracy_score(y_true, y_pred))


def f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Binary F1 of the positive class 1 (MRPC: paraphrase, QQP: duplicate); 0.0 when class 1 is never
    predicted and never true."""
    y_pred, y_true = _class_ids(predictions, labels)
    # labels=[1]: the F1 of class 1 alone, also when a prediction or label is another class id
    return _finite(f1_score(y_true, y_pred, labels=[1], average=None, zero_division=0.0)[0])


def macro_f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Unweighted mean of the per-class F1 over the classes that occur in labels or predictions (CB)."""
    y_pred, y_true = _class_ids(predictions, labels)
    return _finite(f1_score(y_true, y_pred, average="macro", zero_division=0.0))


def matthews(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation coefficient (CoLA); 0.0 when it is undefined (a constant prediction or label)."""
    y_pred, y_true = _class_ids(predictions, labels)
    if np.unique(np.concatenate([y_true, y_pred])).size < 2:  # one class everywhere: undefined, 0.0 as sklearn
        return 0.0
    return _finite(matthews_corrcoef(y_true, y_pred))


def exact_match(predictions: Sequence[str | None], references: Sequence[str]) -> float:
    """Fraction of extracted answers equal to the reference (as strings, surrounding whitespace ignored);
    a `None` prediction (nothing could be extracted) counts as wrong."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no predictions to score")
    hits = sum(p is not None and str(p).strip() == str(r).strip() for p, r in zip(predictions, references))
    return hits / len(references)


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "macro_f1": macro_f1,
    "matthews": matthews,
    "exact_match": exact_match,
}


def compute_metrics(names: Sequence[str], predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """`{name: value}` for each metric in `names` (in that order)."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(METRICS)}")
    return {name: float(METRICS[name](predictions, labels)) for name in names}
