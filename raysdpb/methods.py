"""The methods registry (sections 5 and 8 of docs/method.md) and the per-rank cache of soft targets.

A method is one `Method` entry: which batch sampler it needs, its epoch multiplier, where its soft targets come
from (`soft_targets`: none, the previous batch, the previous epoch's predictions, the other forward pass of the
same batch, a teacher's table), how many forward passes a step takes, and its loss given the batch's model
outputs and those targets. Every loss is composed from the pure functions of `raysdpb.losses` (`lmbc_loss`,
`vmm_loss`, `dynamic_ce_loss`, `uncertainty_weights`, `temperature_from_losses`, ...), so the documented
functions are the ones that train. The training step (`raysdpb.recipe.Recipe.train_step`) is the same for all
of them; `raysdpb.soft_targets` holds each kind of source of targets:

    passes = [forward(batch) for _ in range(method.forward_passes)]
    targets = source.take(indices, device, epoch)       # None where there are none (yet)
    terms = method.step_loss(passes, targets, params)   # LossTerms: total, ce, distill, alpha_i, tau_i
    terms.total.backward()
    source.put(indices, passes[0], params)             # the previous batch's cache, the epoch memory

`outputs` is a `ClassOutputs` (encoders: `(B, C)` logits, distilled with LMBC) or a `TokenOutputs` (decoders:
`(B, T, V)` logits, labels and an answer mask, distilled with VMM); both expose the same per-sample signals,
so every method works for both kinds of model. For decoders the cached soft target is the vocabulary map
(section 4), V floats per sequence, not T x V logits.

Adding a method means adding one `register(Method(...))` entry below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, get_args

import torch

from raysdpb import losses

__all__ = [
    "MethodParams", "ClassOutputs", "TokenOutputs", "TeacherState", "LossTerms", "Method", "SoftTargets",
    "LogitCache", "METHODS", "register", "get_method", "ALL_KINDS", "CLASSIFIER_KINDS", "compiled_loss",
    "COMPILE_BACKEND_ENV",
]


@dataclass(frozen=True)
class MethodParams:
    """The distillation hyperparameters (ignored by methods without distillation or reweighting)."""

    alpha: float = 1.0
    tau: float = 1.0
    tau_min_scale: float = 0.5
    tau_max_scale: float = 2.0
    tau_relative: bool = True  # batch-relative loss scaling of tau (the method sheet's choice)


# --- model outputs, one view per kind of model -------------------------------------------------------------

@dataclass
class ClassOutputs:
    """Classification (or multiple-choice) logits `(B, C)` and labels `(B,)`."""

    logits: torch.Tensor
    labels: torch.Tensor
    _ce: torch.Tensor | None = field(default=None, repr=False)  # per-sample CE, computed once per batch

    def __len__(self) -> int:
        return self.logits.shape[0]

    def slice(self, part: slice) -> "ClassOutputs":
        return ClassOutputs(self.logits[part], self.labels[part], None if self._ce is None else self._ce[part])

    def per_sample_ce(self) -> torch.Tensor:
        if self._ce is None:
            self._ce = losses.per_sample_ce(self.logits, self.labels)
        return self._ce

    def uncertainty(self) -> torch.Tensor:
        return losses.uncertainty_weights(self.logits)

    # LMBC compares the logits themselves; the KL tempers them with each sample's tau
    distill_loss = staticmethod(losses.lmbc_loss)

    def student_target(self, tau: torch.Tensor) -> torch.Tensor:
        """What `distill_loss` compares with the cached soft targets: the logits (keeps the graph)."""
        return self.logits

    def soft_target(self, tau: torch.Tensor) -> torch.Tensor:
        # logits are cached as they are; the KL tempers them with the cached per-sample tau
        return self.logits.detach().float()


@dataclass
class TokenOutputs:
    """Causal-LM logits `(B, T, V)` aligned with `labels` `(B, T)`; `mask` marks the answer positions."""

    logits: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    _ce: torch.Tensor | None = field(default=None, repr=False)  # per-sequence CE, computed once per batch

    def __len__(self) -> int:
        return self.logits.shape[0]

    def slice(self, part: slice) -> "TokenOutputs":
        return TokenOutputs(self.logits[part], self.labels[part], self.mask[part],
                            None if self._ce is None else self._ce[part])

    def per_sample_ce(self) -> torch.Tensor:
        if self._ce is None:
            self._ce = losses.token_ce_per_sequence(self.logits, self.labels, self.mask)
        return self._ce

    def uncertainty(self) -> torch.Tensor:
        return losses.sequence_uncertainty_weights(self.logits, self.mask)

    # VMM compares log vocabulary maps, already tempered at each sample's tau
    distill_loss = staticmethod(losses.vmm_loss)

    def student_target(self, tau: torch.Tensor) -> torch.Tensor:
        """What `distill_loss` compares with the cached soft targets: the log vocabulary maps at `tau` (keeps
        the graph)."""
        return losses.vocabulary_log_map(self.logits, self.mask, tau)

    def soft_target(self, tau: torch.Tensor) -> torch.Tensor:
        # the teacher's vocabulary map at its own tau_i (known now: its loss is the current loss)
        with torch.no_grad():
            return losses.vocabulary_log_map(self.logits.detach(), self.mask, tau)


Outputs = ClassOutputs | TokenOutputs


@dataclass
class TeacherState:
    """The soft targets a step gets from its method's source (`raysdpb.soft_targets`): what step t-1 leaves for
    step t about the samples of its second half (DLB, DynSDPB), or what the epoch memory or the teacher's table
    holds for the batch's samples (PS-KD, KD)."""

    indices: torch.Tensor  # (H,) dataset indices, to check the overlap really lines up
    target: torch.Tensor   # (H, C) logits or (H, V) log vocabulary maps, float32, detached; PS-KD: probabilities
    tau: torch.Tensor      # (H,) the temperature of each sample's soft target
    weight: torch.Tensor | None = None  # (H,) a per-sample weight the source sets (PS-KD's a_t; 0: no target yet)

    def to(self, device: torch.device | str) -> "TeacherState":
        weight = None if self.weight is None else self.weight.to(device)
        return TeacherState(self.indices.to(device), self.target.to(device), self.tau.to(device), weight)


