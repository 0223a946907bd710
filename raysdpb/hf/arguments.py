"""The method's settings as `TrainingArguments` fields: `SelfDistillationArguments`.

They live on the training arguments, as `Seq2SeqTrainingArguments`' do, so that everything that handles a
Trainer's arguments handles them too: `HfArgumentParser` makes them command-line flags (`--method dynsdpb
--alpha 0.5`), `trainer.hyperparameter_search` sets them per trial from its `hp_space`, and they are saved with
the checkpoints (`training_args.bin`). Their defaults and bounds are `raysdpb.config.TrialConfig`'s, so a
setting means here what it means in a sweep file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pydantic import ConfigDict, ValidationError, create_model
from transformers import TrainingArguments

from raysdpb.config import TrialConfig
from raysdpb.errors import UserError
from raysdpb.methods import METHODS, Method, MethodParams, get_method

__all__ = ["SelfDistillationArguments", "METHOD_SETTINGS", "method_settings", "with_method_settings"]

# the sources of soft targets that are the recipe's state, which a Trainer does not keep (PS-KD's memory, KD's table)
TRAINER_REFUSES = {"previous_epoch": "a memory of every example's prediction across epochs",
                   "teacher": "a teacher model's logits, cached on disk by the recipe"}

# the MethodParams fields, in its order, plus the method's name
METHOD_SETTINGS = ("method", *(f.name for f in dataclasses.fields(MethodParams)))

# TrialConfig's own fields (type, default, bounds) for the settings, so that both check them the same way
_Settings = create_model("MethodSettings", __config__=ConfigDict(extra="forbid", strict=False),
                         **{k: (TrialConfig.model_fields[k].annotation, TrialConfig.model_fields[k])
                            for k in METHOD_SETTINGS if k != "method"})


def _default(name: str):
    return TrialConfig.model_fields[name].default


@dataclass
class SelfDistillationArguments(TrainingArguments):
    """`TrainingArguments` plus the self-distillation method and its hyperparameters (docs/method.md).

    `method` is a registered method (`raysdpb.methods.METHODS`: finetune, double_finetune, sequential_dlb,
    random_dlb, dynamic_finetune, dynsdpb and its ablations, r_drop; not ps_kd or kd, whose memory or teacher table
    is the recipe's state); a method ignores the hyperparameters it does not use."""

    method: str = field(default=_default("method"), metadata={"help": f"one of: {', '.join(METHODS)}"})
    alpha: float = field(default=_default("alpha"), metadata={"help": "weight of the distillation term (>= 0)"})
    tau: float = field(default=_default("tau"), metadata={"help": "temperature of the soft targets (> 0)"})
    tau_min_scale: float = field(default=_default("tau_min_scale"),
                                 metadata={"help": "DynSDPB: lower clamp of tau_i / tau"})
    tau_max_scale: float = field(default=_default("tau_max_scale"),
                                 metadata={"help": "DynSDPB: upper clamp of tau_i / tau"})
    tau_relative: bool = field(default=_default("tau_relative"),
                               metadata={"help": "DynSDPB: scale tau_i by the teacher's loss relative to the batch's"})

    def __post_init__(self):
        super().__post_init__()
        method_settings(self)


def method_settings(args) -> tuple[Method, MethodParams]:
    """The registered method and its `MethodParams` from `args`' settings; one `UserError` naming the setting
    when one is wrong. Checked again when training starts, because a hyperparameter search sets them after the
    arguments were built."""
    method = get_method(args.method)
    if method.soft_targets in TRAINER_REFUSES:
        raise UserError(f"method {method.name!r} needs {TRAINER_REFUSES[method.soft_targets]}, which "
                        "SelfDistillationTrainer does not keep; train it with raysdpb's own recipe "
                        "(python -m raysdpb.train, or a sweep)")
    try:
        values = _Settings.model_validate({k: getattr(args, k) for k in METHOD_SETTINGS if k != "method"})
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{key}={first.get('input')!r}: {first['msg']}") from None
    params = MethodParams(**values.model_dump())
    if params.tau_min_scale > params.tau_max_scale:
        raise UserError(f"tau_min_scale={params.tau_min_scale} exceeds tau_max_scale={params.tau_max_scale}")
    if method.loader == "overlap" and args.per_device_train_batch_size % 2:
        raise UserError(f"{method.name} needs an even per_device_train_batch_size (each batch's first half repeats "
                        f"the previous batch's second half); got {args.per_device_train_batch_size}")
    return method, params


def with_method_settings(args: TrainingArguments | None, settings: dict) -> SelfDistillationArguments:
    """`args` as `SelfDistillationArguments` with `settings` (the method keywords given to the trainer) applied:
    a plain `TrainingArguments` is copied field by field, `None` is the Trainer's default (`tmp_trainer`)."""
    if isinstance(args, SelfDistillationArguments):
        return dataclasses.replace(args, **settings) if settings else args
    if args is None:
        return SelfDistillationArguments(output_dir="tmp_trainer", **settings)
    if type(args) is not TrainingArguments:
        raise UserError(f"args is a {type(args).__name__}, which SelfDistillationTrainer cannot extend with the "
                        "method's settings; give a TrainingArguments or SelfDistillationArguments (or subclass "
                        "SelfDistillationArguments)")
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    return SelfDistillationArguments(**fields, **settings)
