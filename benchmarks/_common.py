"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# the checkout's raysdpb, installed or not (a script run as `python benchmarks/x.py` has only benchmarks/ on
# its path, and an editable install can point at another checkout)
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

# H100/H200 SXM bf16 dense peak, TFLOP/s (the spec sheet's 1979 is with 2:4 sparsity)
H100_BF16_DENSE_TFLOPS = 989.0


def offline_env() -> None:
    """The environment every benchmark runs in: no hub, no Ray usage stats, the shared data mirror."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.environ.get("RAYSDPB_DATA_DIR"):
        mirror = REPO.parent / "shared" / "data"
        if mirror.is_dir():
            os.environ["RAYSDPB_DATA_DIR"] = str(mirror)


def quiet_libraries() -> None:
    import logging
    import warnings

    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def quantile(xs, q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def machine_info() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    try:
        info["load_average_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def mfu(model, tokens_per_s: float, peak_tflops: float | None) -> float | None:
    """Model FLOP utilisation of a torch `model` training at `tokens_per_s`, counted as the trial rows count it
    (`raysdpb.throughput`: the parameters that multiply, the input embeddings left out; 4N + 2N_trained FLOPs a
    token), over the peak (None without a peak)."""
    from raysdpb.throughput import matmul_parameters, train_flops_per_token
    from raysdpb.throughput import mfu as model_flops_utilisation

    peak = peak_tflops * 1e12 if peak_tflops else None
    return model_flops_utilisation(tokens_per_s, train_flops_per_token(*matmul_parameters(model)), peak)


def default_peak(device: str, given: float | None) -> float | None:
    if given is not None:
        return given if given > 0 else None
    return H100_BF16_DENSE_TFLOPS if device.startswith("cuda") else None


def scored_examples(trial) -> int:
    """The examples a trial's main metric is scored on (one example = 1 / this, for 'within one example'): its
    held-out dev split's size where it evaluates that split, else its first evaluation split's length (at most
    `max_eval_samples`). `trial`: a `raysdpb.config.TrialConfig`."""
    from raysdpb.tasks import data_dir_from, load_examples, resolve_task

    task = resolve_task(trial)
    if trial.evaluates != "validation":
        from raysdpb.tasks.heldout import heldout_size

        size = trial.heldout_dev.size
        if isinstance(size, int):
            return size
        # a fraction of the whole training split (carved before max_train_samples)
        return heldout_size(size, len(load_examples(task, task.training_split(trial.train_split),
                                                    data_dir_from(trial.data_dir))))
    split = task.evaluation_splits(trial.eval_split)[0][0]
    n = len(load_examples(task, split, data_dir_from(trial.data_dir)))
    return min(n, trial.max_eval_samples or n)


SELECT_RULES = ("best", "last")


def selected_value(values: list[float], select: str, mode: str = "max") -> float:
    """A trial's score by a sweep's selection rule, from its reports' values in the order reported: the best of
    them (`best`, the `best_<metric>` column; largest for `mode` max, smallest for min) or the last (`last`, the
    `last_<metric>` column: protocol v2's fixed-budget rule). `values` must not be empty."""
    if select == "last":
        return values[-1]
    return max(values) if mode == "max" else min(values)


def write_json(path: str | None, data: dict) -> None:
    if not path:
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(clean(data), indent=2, default=str, allow_nan=False) + "\n")
    print(f"wrote {p}")


def clean(value):
    """JSON-safe: NaN and infinities become null, tuples lists, keys strings."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def fmt(value, spec: str = ".3f", none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, float) and value != value:  # NaN
        return none
    return format(value, spec)


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table; columns are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([fmt(r.get(k), spec) if not isinstance(r.get(k), str) else r.get(k) for k, _, spec in columns])
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(str(c).rjust(w) if j else str(c).ljust(w) for j, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class Clock:
    """Wall and CPU time of this process (all threads)."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu
