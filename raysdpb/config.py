"""Configuration as data: one YAML file, validated once at the edge with pydantic.

A config file holds one *trial* (the keys of `TrialConfig`, flat), an optional `search:` block (trial keys
mapped to lists of values, the grid a sweep runs, or to distributions a searcher samples: `{loguniform: [a, b]}`,
`Distribution`) and an optional `sweep:` block (how `raysdpb.sweep` runs the search on Ray). Any key can be
overridden on the command line as `key=value` (nested keys with dots, `lora.r=16`, `sweep.asha.grace_period=2`);
values are parsed as YAML (`lr=3e-5`, `search.seed=[0,1,2]`).

`python -m raysdpb.train` runs one trial: a searched key takes its first value unless overridden (a key searched
by a distribution keeps the trial's own value).
Errors name the file, the key and the allowed values, and are raised as `UserError`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raysdpb.errors import UserError

__all__ = [
    "TrialConfig", "LoraConfig", "CustomTaskConfig", "HeldoutDevConfig", "SweepConfig", "AshaConfig",
    "ExperimentConfig", "Distribution", "DISTRIBUTIONS", "SEARCHERS", "MlflowConfig", "WandbConfig", "LOGGERS",
    "TRACKER_KEYS",
    "load_experiment", "load_trial_config", "apply_overrides", "parse_overrides",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(_Strict):
    """LoRA adapter settings for decoder-only models (peft)."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"])


class CustomTaskConfig(_Strict):
    """A task from the user's own files: one file per split (CSV, TSV, JSONL, JSON or Parquet)."""

    files: dict[str, str] = Field(..., description="split name -> file path, e.g. {train: a.csv, validation: b.csv}")
    text_fields: list[str] = Field(..., min_length=1, max_length=2)
    label_field: str
    labels: list[str] | None = Field(None, description="the label set in class-id order; default: sorted values")
    metric: Literal["accuracy", "f1", "macro_f1", "matthews"] = "accuracy"
    format: Literal["csv", "tsv", "jsonl", "json", "parquet"] | None = None

    @field_validator("files")
    @classmethod
    def _needs_train(cls, files: dict[str, str]) -> dict[str, str]:
        if "train" not in files:
            raise ValueError("custom_task.files needs a 'train' entry")
        return files


def evaluated_splits(heldout_dev: bool, evaluate: str | None = None) -> str:
    """What a trial evaluates: "both" (its held-out dev split, then the task's validation split(s)), "dev" (the dev
    split alone) or "validation" (the validation split(s) alone; also a trial that holds no dev split out), from
    whether it holds a dev split out and its `heldout_dev.evaluate` (unset in results written before that key:
    "both"). The one place this is decided: the trial's evaluation, its sweep's metrics and the report's follow it."""
    if not heldout_dev:
        return "validation"
    return evaluate or "both"


class HeldoutDevConfig(_Strict):
    """A dev split held out from the training split, for model selection (raysdpb.tasks.heldout). It is carved
    from the whole training split before `max_train_samples` takes the first examples of the rest, so the dev
    set does not change with the training subset; the trial reports it as `eval_dev_<metric>` besides the
    task's validation split(s)."""

    size: int | float = Field(..., description="examples held out (an int), or a fraction in (0, 1) of the "
                                               "training split")
    seed: int = Field(0, ge=0, lt=2**32, description="which examples: its own seed, apart from the trial's")
    stratify: bool = Field(True, description="each class's share as in the training split (to within one "
                                             "example); ignored for generation tasks")
    evaluate: Literal["both", "dev", "validation"] = Field(
        "both", description="what the trial evaluates: the dev split and the task's validation split(s) (both); "
                            "the dev split alone (dev: a selection sweep that never looks at the validation set, "
                            "and spends no time on it); or the validation split(s) alone (validation: the dev "
                            "examples are still held out of training)")

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, value):
        if isinstance(value, bool):
            raise ValueError("must be a number of examples (an int) or a fraction in (0, 1)")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"{value} examples: hold out at least 1")
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError(f"{value:g}: a fraction must be in (0, 1); a number of examples is an int")
        return value


# where a run's metrics go: TensorBoard always (the report reads its events), MLflow and Weights & Biases on request
LOGGERS = ("tensorboard", "mlflow", "wandb")