@dataclass
class LossTerms:
    total: torch.Tensor
    ce: torch.Tensor
    distill: torch.Tensor | None = None   # the distillation term before alpha (for logging)
    alpha: torch.Tensor | None = None     # per-sample alpha_i over the distilled (or reweighted) samples
    tau: torch.Tensor | None = None       # per-sample tau_i over the distilled samples


# --- the loss functions the registry entries use -----------------------------------------------------------

def ce_loss(outputs: Outputs, teacher: TeacherState | None, params: MethodParams) -> LossTerms:
    ce = outputs.per_sample_ce().mean()
    return LossTerms(total=ce, ce=ce.detach())


def dynamic_ce(outputs: Outputs, teacher: TeacherState | None, params: MethodParams) -> LossTerms:
    per_sample = outputs.per_sample_ce()
    w = outputs.uncertainty()
    total = losses.dynamic_ce_loss(per_sample, w, params.alpha)
    return LossTerms(total=total, ce=per_sample.detach().mean(), alpha=params.alpha * w)


def _self_distillation(dynamic: bool) -> Callable[[Outputs, TeacherState | None, MethodParams], LossTerms]:
    def loss(outputs: Outputs, teacher: TeacherState | None, params: MethodParams) -> LossTerms:
        ce = outputs.per_sample_ce().mean()
        if teacher is None:  # first step of a run: no previous mini-batch yet
            return LossTerms(total=ce, ce=ce.detach())
        first = outputs.slice(slice(0, len(teacher.indices)))
        student = first.student_target(teacher.tau)
        # alpha_i: DynSDPB's uncertainty weights (section 3), DLB's constant alpha
        alpha = params.alpha * (first.uncertainty() if dynamic else torch.ones_like(teacher.tau))
        distill = first.distill_loss(student, teacher.target, teacher.tau, alpha)
        with torch.no_grad():  # the term before alpha, for the logs: cheap next to the student's map
            unweighted = first.distill_loss(student.detach(), teacher.target, teacher.tau)
        return LossTerms(total=ce + distill, ce=ce.detach(), distill=unweighted, alpha=alpha.detach(),
                         tau=teacher.tau)

    return loss


