"""Trial checkpoints: everything a resumed run needs to continue exactly where it stopped.

A checkpoint folder holds `state.pt` (the trainable weights only, so a LoRA checkpoint holds the adapter
and not the base model; the optimizer; the scheduler; the sampler position; the logit cache; the RNG
states; the loop counters) and an empty `COMPLETE` marker written last. The state is written to a
temporary file, flushed to disk and renamed, so a failure while saving (a full disk, say) leaves no
half-written checkpoint and the previous one intact; it is raised as `CheckpointError`, a `UserError`
(the trial stops with one clear line saying where and why, no traceback).
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import numpy as np
import torch

from raysdpb.errors import UserError

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "trainable_state_dict",
           "CheckpointError"]


class CheckpointError(UserError):
    """Saving a checkpoint failed (a full disk, no permission); the previous checkpoint is intact."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, state: dict) -> Path:
    """Write `state` into the folder `path`: `state.pt` (via a temporary file, fsynced, renamed), then
    `COMPLETE`. Raises `CheckpointError` (nothing of the new checkpoint is left behind)."""
    from raysdpb.context import inject_fault

    path = Path(path)
    tmp = path / "state.pt.tmp"
    try:
        path.mkdir(parents=True, exist_ok=True)
        inject_fault("save", int(state.get("step", -1)), state.get("config"))
        # through a Python file object: a full disk then raises OSError(ENOSPC); torch.save(state, a_path)
        # raises an opaque RuntimeError from its C++ writer instead
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / "state.pt")
        (path / "COMPLETE").touch()
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if not (path / "COMPLETE").exists():
            (path / "state.pt").unlink(missing_ok=True)
        if not isinstance(err, OSError):
            raise
        reason = err.strerror or str(err)
        todo = "free some disk space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
        raise CheckpointError(f"could not save the checkpoint of step {state.get('step')} to {path}: {reason}; "
                              f"{todo} (or write checkpoints elsewhere: --output-dir, sweep.storage_path); the "
                              "previous checkpoint is intact") from err
    return path


def load_checkpoint(path: Path) -> dict:
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)


def load_trainable_state(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    unknown = [k for k in weights if k not in params]
    missing = [k for k, p in params.items() if p.requires_grad and k not in weights]
    if unknown or missing:
        raise RuntimeError(f"checkpoint does not match the model: unknown {unknown[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
