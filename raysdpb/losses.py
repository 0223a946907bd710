"""The losses of DLB, DynSDPB and the baselines as pure functions of tensors (sections 3, 4 and 8 of
docs/method.md).

Conventions:

* Classification logits are `(B, C)`; labels `(B,)` class ids.
* Decoder-only logits are `(B, T, V)` *already aligned with their targets*: `logits[:, t]` predicts
  `labels[:, t]` (the caller shifts a causal LM's outputs by one), and `mask` `(B, T)` is true exactly at
  the answer positions.
* Every function computes in float32, whatever the input dtype (float16/bfloat16 logits are upcast), and
  returns float32.
* `temperature` is a float or a per-sample `(B,)` tensor.
* Teacher inputs (cached logits, cached vocabulary maps) never receive gradient; the signals that set
  per-sample weights and temperatures (entropies, teacher losses) are detached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "per_sample_ce",
    "lmbc_loss",
    "kl_per_sample",
    "uncertainty_weights",
    "loss_scaled_temperature",
    "temperature_from_losses",
    "dynamic_ce_loss",
    "symmetric_kl_per_sample",
    "r_drop_loss",
    "soft_target_ce",
    "ps_kd_loss",
    "kd_loss",
    "token_ce_per_sequence",
    "sequence_uncertainty_weights",
    "vocabulary_log_map",
    "vocabulary_map",
    "vmm_kl_per_sample",
    "vmm_loss",
]


def _per_sample(temperature: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    tau = torch.as_tensor(temperature, dtype=torch.float32, device=device)
    if tau.dim() == 0:
        tau = tau.expand(batch)
    if tau.shape != (batch,):
        raise ValueError(f"temperature must be a float or a ({batch},) tensor, got shape {tuple(tau.shape)}")
    return tau.detach()


def _weights(weights: torch.Tensor | float | None, batch: int, device: torch.device) -> torch.Tensor:
    if weights is None:
        return torch.ones(batch, dtype=torch.float32, device=device)
    return _per_sample(weights, batch, device)


# --- classification (NLU) ---------------------------------------------------------------------------------

def per_sample_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each sample, `(B,)`, in float32 (keeps the graph)."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def kl_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  temperature: float | torch.Tensor) -> torch.Tensor:
    """`KL(softmax(teacher_i / tau_i) || softmax(student_i / tau_i))` per sample, `(B,)`."""
    batch = student_logits.shape[0]
    tau = _per_sample(temperature, batch, student_logits.device).unsqueeze(-1)
    student_log_p = F.log_softmax(student_logits.float() / tau, dim=-1)
    teacher_log_p = F.log_softmax(teacher_logits.detach().float() / tau, dim=-1)
    return F.kl_div(student_log_p, teacher_log_p, reduction="none", log_target=True).sum(-1)


def lmbc_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              temperature: float | torch.Tensor, weights: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean over samples of `w_i * tau_i^2 * KL(softmax(teacher_i/tau_i) || softmax(student_i/tau_i))`.

    With a float `temperature` and no `weights` this is DLB's last-mini-batch-consistency loss; DynSDPB
    passes per-sample `alpha_i` as `weights` and `tau_i` as `temperature`.
    """
    batch = student_logits.shape[0]
    tau = _per_sample(temperature, batch, student_logits.device)
    w = _weights(weights, batch, student_logits.device)
    return (w * tau.pow(2) * kl_per_sample(student_logits, teacher_logits, tau)).mean()