def r_drop(outputs: tuple[ClassOutputs, ClassOutputs], targets: TeacherState | None,
           params: MethodParams) -> LossTerms:
    """R-Drop over the step's two dropout passes (`losses.r_drop_loss`); classifiers only (`kinds`)."""
    first, second = outputs
    total = losses.r_drop_loss(first.logits, second.logits, first.labels, params.alpha)
    with torch.no_grad():  # the terms for the logs
        ce = 0.5 * (first.per_sample_ce().mean() + second.per_sample_ce().mean())
        distill = losses.symmetric_kl_per_sample(first.logits, second.logits).mean()
    return LossTerms(total=total, ce=ce, distill=distill)


def progressive_self_kd(outputs: ClassOutputs, targets: TeacherState | None, params: MethodParams) -> LossTerms:
    """PS-KD against the memory's predictions of the previous epoch (`losses.ps_kd_loss`), `a_i = alpha *
    weight_i` (the memory's `t / T`, 0 for a sample it has no prediction of); plain CE in the first epoch."""
    ce = outputs.per_sample_ce().mean()
    if targets is None:
        return LossTerms(total=ce, ce=ce.detach())
    a = params.alpha * targets.weight
    total = losses.ps_kd_loss(outputs.logits, outputs.labels, targets.target, a)
    with torch.no_grad():  # the term a_t weighs, for the logs: H(p^{t-1}, p)
        distill = losses.soft_target_ce(outputs.logits, targets.target).mean()
    return LossTerms(total=total, ce=ce.detach(), distill=distill, alpha=a.detach())


def knowledge_distillation(outputs: ClassOutputs, targets: TeacherState | None, params: MethodParams) -> LossTerms:
    """Vanilla KD against the teacher's cached logits (`losses.kd_loss`) at the fixed `tau`."""
    if targets is None:
        raise RuntimeError("kd has no teacher logits for this batch: its source must be the teacher's table")
    total = losses.kd_loss(outputs.logits, targets.target, outputs.labels, params.alpha, params.tau)
    with torch.no_grad():  # the terms for the logs; the distillation term before alpha
        distill = losses.lmbc_loss(outputs.logits, targets.target, params.tau)
    return LossTerms(total=total, ce=outputs.per_sample_ce().detach().mean(), distill=distill)


def fixed_temperature(outputs: Outputs, params: MethodParams) -> torch.Tensor:
    return torch.full((len(outputs),), float(params.tau), device=outputs.logits.device)


def teacher_loss_temperature(outputs: Outputs, params: MethodParams) -> torch.Tensor:
    """DynSDPB's tau_i of the soft targets cached now: scaled by each sample's loss at this step (the teacher's
    loss when the targets are used), `losses.temperature_from_losses`."""
    return losses.temperature_from_losses(outputs.per_sample_ce().detach(), params.tau, params.tau_min_scale,
                                          params.tau_max_scale, params.tau_relative)


# --- the registry -----------------------------------------------------------------------------------------

# where a method's soft targets come from (raysdpb.soft_targets has a source for each):
#   none            no soft targets (fine-tuning, dynamic fine-tuning)
#   previous_batch  the previous step's second half, cached on the rank (DLB, DynSDPB and its ablations)
#   previous_epoch  each example's prediction when it was last trained on, a per-example memory (PS-KD)
#   other_pass      the other forward pass of the same batch, with its graph (R-Drop)
#   teacher         a fine-tuned teacher's logits, computed once per example and cached on disk (KD)
SoftTargets = Literal["none", "previous_batch", "previous_epoch", "other_pass", "teacher"]
ALL_KINDS = ("classification", "multiple_choice", "generation")
CLASSIFIER_KINDS = ("classification", "multiple_choice")