class MlflowConfig(_Strict):
    """An MLflow tracking server or store (raysdpb.trackers)."""

    tracking_uri: str | None = Field(None, description="default $MLFLOW_TRACKING_URI, else MLflow's own default "
                                                       "(MLflow 3: mlflow.db in the working folder)")
    experiment_name: str | None = Field(None, description="default: the sweep's name (python -m raysdpb.train: "
                                                          "'raysdpb')")


class WandbConfig(_Strict):
    """A Weights & Biases project (raysdpb.trackers)."""

    project: str | None = Field(None, description="default: the sweep's name (python -m raysdpb.train: 'raysdpb')")
    entity: str | None = Field(None, description="default: the account's default entity")
    group: str | None = Field(None, description="default: the sweep's name (python -m raysdpb.train: none)")
    mode: Literal["online", "offline", "disabled"] | None = Field(None, description="default $WANDB_MODE, "
                                                                                    "else online")


def _loggers(names: list[str]) -> list[str]:
    """The loggers asked for, known ones only, TensorBoard first and always (the report reads its events)."""
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ValueError(f"unknown logger(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(LOGGERS)}")
    return list(dict.fromkeys(["tensorboard", *names]))


class _TrackerSettings(_Strict):
    """Where metrics go besides TensorBoard: `loggers` and each tracker's settings (a trial's in local mode, the
    sweep's for its trials)."""

    loggers: list[str] = Field(default_factory=lambda: ["tensorboard"],
                               description="where metrics go: tensorboard (always), mlflow, wandb")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @field_validator("loggers")
    @classmethod
    def _known_loggers(cls, names: list[str]) -> list[str]:
        return _loggers(names)


