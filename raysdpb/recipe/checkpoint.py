"""Trial checkpoints: what a checkpoint folder holds, how it is written, and when it is whole.

A checkpoint is a folder `checkpoint_step_<step:08d>` holding `model.safetensors` (the trainable weights only, so
a LoRA checkpoint holds the adapter and not the base model), `state.pt` (the rest of `Recipe.state_dict()`: the
optimizer; the scheduler; the sampler position; each rank's logit cache, RNG states and running sums; the loop
counters; the trial's config) and, written last, `raysdpb_manifest.json`: the size of every other file. A
finished trial's checkpoint may be *slimmed* to its weights (`slim_checkpoint`: `state.pt` dropped, the manifest
rewritten first): it can still be exported (`load_weights`), no longer resumed. A folder is a
checkpoint only when its files have the sizes its manifest records (`is_complete`, the one rule for local
folders and object stores alike, where a half-uploaded folder can look whole). Each file is written to a
temporary file, flushed to disk and renamed, so a failure while saving (a full disk, say) leaves no
half-written checkpoint and the previous one intact; it is raised as `CheckpointError`, a `UserError` (the
trial stops with one clear line saying where and why, no traceback).

`state.pt` holds plain data (tensors, dicts, lists, numbers) and a `format` number: a checkpoint of format 2 (the
weights inside `state.pt`) still loads; one of another format (written by an older raysdpb) is refused with one
clear message, never half-loaded.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from raysdpb.errors import UserError

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_PREFIX", "STATE_FILE", "MANIFEST_FILE", "CheckpointError",
           "WEIGHTS_FILE", "checkpoint_name", "checkpoint_step", "detached_copy", "write_state", "mark_complete",
           "is_complete", "is_complete_folder", "complete_checkpoints", "slim_checkpoint", "is_slim",
           "load_state", "load_weights", "rng_state", "set_rng_state", "trainable_state_dict", "load_trainable_state",
           "RESUME_MUST_MATCH", "check_resume_config"]

CHECKPOINT_FORMAT = 3  # 1: raysdpb before the recipe (pickled loop objects, no format key); 2: weights in state.pt
READABLE_FORMATS = (2, 3)
CHECKPOINT_PREFIX = "checkpoint_step_"
STATE_FILE = "state.pt"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "raysdpb_manifest.json"


class CheckpointError(UserError):
    """Saving a checkpoint failed (a full disk, no permission); the previous checkpoint is intact."""


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(path: str | Path) -> int:
    """The step in a checkpoint folder's name (`checkpoint_step_00000042` -> 42; -1 for other names)."""
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    try:
        return int(name[len(CHECKPOINT_PREFIX):]) if name.startswith(CHECKPOINT_PREFIX) else -1
    except ValueError:
        return -1


# --- writing ------------------------------------------------------------------------------------------------

def write_state(path: Path, state: dict) -> Path:
    """Write `state` as `path/model.safetensors` (`state["model"]`, the trainable weights) and `path/state.pt` (the
    rest), each via a temporary file, fsynced, renamed. Raises `CheckpointError` (nothing of the new checkpoint is
    left behind). The folder is not a checkpoint until `mark_complete`."""
    from safetensors.torch import save as safetensors_bytes

    path = Path(path)
    state = dict(state)
    weights = state.pop("model", None)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if weights is not None:
            data = safetensors_bytes({k: v.contiguous() for k, v in weights.items()})
            _write_file(path, WEIGHTS_FILE, lambda f: f.write(data))
        # through a Python file object: a full disk then raises OSError(ENOSPC); torch.save(state, a_path)
        # raises an opaque RuntimeError from its C++ writer instead
        _write_file(path, STATE_FILE, lambda f: torch.save({**state, "format": CHECKPOINT_FORMAT}, f))
    except BaseException as err:
        for name in (WEIGHTS_FILE, STATE_FILE):
            (path / f"{name}.tmp").unlink(missing_ok=True)
            (path / name).unlink(missing_ok=True)
        if not isinstance(err, OSError):
            raise
        reason = err.strerror or str(err)
        todo = "free some disk space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
        raise CheckpointError(f"could not save the checkpoint of step {state.get('step')} to {path}: {reason}; "
                              f"{todo} (or write checkpoints elsewhere: --output-dir, sweep.storage_path); the "
                              "previous checkpoint is intact") from err
    return path