@dataclass(frozen=True)
class Method:
    name: str
    loader: Literal["plain", "overlap"]
    shuffle: bool
    epoch_multiplier: int
    # loss(outputs, targets, params): `outputs` is the step's forward pass, or the tuple of them when the method
    # takes several (`forward_passes`); `targets` what its `soft_targets` source handed the step (or None)
    loss: Callable[..., LossTerms]
    soft_targets: SoftTargets = "none"
    # per-sample temperature of the soft targets this method caches from the previous batch (previous_batch only)
    teacher_temperature: Callable[[Outputs, MethodParams], torch.Tensor] | None = None
    # forward passes of the student per step over the batch (R-Drop: 2); what a cost column counts
    forward_passes: int = 1
    kinds: tuple[str, ...] = ALL_KINDS  # the task kinds it trains (a decoder needs "generation")
    alpha_at_most: float | None = None  # where alpha mixes two targets (PS-KD, KD), it must not exceed this
    hyperparameters: tuple[str, ...] = ()  # the trial keys it uses beyond the shared ones (the sweep grids only these)
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.soft_targets not in get_args(SoftTargets):
            raise ValueError(f"{self.name}: soft_targets {self.soft_targets!r} is none of {get_args(SoftTargets)}")
        if (self.soft_targets == "previous_batch") != (self.teacher_temperature is not None):
            raise ValueError(f"{self.name}: a teacher_temperature is what the previous-batch targets are cached at, "
                             "and only they need one")
        if self.soft_targets == "previous_batch" and self.loader != "overlap":
            raise ValueError(f"{self.name}: previous-batch targets need the overlap loader")
        if (self.soft_targets == "other_pass") != (self.forward_passes > 1) or self.forward_passes < 1:
            raise ValueError(f"{self.name}: a method takes several forward passes exactly when each pass is the "
                             "other's soft target")

    @property
    def distills(self) -> bool:
        """Whether the loss has a distillation term (logged as `train_distill`)."""
        return self.soft_targets != "none"

    def step_loss(self, passes: list[Outputs], targets: TeacherState | None, params: MethodParams,
                  loss: Callable | None = None) -> LossTerms:
        """The loss of a step from its `forward_passes` forward passes and the soft targets handed to it; `loss`:
        this method's loss in another form (compiled: `compiled_loss`), default `self.loss`."""
        if len(passes) != self.forward_passes:
            raise ValueError(f"{self.name} takes {self.forward_passes} forward pass(es) per step, got {len(passes)}")
        return (loss or self.loss)(passes[0] if self.forward_passes == 1 else tuple(passes), targets, params)

    def teacher_state(self, second_half: Outputs, indices: torch.Tensor, params: MethodParams) -> TeacherState:
        """The soft targets of this batch's second half, for the next step (detached)."""
        assert self.teacher_temperature is not None, f"{self.name} caches no soft targets"
        with torch.no_grad():
            tau = self.teacher_temperature(second_half, params).detach().float()
            return TeacherState(indices=indices.detach().cpu(), target=second_half.soft_target(tau), tau=tau)


COMPILE_BACKEND_ENV = "RAYSDPB_COMPILE_BACKEND"


def compiled_loss(method: Method, backend: str | None = None):
    """`method.loss` through `torch.compile` (the trial key `compile_loss`): the loss's elementwise and reduction
    kernels (softmaxes, KL, per-sample weights and temperatures) fused, the model left as it is. `backend`:
    default `$RAYSDPB_COMPILE_BACKEND`, else inductor (which needs a C compiler on a CPU); `aot_eager` traces
    without generating code. Shapes vary (a short last batch, dynamic padding, no teacher on a run's first step):
    torch.compile recompiles for a new case, then marks the varying sizes dynamic."""
    import os

    return torch.compile(method.loss, backend=backend or os.environ.get(COMPILE_BACKEND_ENV) or "inductor")


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        from raysdpb.errors import UserError

        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


register(Method("finetune", loader="plain", shuffle=True, epoch_multiplier=1, loss=ce_loss,
                description="cross-entropy, shuffled mini-batches"))
register(Method("double_finetune", loader="plain", shuffle=True, epoch_multiplier=2, loss=ce_loss,
                description="cross-entropy for twice the epochs (compute-matched to the overlap loaders)"))
register(Method("sequential_dlb", loader="overlap", shuffle=False, epoch_multiplier=1,
                loss=_self_distillation(dynamic=False), soft_targets="previous_batch",
                teacher_temperature=fixed_temperature,
                hyperparameters=("alpha", "tau"),
                description="DLB in dataset order: CE + alpha * LMBC at a fixed tau"))
register(Method("random_dlb", loader="overlap", shuffle=True, epoch_multiplier=1,
                loss=_self_distillation(dynamic=False), soft_targets="previous_batch",
                teacher_temperature=fixed_temperature,
                hyperparameters=("alpha", "tau"),
                description="DLB on shuffled data: CE + alpha * LMBC at a fixed tau"))