class TrialConfig(_TrackerSettings):
    """Everything one trial needs. Keys are flat so that they read the same in YAML, on the command line
    and as Parquet columns."""

    # what to train
    task: str = Field(..., description="a registered task (e.g. superglue/cb) or 'custom' with custom_task")
    model: str = Field(..., description="an offline alias (minilm-l6, smollm2-135m), a hub id or a local folder")
    method: str = "dynsdpb"
    data_dir: str | None = Field(None, description="local mirror of the datasets; default $RAYSDPB_DATA_DIR or the hub")
    custom_task: CustomTaskConfig | None = None
    train_split: str | None = None
    eval_split: str | None = None
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    heldout_dev: HeldoutDevConfig | None = Field(None, description="a dev split held out from the training split "
                                                                   "(reported as eval_dev_<metric>)")
    num_layers: int | None = Field(None, ge=1, description="keep the embeddings and the first k layers")
    lora: LoraConfig | None = None
    gguf_file: str | None = Field(None, description="the GGUF file inside a model folder or hub repo "
                                                      "(not with an alias)")

    # the method's hyperparameters
    alpha: float = Field(1.0, ge=0)
    tau: float = Field(1.0, gt=0)
    tau_min_scale: float = Field(0.5, gt=0)
    tau_max_scale: float = Field(2.0, gt=0)
    tau_relative: bool = True
    teacher_model: str | None = Field(None, description="kd: the folder of a fine-tuned classification model of the "
                                                        "task (as python -m raysdpb.export writes); other methods "
                                                        "ignore it")

    # optimisation
    lr: float = Field(2e-5, gt=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    epochs: int = Field(3, ge=1, description="times the method's epoch multiplier (double_finetune: 2x)")
    batch_size: int = Field(8, ge=1)
    eval_batch_size: int = Field(32, ge=1)
    max_length: int = Field(128, ge=8)
    seed: int = Field(0, ge=0, lt=2**32, description="seeds torch, numpy and Python: the model's initialisation "
                                                     "(a new head), dropout, and the data order unless data_seed")
    data_seed: int | None = Field(None, ge=0, lt=2**32, description="seeds the data order alone (the batch "
                                                                    "sampler's shuffles, the loader's generator); "
                                                                    "default: seed")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_nonfinite_steps: int = Field(5, ge=1, description="consecutive non-finite losses before the trial stops "
                                                           "as diverged")
    gradient_checkpointing: bool = Field(False, description="recompute each layer's activations in the backward "
                                                            "pass: less activation memory, about one more forward "
                                                            "of compute per step; the same gradients")

    compile_loss: bool = Field(False, description="torch.compile the method's loss (its extra terms, not the model): "
                                                  "fewer kernel launches on a GPU, where a small model's step is "
                                                  "launch-bound; the same numbers; compiles once per trial")

    # decoder-only evaluation
    max_new_tokens: int = Field(256, ge=1)
    choice_scoring: Literal["generate", "loglikelihood"] = "generate"

    # evaluation, logging, checkpoints
    eval_every_steps: int | None = Field(None, ge=1)
    eval_every: float | None = Field(None, gt=0, description="evaluate and report every this fraction of an epoch "
                                                             "of the training set's N examples, in samples seen: at "
                                                             "the first step past every, 2 x every, ... x N, the same "
                                                             "points for every method (an overlap epoch forwards "
                                                             "about 2N samples: it reports twice as often per epoch)")
    eval_before_training: bool = Field(False, description="evaluate the model as loaded, before any step; reported "
                                                          "as initial_eval_<metric> with every later report")
    save_predictions: bool = Field(False, description="classification: every evaluation writes each example's idx, "
                                                      "predicted class and label as Parquet, "
                                                      "predictions/<prefix or eval>_step<8 digits>.parquet under "
                                                      "the output folder (a sweep: the trial's artifacts)")
    log_every_steps: int = Field(10, ge=1)
    grad_norm_every_steps: int = Field(50, ge=1)
    checkpoint_every_steps: int | None = Field(None, ge=1)
    background_checkpoints: bool = Field(True, description="a single-process trial writes its checkpoints in a "
                                                           "thread while training goes on (a copy of the state in "
                                                           "host memory meanwhile); each report goes out once its "
                                                           "checkpoint is whole. false: training waits for the write")
    output_dir: str | None = Field(None, description="local mode: TensorBoard events and checkpoints; "
                                                       "default runs/<name>")
    progress_bar: bool = True
    # (loggers, mlflow, wandb: local mode, python -m raysdpb.train; a sweep logs through sweep.loggers, ...)

    @model_validator(mode="after")
    def _check(self) -> "TrialConfig":
        if self.tau_min_scale > self.tau_max_scale:
            raise ValueError("tau_min_scale must not exceed tau_max_scale")
        if self.task == "custom" and self.custom_task is None:
            raise ValueError("task 'custom' needs a custom_task block (files, text_fields, label_field)")
        if self.custom_task is not None and self.task != "custom":
            raise ValueError("custom_task is given, so task must be 'custom'")
        if self.eval_every is not None and self.eval_every_steps is not None:
            raise ValueError("eval_every (a fraction of an epoch, in samples seen) and eval_every_steps: set one")
        from raysdpb.methods import METHODS
        from raysdpb.tasks import TASKS

        method = METHODS[self.method]
        if method.loader == "overlap" and self.batch_size % 2:
            raise ValueError(f"{self.method} needs an even batch_size (each batch's first half repeats the previous "
                             f"batch's second half); got batch_size={self.batch_size}")
        if method.soft_targets == "teacher" and not self.teacher_model:
            raise ValueError(f"{self.method} distils a teacher: give teacher_model, the folder of a model fine-tuned "
                             "on the task (python -m raysdpb.export writes one from a finetune trial)")
        if method.alpha_at_most is not None and self.alpha > method.alpha_at_most:
            raise ValueError(f"{self.method}: alpha mixes its two targets, so it must lie in [0, "
                             f"{method.alpha_at_most:g}]; got alpha={self.alpha:g}")
        kind = TASKS[self.task].kind if self.task in TASKS else "classification"  # a custom task classifies
        if kind not in method.kinds:
            fit = ", ".join(name for name, m in METHODS.items() if kind in m.kinds)
            raise ValueError(f"method {self.method} is defined for classifiers only (its targets are class "
                             f"distributions), and {self.task} is a {kind} task; choose one of: {fit}")
        return self

    @field_validator("method")
    @classmethod
    def _known_method(cls, name: str) -> str:
        from raysdpb.methods import METHODS

        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
        return name

    @field_validator("task")
    @classmethod
    def _known_task(cls, name: str) -> str:
        from raysdpb.tasks import TASKS

        if name != "custom" and name not in TASKS:
            raise ValueError(f"unknown task {name!r}; allowed: {', '.join(sorted(TASKS))}, custom")
        return name

    @property
    def data_order_seed(self) -> int:
        """The seed of the order the training examples come in: `data_seed`, else `seed` (as before there was a
        `data_seed`, so a trial without one trains as it did and keeps its id)."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def evaluates(self) -> str:
        """What this trial evaluates: "both", "dev" or "validation" (`evaluated_splits`)."""
        return evaluated_splits(self.heldout_dev is not None, self.heldout_dev and self.heldout_dev.evaluate)

    def run_name(self) -> str:
        return f"{self.task.replace('/', '-')}_{Path(self.model).name}_{self.method}_seed{self.seed}"


# trial keys that do not change what is trained: where things lie, how progress shows, what memory it takes
# (left out of the trial id, raysdpb.sweep.grid, and of a report's configuration columns, raysdpb.report.tables)
NOT_HASHED = frozenset({"data_dir", "output_dir", "progress_bar", "gradient_checkpointing", "compile_loss", "loggers",
                        "mlflow", "wandb", "save_predictions", "background_checkpoints"})
# keys added to a block (`heldout_dev:`, `lora:`, `custom_task:`) after it shipped: hashed only where set away from
# their default, so a sweep started before the key existed keeps its trial ids and its --resume (a new top-level key
# needs nothing here: top-level defaults are never hashed). Add a block's new key here.
HASHED_WHEN_SET = frozenset({"heldout_dev.evaluate"})
# the trial keys that say where a local run's metrics go (a sweep's are in its `sweep:` block)
TRACKER_KEYS = frozenset({"loggers", "mlflow", "wandb"})


# ASHA's default groups: one method on one task with one model of one depth (see raysdpb/sweep/scheduler.py)
ASHA_GROUP_BY = ("task", "model", "num_layers", "method")


# the units ASHA can measure a trial's time in: `epoch` (the method's own epochs: double_finetune runs 2E of them,
# an overlap epoch forwards each sample twice), `samples_seen` (training examples forwarded over all ranks: the one
# axis on which every method's compute compares), `training_iteration` (Tune's count of reports). The first two
# stay right when a trial resumes from a checkpoint (Tune's training_iteration restarts there).


class AshaConfig(_Strict):
    metric: str | None = Field(None, description="default: the task's main metric, eval_<metric>")
    mode: Literal["max", "min"] = "max"
    grace_period: float = Field(1, gt=0, description="the first rung, in time_attr units (0.5: half an epoch)")
    max_t: float | None = Field(None, gt=0, description="default (time_attr epoch): the largest number of epochs "
                                                        "a trial runs")
    reduction_factor: float = Field(2.0, gt=1)
    time_attr: Literal["training_iteration", "epoch", "samples_seen"] = "epoch"
    group_by: list[str] = Field(default_factory=lambda: list(ASHA_GROUP_BY),
                                description="trial keys whose values make a group: ASHA compares trials only within "
                                            "a group ([] for one ASHA over the whole grid)")

    @model_validator(mode="after")
    def _samples_seen_needs_its_scale(self) -> "AshaConfig":
        # a number of samples means nothing without the training set's size, which only the trial knows
        if self.time_attr == "samples_seen" and (self.max_t is None or "grace_period" not in self.model_fields_set):
            raise ValueError("time_attr samples_seen: set grace_period and max_t in training examples forwarded "
                             "(over all ranks): E epochs on N examples are E x N for finetune and dynamic_finetune, "
                             "about 2 x E x N for double_finetune and the overlap methods")
        return self

    @field_validator("group_by")
    @classmethod
    def _known_keys(cls, keys: list[str]) -> list[str]:
        unknown = [k for k in keys if k not in TrialConfig.model_fields]
        if unknown:
            raise ValueError(f"unknown trial key(s) {', '.join(map(repr, unknown))}; "
                             f"allowed: {', '.join(TrialConfig.model_fields)}")
        return keys


class SweepConfig(_TrackerSettings):
    """How `python -m raysdpb.sweep` runs the grid."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="experiment name (deterministic, no timestamp)")
    storage_path: str = "./ray_results"
    address: str | None = Field(None, description="'auto' or a Ray address; default $RAY_ADDRESS, else a local Ray")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks) per trial")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    max_concurrent_trials: int | None = Field(None, ge=1)
    max_failures: int = Field(1, ge=0)
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints a running (or errored) trial keeps to resume from")
    keep_weights: int | Literal["all", "none"] = Field(
        1, description="once trials finish, the best k of each task, model and method keep their best "
                       "checkpoint's weights (no optimizer state) for `python -m raysdpb.export`; 'all', or "
                       "'none' (0)")
    asha: AshaConfig | None = Field(default_factory=AshaConfig)
    report_every_steps: int | None = Field(None, ge=1, description="also report (for ASHA) every N steps")
    search: Literal["grid", "random", "optuna", "bohb"] = Field(
        "grid", description="grid: every point of the search block; random: num_samples draws (Ray Tune's variant "
                            "generator); optuna: Optuna's TPE (OptunaSearch); bohb: TuneBOHB with HyperBandForBOHB "
                            "as the scheduler instead of ASHA")
    num_samples: int | None = Field(None, ge=1, description="trials a searcher runs (random, optuna, bohb)")
    seed: int = Field(0, ge=0, lt=2**32, description="seeds the searcher: the same config and seed draw the same "
                                                     "configurations")
    report_every: float | None = Field(None, gt=0, description="also report (for ASHA) every this fraction of an "
                                                               "epoch, in samples seen (the trials' eval_every): "
                                                               "every method at the same points")
    warm_trials: bool = Field(True, description="single-worker trials run in Tune's own trial actor, reused from "
                                                "trial to trial (no Ray Train worker group to start); false: every "
                                                "trial is a Ray Train run, as multi-worker trials always are")

    @model_validator(mode="after")
    def _one_report_cadence(self) -> "SweepConfig":
        if self.report_every is not None and self.report_every_steps is not None:
            raise ValueError("report_every (a fraction of an epoch, in samples seen) and report_every_steps: set one")
        return self

    @field_validator("keep_weights")
    @classmethod
    def _keep_weights(cls, value):
        if isinstance(value, int) and value < 0:
            raise ValueError("must be a number of trials (0 or more), 'all' or 'none'")
        return value