def detached_copy(state):
    """`state` as it is now, for a writer that runs while training changes the live tensors in place: every tensor
    copied to host memory (its own storage, off the autograd graph), every container and other value copied."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: detached_copy(value) for key, value in state.items()}
    if isinstance(state, list):
        return [detached_copy(value) for value in state]
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        return tuple(detached_copy(value) for value in state)
    return copy.deepcopy(state)


def _write_file(folder: Path, name: str, write) -> None:
    """`write(f)` into `folder/name` through a temporary file, fsynced, then renamed."""
    tmp = folder / f"{name}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / name)


def mark_complete(path: Path) -> None:
    """Record the size of every file of a checkpoint folder, as the last file written into it."""
    path = Path(path)
    sizes = {f.name: f.stat().st_size for f in path.iterdir() if f.is_file() and f.name != MANIFEST_FILE}
    (path / MANIFEST_FILE).write_text(json.dumps(sizes, sort_keys=True))


# --- reading: local folders and object stores alike ------------------------------------------------------------

def is_complete(fs, path: str) -> bool:
    """Whether the checkpoint folder `path` on the pyarrow filesystem `fs` is whole: its manifest exists and
    every file it lists has the recorded size."""
    sizes = _manifest(fs, path)
    return sizes is not None and _has_sizes(fs, path, sizes)


def _manifest(fs, path: str) -> dict | None:
    """The file sizes a checkpoint folder's manifest records; None where it has no readable manifest."""
    try:
        with fs.open_input_stream(f"{path}/{MANIFEST_FILE}") as f:
            sizes = json.loads(f.read().decode())
    except (OSError, ValueError):
        return None
    return sizes if isinstance(sizes, dict) else None


def _has_sizes(fs, path: str, sizes: dict) -> bool:
    import pyarrow.fs as pafs

    try:
        files = {i.base_name: i.size for i in fs.get_file_info(pafs.FileSelector(path))}
    except OSError:
        return False
    return all(files.get(name) == size for name, size in sizes.items())


def is_complete_folder(path: str | Path) -> bool:
    """`is_complete` for a local folder (whatever its name)."""
    import pyarrow.fs as pafs

    return is_complete(pafs.LocalFileSystem(), str(Path(path).resolve()))


def complete_checkpoints(root: str | Path) -> list[tuple[int, str]]:
    """`(step, path)` of the whole checkpoints directly under `root` (a local folder or a URI), oldest first.
    A half-written or half-uploaded one is left out."""
    import pyarrow.fs as pafs

    from raysdpb.results.storage import filesystem

    fs, base = filesystem(str(root))
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError:
        return []
    found = [(checkpoint_step(i.path), i.path) for i in infos
             if i.type == pafs.FileType.Directory and checkpoint_step(i.path) >= 0]
    return sorted((step, path) for step, path in found if is_complete(fs, path))


def is_slim(fs, path: str) -> bool:
    """Whether a checkpoint holds its weights only (slimmed: it can be exported, not resumed)."""
    sizes = _manifest(fs, path) or {}
    return WEIGHTS_FILE in sizes and STATE_FILE not in sizes


def slim_checkpoint(fs, path: str) -> int:
    """Drop the training state (`state.pt`: optimizer, sampler, caches, RNG) of the whole checkpoint `path` on the
    pyarrow filesystem `fs`, keeping its weights and reports: the manifest is rewritten without it first, so a
    crash in between leaves a whole (slim) checkpoint and at worst an unlisted file. Returns the bytes freed (0
    for a checkpoint already slim, one of format 2, whose weights are inside state.pt, or one not whole)."""
    sizes = _manifest(fs, path)
    if sizes is None or STATE_FILE not in sizes or WEIGHTS_FILE not in sizes or not _has_sizes(fs, path, sizes):
        return 0
    kept = {name: size for name, size in sizes.items() if name != STATE_FILE}
    with fs.open_output_stream(f"{path}/{MANIFEST_FILE}") as f:
        f.write(json.dumps(kept, sort_keys=True).encode())
    fs.delete_file(f"{path}/{STATE_FILE}")
    return int(sizes[STATE_FILE])


def _older(path: Path, why: str) -> UserError:
    formats = ", ".join(map(str, READABLE_FORMATS))
    return UserError(f"the checkpoint {path} was written by an older raysdpb ({why}); this version reads checkpoint "
                     f"formats {formats} only: start the trial again (a new --output-dir, or a new sweep.name), or "
                     "resume it with the raysdpb version that wrote it")


