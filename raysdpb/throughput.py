"""A trial's throughput: tokens per second and model FLOPs utilisation (MFU), as pure functions.

* `tokens_per_s`: the non-padding training tokens (the attention mask's ones) of every rank, over the seconds the
  loop spent training (its steps and data loading; evaluation and checkpoints left out).
* FLOPs per token (`train_flops_per_token`): a forward pass costs 2 FLOPs per parameter that multiplies (a
  multiply and an add), the backward pass 2 more for the input gradients and 2 for the weight gradients of the
  parameters that train. So `2N + 2N + 2N_trainable`: 6N for full fine-tuning, about 4N for LoRA (frozen
  weights pass gradients on but get none). N counts the parameters that multiply (`matmul_parameters`): every one
  but the input embedding tables, which are looked up, not multiplied (an output layer tied to them, as a
  decoder's LM head, counts). The attention's own products (score and value, 4 x layers x width x length per
  token) and padding are not counted, so MFU is a lower bound on the useful share of the peak.
  (benchmarks/overhead.py's MFU counts 6 x all parameters over padded tokens: a different, larger figure.)
* `mfu`: achieved FLOP/s (tokens/s x FLOPs per token) over the peak of the devices the trial ran on (the peak of
  one, `peak_flops`, x their number): dense (no sparsity) FLOP/s of the device's CUDA name at the step's
  precision (`PEAK_FLOPS`, NVIDIA's datasheets; fp32 is the plain FP32 rate, tf32 the tensor-core rate PyTorch
  uses when `torch.backends.cuda.matmul.allow_tf32` is on). `$RAYSDPB_PEAK_FLOPS` (FLOP/s of one device, e.g.
  `989e12`) overrides the table; on a CPU, or a GPU not in the table, MFU is None unless it is set.
"""

from __future__ import annotations

import os
import re

from raysdpb.errors import UserError

__all__ = ["PEAK_FLOPS", "PEAK_FLOPS_ENV", "device_kind", "peak_flops", "train_flops_per_token",
           "matmul_parameters", "tokens_per_s", "mfu"]

PEAK_FLOPS_ENV = "RAYSDPB_PEAK_FLOPS"

# dense FLOP/s by device and precision (None: the device has no such tensor-core path)
PEAK_FLOPS: dict[str, dict[str, float | None]] = {
    "h100-sxm": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "h100-pcie": {"bf16": 756.5e12, "fp16": 756.5e12, "tf32": 378.0e12, "fp32": 51.2e12},
    "h100-nvl": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12},
    "h200": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "a100": {"bf16": 312.0e12, "fp16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12},
    "a10g": {"bf16": 125.0e12, "fp16": 125.0e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "l4": {"bf16": 121.0e12, "fp16": 121.0e12, "tf32": 60.0e12, "fp32": 30.3e12},
    "t4": {"bf16": None, "fp16": 65.0e12, "tf32": None, "fp32": 8.1e12},
    "v100-sxm": {"bf16": None, "fp16": 125.0e12, "tf32": None, "fp32": 15.7e12},
    "v100-pcie": {"bf16": None, "fp16": 112.0e12, "tf32": None, "fp32": 14.0e12},
}


def device_kind(name: str) -> str | None:
    """The `PEAK_FLOPS` entry of a CUDA device name (`torch.cuda.get_device_name()`: "NVIDIA H100 80GB HBM3",
    "NVIDIA A100-SXM4-80GB", "Tesla T4", ...), None when it is not in the table."""
    n = name.lower()
    if "h200" in n:
        return "h200"
    if "h100" in n:
        return "h100-nvl" if "nvl" in n else "h100-pcie" if "pcie" in n else "h100-sxm"
    if "a100" in n:
        return "a100"
    if "a10g" in n:
        return "a10g"
    if re.search(r"\bl4\b", n):
        return "l4"
    if re.search(r"\bt4\b", n):
        return "t4"
    if "v100" in n:
        return "v100-pcie" if "pcie" in n else "v100-sxm"
    return None


def peak_flops(device_name: str | None, precision: str, environ: dict | None = None) -> float | None:
    """One device's peak FLOP/s at `precision` (bf16, fp16, tf32, fp32): `$RAYSDPB_PEAK_FLOPS` if set, else the
    table's entry for the CUDA device name (None for a CPU, `device_name` None, or a device not in the table)."""
    environ = os.environ if environ is None else environ
    given = environ.get(PEAK_FLOPS_ENV)
    if given:
        try:
            value = float(given)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise UserError(f"${PEAK_FLOPS_ENV}={given!r}: give one device's peak in FLOP/s, e.g. 989e12, or unset it")
        return value
    kind = device_kind(device_name) if device_name else None
    return PEAK_FLOPS[kind].get(precision) if kind else None


def train_flops_per_token(parameters: int, trainable: int) -> float:
    """Training FLOPs per token: 2 x `parameters` forward, 2 x `parameters` for the input gradients, 2 x
    `trainable` for the weight gradients (6N when every parameter trains)."""
    return 4.0 * parameters + 2.0 * trainable


def matmul_parameters(model) -> tuple[int, int]:
    """(parameters that multiply, those of them that train) of a torch model: all but the input embedding tables
    (an embedding tied to the output layer counts once, as the output layer)."""
    import torch

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = {id(output.weight)} if output is not None and getattr(output, "weight", None) is not None else set()
    looked_up = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} - tied
    total = trainable = 0
    for p in model.parameters():  # each shared tensor once
        if id(p) in looked_up:
            continue
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def tokens_per_s(tokens: int, seconds: float) -> float | None:
    return tokens / seconds if seconds > 0 else None


def mfu(tokens_per_second: float | None, flops_per_token: float, peak: float | None, devices: int = 1) -> float | None:
    """Achieved over peak FLOP/s of `devices` devices of `peak` FLOP/s each (None without a peak or a rate)."""
    if not peak or tokens_per_second is None:
        return None
    return tokens_per_second * flops_per_token / (peak * devices)