# the distributions a `search:` entry may be, as `{name: [low, high]}`; a list stays a choice
DISTRIBUTIONS = ("uniform", "loguniform", "randint")
# `sweep.search`: the grid, and the searchers that sample (they need `sweep.num_samples`)
SEARCHERS = ("random", "optuna", "bohb")


class Distribution(_Strict):
    """A searched key's distribution: `uniform` and `loguniform` draw floats in [low, high) (loguniform: uniform in
    log space, low > 0); `randint` draws integers from low to high, **both included** (`{randint: [1, 3]}` gives 1,
    2 or 3; Ray Tune's own `randint` excludes its upper bound, raysdpb passes it high + 1)."""

    kind: Literal["uniform", "loguniform", "randint"]
    low: float
    high: float

    @classmethod
    def parse(cls, key: str, spec: dict) -> "Distribution":
        """`{loguniform: [1e-5, 1e-4]}` as a Distribution; `ValueError` naming `search.<key>` otherwise."""
        if len(spec) != 1:
            raise ValueError(f"search.{key}: a distribution is one of {', '.join(DISTRIBUTIONS)} with its bounds, "
                             f"e.g. {{loguniform: [1.0e-5, 1.0e-4]}}; got {spec!r}")
        (kind, bounds), = spec.items()
        if kind not in DISTRIBUTIONS:
            raise ValueError(f"search.{key}: unknown distribution {kind!r}; allowed: {', '.join(DISTRIBUTIONS)} "
                             "(or a list of values)")
        if (not isinstance(bounds, list) or len(bounds) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)):
            raise ValueError(f"search.{key}: {kind} takes two numbers [low, high]; got {bounds!r}")
        low, high = bounds
        if kind == "randint" and not all(float(b).is_integer() for b in bounds):
            raise ValueError(f"search.{key}: randint takes two integers [low, high] (both included); got {bounds!r}")
        if not low < high:
            raise ValueError(f"search.{key}: {kind} needs low < high; got [{low}, {high}]")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"search.{key}: loguniform needs low > 0 (it draws in log space); got [{low}, {high}]")
        return cls(kind=kind, low=low, high=high)

    def bounds(self) -> tuple:
        """The lowest and highest value it draws (randint's as integers)."""
        if self.kind == "randint":
            return int(self.low), int(self.high)
        return self.low, self.high

    def describe(self) -> str:
        low, high = self.bounds()
        return f"{self.kind}({low:g}, {high:g}{', both included' if self.kind == 'randint' else ''})"