def uncertainty_weights(logits: torch.Tensor) -> torch.Tensor:
    """Prediction entropy over `log C`, `(B,)` in [0, 1], detached: 0 for a one-hot, 1 for a uniform prediction."""
    num_classes = logits.shape[-1]
    if num_classes < 2:
        raise ValueError("uncertainty_weights needs at least 2 classes")
    log_p = F.log_softmax(logits.detach().float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return (entropy / math.log(num_classes)).clamp(0.0, 1.0)


def temperature_from_losses(losses: torch.Tensor, tau: float, min_scale: float = 0.5, max_scale: float = 2.0,
                            relative: bool = True) -> torch.Tensor:
    """`tau_i = tau * clamp(l_i / mean(l), min_scale, max_scale)` from per-sample teacher losses (detached).

    `relative=False` drops the batch-relative scaling: `tau_i = tau * clamp(l_i, min_scale, max_scale)`.
    A batch of equal losses (all zero included) keeps `tau` unchanged.
    """
    losses = losses.detach().float()
    if relative:
        eps = 1e-8
        scale = (losses + eps) / (losses.mean() + eps)
    else:
        scale = losses
    return tau * scale.clamp(min_scale, max_scale)


def loss_scaled_temperature(teacher_logits: torch.Tensor, labels: torch.Tensor, tau: float,
                            min_scale: float = 0.5, max_scale: float = 2.0, relative: bool = True) -> torch.Tensor:
    """DynSDPB's discrimination temperature: the teacher's CE against the label scales `tau` per sample."""
    teacher_ce = F.cross_entropy(teacher_logits.detach().float(), labels, reduction="none")
    return temperature_from_losses(teacher_ce, tau, min_scale, max_scale, relative)


def dynamic_ce_loss(per_sample_losses: torch.Tensor, weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """Dynamic Finetune's reweighted CE: `mean_i (1 + alpha * w_i) * l_i` (weights detached)."""
    return ((1.0 + alpha * weights.detach().float()) * per_sample_losses).mean()


def symmetric_kl_per_sample(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """`0.5 * (KL(p_a || p_b) + KL(p_b || p_a))` per sample, `(B,)`, with `p = softmax(z)`; both sides keep their
    graph (R-Drop: each dropout pass is the other's target)."""
    log_a = F.log_softmax(logits_a.float(), dim=-1)
    log_b = F.log_softmax(logits_b.float(), dim=-1)
    a_to_b = F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)  # KL(p_a || p_b)
    b_to_a = F.kl_div(log_a, log_b, reduction="none", log_target=True).sum(-1)  # KL(p_b || p_a)
    return 0.5 * (a_to_b + b_to_a)


def r_drop_loss(logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """R-Drop (Liang et al. 2021) over two dropout passes of one batch:
    `0.5 * (mean CE_a + mean CE_b) + alpha * mean_i 0.5 * (KL(p_a,i || p_b,i) + KL(p_b,i || p_a,i))`."""
    ce = 0.5 * (per_sample_ce(logits_a, labels).mean() + per_sample_ce(logits_b, labels).mean())
    return ce + alpha * symmetric_kl_per_sample(logits_a, logits_b).mean()


def soft_target_ce(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a distribution, `-sum_c q_c log softmax(z)_c` per sample, `(B,)` (the target
    detached)."""
    return -(target_probs.detach().float() * F.log_softmax(logits.float(), dim=-1)).sum(-1)


def ps_kd_loss(logits: torch.Tensor, labels: torch.Tensor, previous_probs: torch.Tensor,
               weights: torch.Tensor | float) -> torch.Tensor:
    """PS-KD (Kim et al. 2021): `mean_i CE(z_i, (1 - a_i) onehot(y_i) + a_i p_i^{t-1})`, which is
    `mean_i (1 - a_i) CE(z_i, y_i) + a_i H(p_i^{t-1}, softmax(z_i))`; `a_i` (float or `(B,)`) detached."""
    a = _weights(weights, logits.shape[0], logits.device)
    onehot = F.one_hot(labels, logits.shape[-1]).float()
    target = (1.0 - a).unsqueeze(-1) * onehot + a.unsqueeze(-1) * previous_probs.detach().float()
    return soft_target_ce(logits, target).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
            temperature: float) -> torch.Tensor:
    """Hinton et al.'s knowledge distillation: `(1 - alpha) * mean CE + alpha * tau^2 * mean_i
    KL(softmax(teacher_i / tau) || softmax(student_i / tau))` (the teacher detached)."""
    ce = per_sample_ce(student_logits, labels).mean()
    return (1.0 - alpha) * ce + alpha * lmbc_loss(student_logits, teacher_logits, temperature)


# --- decoder-only (NLG): vocabulary map matching ----------------------------------------------------------

def _check_mask(mask: torch.Tensor) -> torch.Tensor:
    counts = mask.sum(-1)
    if bool((counts == 0).any()):
        empty = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"sequences {empty} have no answer position in the mask")
    return counts


def token_ce_per_sequence(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean token CE over each sequence's answer positions, `(B,)`, keeping the graph."""
    mask = mask.bool()
    counts = _check_mask(mask)
    rows = mask.nonzero(as_tuple=True)
    token_ce = F.cross_entropy(logits[rows].float(), labels[rows], reduction="none")
    per_seq = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    per_seq = per_seq.index_add(0, rows[0], token_ce)
    return per_seq / counts.float()


def sequence_uncertainty_weights(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean token entropy over answer positions divided by `log V`, `(B,)` in [0, 1], detached
    (zeros for a one-token vocabulary, which has no uncertainty)."""
    mask = mask.bool()
    counts = _check_mask(mask)
    if logits.shape[-1] == 1:
        return torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
    rows = mask.nonzero(as_tuple=True)
    log_p = F.log_softmax(logits.detach()[rows].float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    per_seq = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device).index_add(0, rows[0], entropy)
    return (per_seq / counts.float() / math.log(logits.shape[-1])).clamp(0.0, 1.0)


class _SequenceLogMap(torch.autograd.Function):
    """`log m = logsumexp_t log_softmax(rows_t / tau) - log T` for one sequence's answer rows `(T, V)`.

    A hand-written backward, because the map is memory-bound on large vocabularies: autograd's chain
    (log_softmax, then logsumexp over positions) keeps several `(T, V)` intermediates and walks them about
    twice as often. With `G = dL/dlog m` and `R_tv = p_tv / m_v = exp(log p_tv - log m_v)` (bounded by T,
    so no division by an underflowed `m_v`):

        dL/drows_tv = (G_v R_tv - p_tv * sum_u G_u R_tu) / (T * tau)
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, tau: float) -> torch.Tensor:
        work = torch.promote_types(rows.dtype, torch.float32)  # float32 for half inputs, float64 stays
        scaled = rows.to(work) if tau == 1.0 else rows.to(work) / tau
        log_p = F.log_softmax(scaled, dim=-1)
        log_m = torch.logsumexp(log_p, dim=0) - math.log(rows.shape[0])
        ctx.save_for_backward(log_p, log_m)
        ctx.tau, ctx.in_dtype = float(tau), rows.dtype
        return log_m

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        log_p, log_m = ctx.saved_tensors
        q = torch.exp(log_p - log_m).mul_(grad)      # G_v R_tv
        a = q.sum(-1, keepdim=True)
        out = torch.exp(log_p).mul_(a).neg_().add_(q).div_(log_p.shape[0] * ctx.tau)
        return out.to(ctx.in_dtype), None


def _answer_rows(seq_logits: torch.Tensor, seq_mask: torch.Tensor) -> torch.Tensor:
    """The rows at the answer positions: a view when they are contiguous (prompt, answer, then padding),
    which keeps the backward from scattering into a full-size zero tensor."""
    positions = seq_mask.nonzero().flatten()
    first, last = int(positions[0]), int(positions[-1])
    if last - first + 1 == positions.numel():
        return seq_logits[first:last + 1]
    return seq_logits[seq_mask]


def vocabulary_log_map(logits: torch.Tensor, mask: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Log of the vocabulary map, `(B, V)`: `log m_i = logsumexp_t log_softmax(z_it / tau_i) - log T_i`.

    Computed in log space (no `log(0)` for a token every position gives probability 0 in float32) from the
    answer positions alone, so it does not depend on padding. Keeps the graph.
    """
    batch = logits.shape[0]
    mask = mask.bool()
    _check_mask(mask)
    tau = _per_sample(temperature, batch, logits.device).tolist()
    # B is small for decoder-only training; each row touches only its own answer tokens
    return torch.stack([_SequenceLogMap.apply(_answer_rows(logits[i], mask[i]), tau[i]) for i in range(batch)])


def vocabulary_map(logits: torch.Tensor, mask: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """The vocabulary map `m_i = (1/T_i) sum_t softmax(z_it / tau_i)` over answer positions, `(B, V)`, rows sum to 1."""
    return vocabulary_log_map(logits, mask, temperature).exp()


def vmm_kl_per_sample(student_log_map: torch.Tensor, teacher_log_map: torch.Tensor) -> torch.Tensor:
    """`KL(m_teacher || m_student)` per sequence from log vocabulary maps, `(B,)`."""
    return F.kl_div(student_log_map.float(), teacher_log_map.detach().float(),
                    reduction="none", log_target=True).sum(-1)


def vmm_loss(student_log_map: torch.Tensor, teacher_log_map: torch.Tensor, temperature: float | torch.Tensor,
             weights: torch.Tensor | float | None = None) -> torch.Tensor:
    """`L_VMM = mean_i w_i * tau_i^2 * KL(m_i^{t-1} || m_i^t)` from log vocabulary maps."""
    batch = student_log_map.shape[0]
    tau = _per_sample(temperature, batch, student_log_map.device)
    w = _weights(weights, batch, student_log_map.device)
    return (w * tau.pow(2) * vmm_kl_per_sample(student_log_map, teacher_log_map)).mean()