def load_state(path: Path) -> dict:
    """The state a checkpoint folder holds, its weights under "model"; a `UserError` for one written in another
    format, or slimmed to its weights (a finished trial's: it cannot be resumed)."""
    path = Path(path)
    if not (path / STATE_FILE).exists() and (path / WEIGHTS_FILE).exists():
        raise UserError(f"the checkpoint {path} holds only the weights of a finished trial (the sweep dropped its "
                        "training state, sweep.keep_weights): it can be exported (python -m raysdpb.export), not "
                        "resumed; start the trial again to train it further")
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as err:  # it pickled classes this version no longer has
        raise _older(path, f"it refers to {err}") from None
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        found = state.get("format", 1) if isinstance(state, dict) else "unknown"
        raise _older(path, f"format {found}")
    if state["format"] >= 3 and (path / WEIGHTS_FILE).exists():
        from safetensors.torch import load_file

        state["model"] = load_file(str(path / WEIGHTS_FILE))
    return state


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The trainable weights of a checkpoint folder, whole or slimmed, local or at a URI (`s3://...`): only its
    weights file is read (a checkpoint of format 2, whose weights are inside state.pt, is loaded whole, from a
    local copy where it is remote)."""
    import tempfile

    import pyarrow.fs as pafs
    from safetensors.torch import load as load_bytes
    from safetensors.torch import load_file

    from raysdpb.results.storage import download, filesystem

    fs, base = filesystem(str(path))
    if fs.get_file_info(f"{base}/{WEIGHTS_FILE}").type == pafs.FileType.File:
        if isinstance(fs, pafs.LocalFileSystem):
            return load_file(f"{base}/{WEIGHTS_FILE}")
        with fs.open_input_stream(f"{base}/{WEIGHTS_FILE}") as f:
            return load_bytes(f.read())
    if isinstance(fs, pafs.LocalFileSystem):
        return load_state(Path(base))["model"]
    with tempfile.TemporaryDirectory(prefix="raysdpb-weights-") as local:
        return load_state(Path(download(str(path), local)))["model"]


# --- the pieces of a state ----------------------------------------------------------------------------------

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


def load_trainable_state(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    unknown = [k for k in weights if k not in params]
    missing = [k for k, p in params.items() if p.requires_grad and k not in weights]
    if unknown or missing:
        raise RuntimeError(f"checkpoint does not match the model: unknown {unknown[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


# what makes a trial what it is: a checkpoint resumes only into a trial with the same values (the rest, such as
# where the data lives, evaluation, logging, precision and device, may change between attempts)
RESUME_MUST_MATCH = ("task", "model", "gguf_file", "custom_task", "train_split", "heldout_dev", "max_train_samples",
                     "num_layers", "lora", "method", "alpha", "tau", "tau_min_scale", "tau_max_scale", "tau_relative",
                     "lr", "weight_decay", "warmup_ratio", "max_grad_norm", "epochs", "batch_size", "max_length",
                     "seed", "data_seed")


# keys of the blocks above that only say what is evaluated: they may change between attempts too
RESUME_MAY_DIFFER_IN_BLOCKS = {"heldout_dev": ("evaluate",)}


def _trained_values(config: dict) -> dict:
    """`RESUME_MUST_MATCH`'s values of a trial config dump as this version reads it: a key added to the config (or
    to a block of it) since the dump was written takes its default, as the trial that wrote it behaved; the keys of
    `RESUME_MAY_DIFFER_IN_BLOCKS` left out. A dump this version cannot read is compared as it is."""
    from raysdpb.config import TrialConfig

    try:
        config = TrialConfig.model_validate(config).model_dump()
    except Exception:  # noqa: BLE001 - a retired key, a value no longer allowed: compared as written
        pass
    values = {key: config[key] for key in RESUME_MUST_MATCH if key in config}
    for block, keys in RESUME_MAY_DIFFER_IN_BLOCKS.items():
        if isinstance(values.get(block), dict):
            values[block] = {k: v for k, v in values[block].items() if k not in keys}
    return values


def check_resume_config(saved: dict, current: dict, checkpoint) -> None:
    """Raise a `UserError` naming every key where the trial config `current` (a dump) differs from `saved`, the one
    that wrote the checkpoint: resuming a dynsdpb checkpoint as finetune, or with another batch size, would
    silently skip or repeat data. Keys added since the checkpoint was written compare at their defaults (a v2
    sweep's checkpoints, written before `heldout_dev.evaluate`, were refused after it came)."""
    saved, current = _trained_values(saved), _trained_values(current)
    differ = [f"{key}={current.get(key)!r} (the checkpoint's: {saved[key]!r})" for key in RESUME_MUST_MATCH
              if key in saved and saved[key] != current.get(key)]
    if differ:
        raise UserError(f"the checkpoint {checkpoint} was written by another trial: {', '.join(differ)}; resume with "
                        "the checkpoint's values, or start a new run in another output folder")