def _integer_field(key: str) -> bool:
    annotation = TrialConfig.model_fields[key].annotation
    return annotation is int or set(getattr(annotation, "__args__", ())) == {int, type(None)}


class ExperimentConfig(_Strict):
    """A whole config file: the base trial, the search block (lists: the grid or choices; distributions: what a
    searcher samples) and the sweep settings."""

    trial: TrialConfig
    search: dict[str, list[Any] | Distribution] = Field(default_factory=dict)
    sweep: SweepConfig | None = None

    @field_validator("search", mode="before")
    @classmethod
    def _distributions(cls, search: Any) -> Any:
        if not isinstance(search, dict):
            return search
        for key, spec in search.items():
            if not isinstance(spec, (list, dict, Distribution)):
                raise ValueError(f"search.{key}: Input should be a valid list of values, or a distribution "
                                 f"({{uniform|loguniform|randint: [low, high]}}); got {spec!r}")
        return {key: Distribution.parse(key, spec) if isinstance(spec, dict) else spec for key, spec in search.items()}

    @model_validator(mode="after")
    def _check_search(self) -> "ExperimentConfig":
        for key, values in self.search.items():
            if key not in TrialConfig.model_fields:
                raise ValueError(f"search.{key}: not a trial key; allowed: {', '.join(TrialConfig.model_fields)}")
            if isinstance(values, Distribution):
                if values.kind != "randint" and _integer_field(key):
                    raise ValueError(f"search.{key}: {key} is an integer, and {values.kind} draws floats; use "
                                     f"{{randint: [{values.low:g}, {values.high:g}]}}")
                values = list(values.bounds())  # both ends must make a valid trial
            elif not isinstance(values, list) or not values:
                raise ValueError(f"search.{key}: must be a non-empty list of values, or a distribution "
                                 "({uniform|loguniform|randint: [low, high]})")
            for value in values:  # each value must make a valid trial
                try:
                    TrialConfig.model_validate({**self.trial.model_dump(), key: value})
                except ValidationError as err:
                    raise ValueError(f"search.{key}: value {value!r} is invalid: {_first_error(err)}") from None
        self._check_searcher()
        return self

    def _check_searcher(self) -> None:
        sweep = self.sweep
        if sweep is None:
            return
        sampled = [k for k, v in self.search.items() if isinstance(v, Distribution)]
        if sweep.search == "grid":
            if sampled:
                raise ValueError(f"search.{sampled[0]}: a distribution needs a searcher that samples (sweep.search: "
                                 f"{', '.join(SEARCHERS)}, with sweep.num_samples); the grid takes lists of values")
            if sweep.num_samples is not None:
                raise ValueError("sweep.num_samples: only with sweep.search: random, optuna or bohb (the grid runs "
                                 "each point once; repeat it with search.seed: [0, 1, 2])")
            return
        if sweep.num_samples is None:
            raise ValueError(f"sweep.num_samples: sweep.search: {sweep.search} needs the number of trials to sample")
        if not self.search:
            raise ValueError(f"sweep.search: {sweep.search} samples the search block, which is empty")
        if sweep.search in ("optuna", "bohb") and "task" in self.search:
            raise ValueError(f"search.task: sweep.search: {sweep.search} optimises one objective; search one task "
                             "per sweep (tasks' scores are not comparable)")
        if sweep.search == "bohb":
            if sweep.asha is None:
                raise ValueError("sweep.asha: sweep.search: bohb runs its own HyperBand (HyperBandForBOHB) over "
                                 "sweep.asha's time_attr, max_t and reduction_factor; remove asha: null")
            grouped = [k for k in sweep.asha.group_by if k in self.search]
            if grouped:
                raise ValueError(f"search.{grouped[0]}: sweep.search: bohb runs one HyperBand over every trial (no "
                                 f"groups); search one {', '.join(sweep.asha.group_by)} at a time "
                                 "(sweep.asha.group_by)")

    def first_point(self) -> TrialConfig:
        """The trial that takes every searched key's first value (a key searched by a distribution keeps the
        trial's own value)."""
        first = {k: v[0] for k, v in self.search.items() if isinstance(v, list)}
        return TrialConfig.model_validate({**self.trial.model_dump(), **first})


