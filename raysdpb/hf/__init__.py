"""DynSDPB (and every method of `raysdpb.methods`) from an ordinary Hugging Face `Trainer` script.

    from raysdpb.hf import SelfDistillationTrainer
    trainer = SelfDistillationTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=dev,
                                      data_collator=collator, method="dynsdpb", alpha=0.5, tau=2.0)

* `arguments.py`: `SelfDistillationArguments`, `TrainingArguments` with the method and its hyperparameters;
* `batches.py`: raysdpb's batch sampler (this rank's overlapping stream) as the Trainer iterates it;
* `trainer.py`: `SelfDistillationTrainer`, the method's loss and soft-target cache in the Trainer's loop.

transformers' Trainer runs on `accelerate` (`pip install 'raysdpb[hf]'`); without it, importing this package is
one `UserError` saying so.
"""

from raysdpb.errors import UserError

try:
    import accelerate  # noqa: F401
except ImportError:
    raise UserError("raysdpb.hf needs accelerate, which the Hugging Face Trainer runs on: "
                    "pip install 'raysdpb[hf]' (or pip install 'accelerate>=1.0')") from None

from raysdpb.hf.arguments import SelfDistillationArguments  # noqa: E402
from raysdpb.hf.trainer import SelfDistillationTrainer  # noqa: E402

__all__ = ["SelfDistillationArguments", "SelfDistillationTrainer"]