register(Method("dynamic_finetune", loader="plain", shuffle=True, epoch_multiplier=1, loss=dynamic_ce,
                hyperparameters=("alpha",),
                description="CE reweighted per sample by (1 + alpha * uncertainty); no soft targets"))
register(Method("dynsdpb", loader="overlap", shuffle=True, epoch_multiplier=1,
                loss=_self_distillation(dynamic=True), soft_targets="previous_batch",
                teacher_temperature=teacher_loss_temperature,
                hyperparameters=("alpha", "tau", "tau_min_scale", "tau_max_scale", "tau_relative"),
                description="CE + per-sample alpha_i (uncertainty) and tau_i (teacher loss) LMBC, or VMM for decoders"))
# the ablations of DynSDPB (section 8): one of its two dynamic parts each (DLB has neither, DynSDPB both)
register(Method("dynsdpb_alpha_only", loader="overlap", shuffle=True, epoch_multiplier=1,
                loss=_self_distillation(dynamic=True), soft_targets="previous_batch",
                teacher_temperature=fixed_temperature, hyperparameters=("alpha", "tau"),
                description="DynSDPB's per-sample alpha_i (uncertainty) at DLB's fixed tau"))
register(Method("dynsdpb_tau_only", loader="overlap", shuffle=True, epoch_multiplier=1,
                loss=_self_distillation(dynamic=False), soft_targets="previous_batch",
                teacher_temperature=teacher_loss_temperature,
                hyperparameters=("alpha", "tau", "tau_min_scale", "tau_max_scale", "tau_relative"),
                description="DLB's constant alpha with DynSDPB's per-sample tau_i (teacher loss)"))
# the baselines a reviewer asks for (section 8)
register(Method("r_drop", loader="plain", shuffle=True, epoch_multiplier=1, loss=r_drop, soft_targets="other_pass",
                forward_passes=2, kinds=CLASSIFIER_KINDS, hyperparameters=("alpha",),
                description="R-Drop: CE of two dropout passes + alpha * their symmetric KL (two forwards a step)"))
register(Method("ps_kd", loader="plain", shuffle=True, epoch_multiplier=1, loss=progressive_self_kd,
                soft_targets="previous_epoch", kinds=CLASSIFIER_KINDS, hyperparameters=("alpha",), alpha_at_most=1.0,
                description="PS-KD: CE against (1 - a_t) y + a_t p_{t-1}(x), the previous epoch's prediction, "
                            "a_t = alpha * t / T"))
register(Method("kd", loader="plain", shuffle=True, epoch_multiplier=1, loss=knowledge_distillation,
                soft_targets="teacher", kinds=CLASSIFIER_KINDS, hyperparameters=("alpha", "tau", "teacher_model"),
                alpha_at_most=1.0,
                description="KD from a fine-tuned teacher: (1 - alpha) CE + alpha tau^2 KL, its logits cached on disk"))


# --- the per-rank cache ------------------------------------------------------------------------------------

class LogitCache:
    """Holds the previous step's second-half soft targets on one rank (logits, or vocabulary maps).

    `take` checks that the cached samples are exactly the first half of the current batch: the overlap
    sampler guarantees it, and a mismatch (a sampler swapped by a framework, a resume that lost its
    position) would silently distil the wrong targets, so it raises instead.
    """

    def __init__(self) -> None:
        self._state: TeacherState | None = None

    def put(self, state: TeacherState) -> None:
        self._state = state

    def take(self, first_half_indices: torch.Tensor, device: torch.device | str | None = None) -> TeacherState | None:
        state, self._state = self._state, None
        if state is None:
            return None
        if not torch.equal(state.indices.cpu(), first_half_indices.detach().cpu()):
            raise RuntimeError(
                "the cached soft targets are not the first half of this batch: the batch sampler must be "
                "raysdpb.sampler.OverlapBatchSampler (do not let a framework replace it)"
            )
        return state.to(device) if device is not None else state

    def clear(self) -> None:
        self._state = None

    def __bool__(self) -> bool:
        return self._state is not None

    def state_dict(self) -> dict:
        if self._state is None:
            return {}
        s = self._state
        return {"indices": s.indices.cpu(), "target": s.target.cpu(), "tau": s.tau.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self._state = TeacherState(state["indices"], state["target"], state["tau"]) if state else None