# --- loading and overrides ---------------------------------------------------------------------------------

def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["lr=3e-5", "lora.r=16"]` -> `{"lr": 3e-5, "lora.r": 16}` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value (for example lr=3e-5 or method=dynsdpb)")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """Apply `key=value` overrides to a raw config dict. A bare trial key is set at the top level and, if it
    was searched, removes the search over it (an override pins the value)."""
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        _set_dotted(raw, key, value)
        top = key.split(".")[0]
        if top not in ("search", "sweep") and isinstance(raw.get("search"), dict):
            raw["search"].pop(top, None)
    return raw


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found; pass the path of a YAML config (see sweeps/quickstart.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err}); a config is a YAML text file") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys to values")
    return raw


def load_experiment(path: str | Path | None, overrides: list[str] | None = None, *,
                    raw: dict | None = None) -> ExperimentConfig:
    """Read, override and validate a config file (or a `raw` dict). Raises `UserError` naming the bad key."""
    source = str(path) if path is not None else "<config>"
    data = _read_yaml(path) if raw is None else copy.deepcopy(raw)
    data = apply_overrides(data, parse_overrides(overrides or []))
    _absolute_paths(data)
    search = data.pop("search", None) or {}
    sweep = data.pop("sweep", None)
    try:
        return ExperimentConfig.model_validate({"trial": data, "search": search, "sweep": sweep})
    except ValidationError as err:
        e = err.errors()[0]
        loc = [str(p) for p in e["loc"]]
        if loc and loc[0] == "trial":
            loc = loc[1:]
        key = ".".join(loc)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown key; allowed keys: {', '.join(_allowed_keys(loc))}"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif len(loc) <= 1 and msg.startswith(("search.", "sweep.")):
            raise UserError(f"{source}: {msg}") from None  # the message names its key
        raise UserError(f"{source}: {key or 'config'}: {msg}") from None


def absolute_path(path: Any, key: str) -> Any:
    """A relative local path is relative to where the command runs; made absolute here, because Ray runs
    trials in folders of their own (URIs such as s3://... and non-strings are left as they are)."""
    if not isinstance(path, str) or "://" in path or not path:
        return path
    try:
        return str(Path(path).expanduser().resolve())
    except (ValueError, RuntimeError, OSError) as err:  # a NUL byte, '~nosuchuser/...'
        raise UserError(f"{key}: {path!r} is not a usable path ({err})") from None


def _absolute_paths(data: dict) -> None:
    if "data_dir" in data:
        data["data_dir"] = absolute_path(data["data_dir"], "data_dir")
    if isinstance(data.get("teacher_model"), str) and Path(data["teacher_model"]).expanduser().exists():
        data["teacher_model"] = absolute_path(data["teacher_model"], "teacher_model")  # a local folder
    custom = data.get("custom_task")
    if isinstance(custom, dict) and isinstance(custom.get("files"), dict):
        custom["files"] = {split: absolute_path(f, f"custom_task.files.{split}")
                           for split, f in custom["files"].items()}
    sweep = data.get("sweep")
    if isinstance(sweep, dict) and "storage_path" in sweep:
        sweep["storage_path"] = absolute_path(sweep["storage_path"], "sweep.storage_path")


def _allowed_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = TrialConfig
    top = {"search": None, "sweep": SweepConfig}
    if loc and loc[0] in top:
        model = top[loc[0]] or TrialConfig
        loc = loc[1:]
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        for cand in (LoraConfig, CustomTaskConfig, HeldoutDevConfig, AshaConfig, SweepConfig, MlflowConfig,
                     WandbConfig):
            if annotation is cand or (annotation is not None and cand in getattr(annotation, "__args__", ())):
                model = cand
    shared = list(_TrackerSettings.model_fields)  # inherited, so first in model_fields: listed after the model's own
    keys = [k for k in model.model_fields if k not in shared] + [k for k in shared if k in model.model_fields]
    if model is TrialConfig:
        keys += ["search", "sweep"]
    return keys


def load_trial_config(path: str | Path | None, overrides: list[str] | None = None, *,
                      raw: dict | None = None) -> TrialConfig:
    """The single trial `python -m raysdpb.train` runs: searched keys take their first value."""
    return load_experiment(path, overrides, raw=raw).first_point()
