"""What a trial reports about its training: the running sums of an epoch, the scalars of a step for
TensorBoard, per-layer gradient norms, and the result of the whole trial."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from raysdpb.methods import LossTerms

__all__ = ["EpochStats", "step_scalars", "layer_grad_norms", "TrialResult", "report_points"]


def report_points(samples_seen: int, every: float, num_examples: int) -> int:
    """How many of the report points `every x N`, `2 x every x N`, ... (N = `num_examples`, the training set) a
    trial has reached at `samples_seen`: a trial with `eval_every` reports at the first step that reaches a new
    one. Exact: `every` is taken as the decimal it was written as (0.1 is 1/10, not the float above it), so a
    point such as 10 x 0.1 x N is reached at N samples."""
    return math.floor(samples_seen / (Fraction(repr(float(every))) * num_examples))


@dataclass
class EpochStats:
    """Sums over the current epoch (of one rank), for the epoch's report. Plain data, so it checkpoints as a dict."""

    steps: int = 0
    loss: float = 0.0
    ce: float = 0.0
    distill: float = 0.0
    distill_steps: int = 0
    alpha: list = field(default_factory=list)
    tau: list = field(default_factory=list)

    def add(self, terms: LossTerms) -> None:
        self.steps += 1
        self.loss += float(terms.total.detach())
        self.ce += float(terms.ce)
        if terms.distill is not None:
            self.distill += float(terms.distill)
            self.distill_steps += 1
        if terms.alpha is not None:
            self.alpha.append(float(terms.alpha.mean()))
        if terms.tau is not None:
            self.tau.append(float(terms.tau.mean()))

    def summary(self) -> dict[str, float]:
        out = {"train_loss": self.loss / max(self.steps, 1), "train_ce": self.ce / max(self.steps, 1)}
        if self.distill_steps:
            out["train_distill"] = self.distill / self.distill_steps
        if self.alpha:
            out["alpha_mean"] = float(np.mean(self.alpha))
        if self.tau:
            out["tau_mean"] = float(np.mean(self.tau))
        return out

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "EpochStats":
        return cls(**state)


def step_scalars(terms: LossTerms, lr: float) -> dict[str, float]:
    """A step's TensorBoard scalars: the loss terms, the learning rate, and the spread of alpha_i and tau_i."""
    scalars = {"train/loss": float(terms.total.detach()), "train/ce": float(terms.ce), "train/lr": lr}
    if terms.distill is not None:
        scalars["train/distill"] = float(terms.distill)
    for name, values in (("alpha", terms.alpha), ("tau", terms.tau)):
        if values is not None:
            scalars[f"dynamic/{name}_mean"] = float(values.mean())
            scalars[f"dynamic/{name}_std"] = float(values.std()) if values.numel() > 1 else 0.0
            scalars[f"dynamic/{name}_min"] = float(values.min())
            scalars[f"dynamic/{name}_max"] = float(values.max())
    return scalars


_LAYER = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of the gradient per transformer layer (`layer_00`, ...), plus `embeddings` and `head`."""
    sums: dict[str, float] = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        m = _LAYER.search(name)
        group = f"layer_{int(m.group(1)):02d}" if m else ("embeddings" if "embed" in name else "head")
        sums[group] = sums.get(group, 0.0) + float(p.grad.detach().float().pow(2).sum())
    return {k: math.sqrt(v) for k, v in sorted(sums.items())}


@dataclass
class TrialResult:
    status: str                  # "completed" or "diverged"
    metrics: dict                # the last evaluation, eval_<metric>
    epochs_run: float
    steps: int
    message: str = ""
    history: list = field(default_factory=list)

    def summary_line(self, config) -> str:
        return json.dumps({**self.metrics, "method": config.method, "task": config.task, "seed": config.seed,
                           "status": self.status, "epochs_run": self.epochs_run})
