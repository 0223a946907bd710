"""raysdpb.losses against float64 numpy references written from the formulas of docs/method.md (sections 3, 4),
hand-worked cases, gradients, dtypes and edge cases."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raysdpb import losses as L

# RAYSDPB_HYPOTHESIS_EXAMPLES raises the number of examples for a longer local stress run
SETTINGS = settings(max_examples=int(os.environ.get("RAYSDPB_HYPOTHESIS_EXAMPLES", 40)), deadline=None,
                    database=None, suppress_health_check=[HealthCheck.too_slow])


# --- float64 numpy references -------------------------------------------------------------------------------

def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_ce(z, y):
    lp = np_log_softmax(z)
    return -lp[np.arange(len(y)), np.asarray(y)]


def np_kl(p_log, q_log):
    """KL(p || q) = sum_c p_c (log p_c - log q_c) from log-probabilities (last axis)."""
    p = np.exp(p_log)
    return np.where(p > 0, p * (p_log - q_log), 0.0).sum(-1)


def np_tau(tau, batch):
    t = np.asarray(tau, dtype=np.float64)
    return np.full(batch, float(t)) if t.ndim == 0 else t


def np_lmbc(student, teacher, tau, weights=None):
    b = student.shape[0]
    t = np_tau(tau, b)[:, None]
    kl = np_kl(np_log_softmax(teacher / t), np_log_softmax(student / t))
    w = np.ones(b) if weights is None else np.asarray(weights, dtype=np.float64)
    return float(np.mean(w * t[:, 0] ** 2 * kl)), kl


def np_entropy_weight(z):
    p = np_softmax(z)
    lp = np_log_softmax(z)
    h = -np.where(p > 0, p * lp, 0.0).sum(-1)
    return h / math.log(z.shape[-1])


def np_temperature(l, tau, lo=0.5, hi=2.0, relative=True, eps=1e-8):
    """tau * clip(l / mean(l), lo, hi). A confident teacher's CE can underflow to exactly 0 (0 / 0), so the
    ratio carries the documented guard: equal losses, all zero included, keep tau (eps=0 gives the bare ratio)."""
    l = np.asarray(l, dtype=np.float64)
    scale = (l + eps) / (l.mean() + eps) if relative else l
    return tau * np.clip(scale, lo, hi)


def np_vocab_map(logits, mask, tau):
    """m_i = (1/T_i) sum_{t in answer} softmax(z_it / tau_i), by a loop over sequences."""
    b = logits.shape[0]
    t = np_tau(tau, b)
    out = []
    for i in range(b):
        rows = logits[i][np.asarray(mask[i], dtype=bool)]
        out.append(np_softmax(rows / t[i]).mean(0))
    return np.stack(out)


def np_token_ce(logits, labels, mask):
    out = []
    for i in range(logits.shape[0]):
        vals = []
        for t in range(logits.shape[1]):
            if mask[i][t]:
                lp = np_log_softmax(logits[i, t])
                vals.append(-lp[labels[i, t]])
        out.append(sum(vals) / len(vals))
    return np.array(out)


def np_seq_uncertainty(logits, mask):
    out = []
    for i in range(logits.shape[0]):
        rows = logits[i][np.asarray(mask[i], dtype=bool)]
        out.append(np_entropy_weight(rows).mean())
    return np.array(out)


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def t32(a):
    return torch.tensor(np.asarray(a), dtype=torch.float32)


def close(got: torch.Tensor, want, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(got.detach().double().numpy(), np.asarray(want, dtype=np.float64), rtol=rtol, atol=atol)


def rand_mask(rng, b, t, contiguous=True):
    mask = np.zeros((b, t), dtype=bool)
    for i in range(b):
        if contiguous:
            start = rng.integers(0, t)
            end = rng.integers(start + 1, t + 1)
            mask[i, start:end] = True
        else:
            mask[i] = rng.random(t) < 0.5
            mask[i, rng.integers(0, t)] = True
    return mask


# --- hand-worked cases ------------------------------------------------------------------------------------------

LN3 = math.log(3.0)


def test_hand_worked_two_class_kl_ce_entropy_and_map():
    teacher = torch.tensor([[0.0, 0.0]])       # p = (1/2, 1/2)
    student = torch.tensor([[0.0, LN3]])       # q = (1/4, 3/4)
    # KL(p||q) = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3)
    assert L.kl_per_sample(student, teacher, 1.0).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert L.lmbc_loss(student, teacher, 1.0).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # at tau = 2 the student logits (0, 2 ln 3) give (1/4, 3/4) again, and tau^2 = 4 multiplies
    assert L.lmbc_loss(torch.tensor([[0.0, 2 * LN3]]), teacher, 2.0).item() == pytest.approx(
        2 * math.log(4 / 3), rel=1e-6)
    # CE of (1/4, 3/4) against class 1: ln(4/3); against class 0: ln 4
    ce = L.per_sample_ce(torch.tensor([[0.0, LN3], [0.0, LN3]]), torch.tensor([1, 0]))
    assert ce.tolist() == pytest.approx([math.log(4 / 3), math.log(4)], rel=1e-6)
    # entropy of (1/4, 3/4) in bits: 2 - 3/4 log2 3 ; uniform: 1
    w = L.uncertainty_weights(torch.tensor([[0.0, LN3], [0.0, 0.0]]))
    assert w.tolist() == pytest.approx([2 - 0.75 * math.log2(3), 1.0], rel=1e-6)
    # vocabulary map of the two positions (1/2, 1/2) and (1/4, 3/4): (3/8, 5/8)
    logits = torch.tensor([[[0.0, 0.0], [0.0, LN3], [5.0, -5.0]]])
    mask = torch.tensor([[True, True, False]])
    assert L.vocabulary_map(logits, mask, 1.0)[0].tolist() == pytest.approx([3 / 8, 5 / 8], rel=1e-6)
    # KL(m_teacher=(1/2,1/2) || m_student=(3/8,5/8)) = 1/2 ln(4/3) + 1/2 ln(4/5)
    kl = L.vmm_kl_per_sample(torch.log(torch.tensor([[3 / 8, 5 / 8]])), torch.log(torch.tensor([[0.5, 0.5]])))
    assert kl.item() == pytest.approx(0.5 * math.log(4 / 3) + 0.5 * math.log(4 / 5), rel=1e-5)
    # token CE per sequence: mean of ln 2 and ln(4/3)
    ce = L.token_ce_per_sequence(logits, torch.tensor([[0, 1, 0]]), mask)
    assert ce.item() == pytest.approx(0.5 * (math.log(2) + math.log(4 / 3)), rel=1e-6)


def test_hand_worked_temperatures():
    assert L.temperature_from_losses(torch.tensor([1.0, 3.0]), 2.0).tolist() == pytest.approx([1.0, 3.0])
    # l/mean = (0.0198, 1.9802) -> clamped below at 1/2
    assert L.temperature_from_losses(torch.tensor([0.1, 10.0]), 1.0).tolist() == pytest.approx(
        [0.5, 10.0 / 5.05], rel=1e-5)
    # mean 2: scales 0, 0, 0, 4 -> clamp to 1/2 and 2
    assert L.temperature_from_losses(torch.tensor([0.0, 0.0, 0.0, 8.0]), 3.0).tolist() == pytest.approx(
        [1.5, 1.5, 1.5, 6.0], rel=1e-5)
    assert L.temperature_from_losses(torch.zeros(5), 1.7).tolist() == pytest.approx([1.7] * 5)
    assert L.temperature_from_losses(torch.full((3,), 0.3), 1.7).tolist() == pytest.approx([1.7] * 3)
    # absolute scaling: tau * clamp(l, lo, hi)
    assert L.temperature_from_losses(torch.tensor([0.1, 1.5, 9.0]), 2.0, relative=False).tolist() == pytest.approx(
        [1.0, 3.0, 4.0])
    assert L.temperature_from_losses(torch.tensor([1.0, 3.0]), 1.0, 0.8, 1.25).tolist() == pytest.approx([0.8, 1.25])


def test_hand_worked_dynamic_ce():
    l = torch.tensor([1.0, 2.0, 4.0])
    w = torch.tensor([0.0, 0.5, 1.0])
    # mean((1, 1.5, 2) * (1, 2, 4)) = (1 + 3 + 8) / 3 = 4
    assert L.dynamic_ce_loss(l, w, 1.0).item() == pytest.approx(4.0)
    assert L.dynamic_ce_loss(l, w, 0.0).item() == pytest.approx(7 / 3)


# --- classification functions vs references ---------------------------------------------------------------------

@SETTINGS
@given(seed=st.integers(0, 10_000), b=st.integers(1, 6), c=st.integers(2, 7), scale=st.floats(0.1, 20.0),
       tau=st.floats(0.3, 5.0), per_sample=st.booleans(), weighted=st.booleans())
def test_classification_losses_match_reference(seed, b, c, scale, tau, per_sample, weighted):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=(b, c)) * scale
    teacher = rng.normal(size=(b, c)) * scale
    labels = rng.integers(0, c, size=b)
    taus = rng.uniform(0.3, 5.0, size=b) if per_sample else tau
    weights = rng.uniform(0, 2, size=b) if weighted else None
    s32, t32_, y = t32(student), t32(teacher), torch.tensor(labels)
    # compare with the reference on the float32-rounded inputs
    s64, t64 = s32.double().numpy(), t32_.double().numpy()

    close(L.per_sample_ce(s32, y), np_ce(s64, labels), rtol=1e-5, atol=1e-5)
    tau_arg = t32(taus) if per_sample else tau
    want, kl = np_lmbc(s64, t64, np.asarray(taus, dtype=np.float32), weights)
    close(L.kl_per_sample(s32, t32_, tau_arg), kl, rtol=1e-4, atol=1e-5)
    close(L.lmbc_loss(s32, t32_, tau_arg, None if weights is None else t32(weights)), want, rtol=1e-4, atol=1e-5)
    close(L.uncertainty_weights(s32), np_entropy_weight(s64), rtol=1e-4, atol=1e-5)
    ce_teacher = np_ce(t64, labels)
    lo, hi = sorted(rng.uniform(0.2, 3.0, size=2))
    got = L.loss_scaled_temperature(t32_, y, 1.5, lo, hi)
    # a very confident teacher's CE is below float32 resolution (float32 gives 0, float64 1e-9): the ratio of
    # two such losses is noise, so the float64 reference applies when every teacher loss is resolvable
    if ce_teacher.min() > 1e-4:
        close(got, np_temperature(ce_teacher, 1.5, lo, hi), rtol=1e-4, atol=1e-5)
    close(got, np_temperature(f64(L.per_sample_ce(t32_, y)), 1.5, lo, hi), rtol=1e-5, atol=1e-6)
    close(L.loss_scaled_temperature(t32_, y, 1.5, lo, hi, relative=False),
          np_temperature(ce_teacher, 1.5, lo, hi, relative=False), rtol=1e-4, atol=1e-5)
    w = rng.uniform(0, 1, size=b)
    close(L.dynamic_ce_loss(t32(ce_teacher), t32(w), 0.7), np.mean((1 + 0.7 * w) * ce_teacher), rtol=1e-5)


@SETTINGS
@given(seed=st.integers(0, 10_000), b=st.integers(1, 6), c=st.integers(2, 6), tau=st.floats(0.3, 4.0))
def test_per_sample_temperature_equals_float_temperature(seed, b, c, tau):
    rng = np.random.default_rng(seed)
    s, t = t32(rng.normal(size=(b, c)) * 3), t32(rng.normal(size=(b, c)) * 3)
    tau32 = float(np.float32(tau))
    full = torch.full((b,), tau32)
    assert torch.allclose(L.kl_per_sample(s, t, tau32), L.kl_per_sample(s, t, full), rtol=1e-6, atol=1e-7)
    assert torch.allclose(L.lmbc_loss(s, t, tau32), L.lmbc_loss(s, t, full), rtol=1e-6, atol=1e-7)
    # distinct per-sample temperatures act row by row
    taus = t32(rng.uniform(0.3, 4.0, size=b))
    kl = L.kl_per_sample(s, t, taus)
    for i in range(b):
        assert torch.allclose(kl[i], L.kl_per_sample(s[i:i + 1], t[i:i + 1], float(taus[i]))[0], rtol=1e-5,
                              atol=1e-7)
    lmbc_rows = torch.stack([L.lmbc_loss(s[i:i + 1], t[i:i + 1], float(taus[i])) for i in range(b)])
    assert torch.allclose(L.lmbc_loss(s, t, taus), lmbc_rows.mean(), rtol=1e-5, atol=1e-7)


def test_temperature_shape_is_checked():
    s = torch.randn(3, 4)
    with pytest.raises(ValueError):
        L.kl_per_sample(s, s, torch.ones(4))
    with pytest.raises(ValueError):
        L.lmbc_loss(s, s, torch.ones(3, 1))


def test_kl_is_zero_for_identical_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(8, 5, generator=g) * 4
    assert L.kl_per_sample(s, s.clone(), 2.0).abs().max().item() < 1e-6
    # shifting the logits of a row by a constant does not change its distribution
    assert L.kl_per_sample(s, s + 100.0, 2.0).abs().max().item() < 1e-4
    t = torch.randn(8, 5, generator=g) * 4
    assert (L.kl_per_sample(s, t, 1.0) > 0).all()


# --- gradients ----------------------------------------------------------------------------------------------------

def test_lmbc_gradient_matches_analytic_and_teacher_gets_none():
    g = torch.Generator().manual_seed(1)
    b, c = 5, 4
    student = (torch.randn(b, c, generator=g) * 2).requires_grad_()
    teacher = (torch.randn(b, c, generator=g) * 2).requires_grad_()
    taus = torch.tensor([0.5, 1.0, 2.0, 3.0, 1.5], requires_grad=True)
    weights = torch.rand(b, generator=g).requires_grad_()
    L.lmbc_loss(student, teacher, taus, weights).backward()
    assert teacher.grad is None, "the teacher's logits must not receive gradient"
    assert taus.grad is None and weights.grad is None, "temperatures and weights are constants"
    # d/dz of (1/B) w tau^2 KL(p || softmax(z/tau)) = (1/B) w tau (softmax(z/tau) - p)
    s64, t64, tau64 = student.detach().double(), teacher.detach().double(), taus.detach().double()[:, None]
    p = torch.softmax(t64 / tau64, -1)
    q = torch.softmax(s64 / tau64, -1)
    want = weights.detach().double()[:, None] * tau64 * (q - p) / b
    assert torch.allclose(student.grad.double(), want, rtol=1e-4, atol=1e-6)


def test_ce_and_dynamic_ce_gradients():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 3, generator=g).requires_grad_()
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    w = torch.rand(6, generator=g).requires_grad_()
    ce = L.per_sample_ce(logits, labels)
    L.dynamic_ce_loss(ce, w, 0.5).backward()
    assert w.grad is None, "Dynamic Finetune's weights must be detached"
    onehot = torch.nn.functional.one_hot(labels, 3).double()
    want = (1 + 0.5 * w.detach().double())[:, None] * (torch.softmax(logits.detach().double(), -1) - onehot) / 6
    assert torch.allclose(logits.grad.double(), want, rtol=1e-4, atol=1e-6)


def test_signals_are_detached():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 5, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    assert not L.uncertainty_weights(z).requires_grad
    assert not L.loss_scaled_temperature(z, y, 1.0).requires_grad
    assert not L.temperature_from_losses(L.per_sample_ce(z, y), 1.0).requires_grad
    zt = torch.randn(4, 6, 5, generator=g, requires_grad=True)
    mask = torch.ones(4, 6, dtype=torch.bool)
    assert not L.sequence_uncertainty_weights(zt, mask).requires_grad
    assert L.token_ce_per_sequence(zt, torch.zeros(4, 6, dtype=torch.long), mask).requires_grad
    assert L.vocabulary_log_map(zt, mask, 1.0).requires_grad


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("tau", [1.0, "per_sample"])
def test_vocabulary_log_map_gradcheck_float64(contiguous, tau):
    rng = np.random.default_rng(4 + contiguous)
    b, t, v = 3, 5, 4
    logits = torch.tensor(rng.normal(size=(b, t, v)) * 2, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor(rand_mask(rng, b, t, contiguous))
    temp = torch.tensor([0.5, 1.0, 2.5]) if tau == "per_sample" else 1.0
    assert L.vocabulary_log_map(logits, mask, temp).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda z: L.vocabulary_log_map(z, mask, temp), (logits,), eps=1e-6, atol=1e-6)


def test_vocabulary_log_map_backward_matches_plain_autograd():
    """The hand-written backward against autograd through the textbook float64 formula."""
    rng = np.random.default_rng(5)
    b, t, v = 4, 7, 11
    base = rng.normal(size=(b, t, v)) * 3
    mask = torch.tensor(rand_mask(rng, b, t, contiguous=False))
    taus = torch.tensor([0.5, 1.0, 1.7, 3.0])
    upstream = torch.tensor(rng.normal(size=(b, v)))

    z = torch.tensor(base, dtype=torch.float32, requires_grad=True)
    (L.vocabulary_log_map(z, mask, taus).double() * upstream).sum().backward()

    z64 = torch.tensor(base, dtype=torch.float32).double().requires_grad_()
    ref = []
    for i in range(b):
        p = torch.exp(z64[i][mask[i]] / taus[i].double())
        p = p / p.sum(-1, keepdim=True)
        ref.append(torch.log(p.mean(0)))
    (torch.stack(ref) * upstream).sum().backward()
    assert torch.allclose(z.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)
    assert (z.grad[~mask] == 0).all(), "padding and prompt positions must get no gradient"


def test_vmm_loss_gradient_and_teacher_gets_none():
    rng = np.random.default_rng(6)
    b, t, v = 3, 4, 6
    mask = torch.tensor(rand_mask(rng, b, t))
    student_z = torch.tensor(rng.normal(size=(b, t, v)), dtype=torch.float32, requires_grad=True)
    teacher_z = torch.tensor(rng.normal(size=(b, t, v)), dtype=torch.float32, requires_grad=True)
    taus = torch.tensor([0.7, 1.0, 2.0])
    w = torch.tensor([0.2, 0.5, 1.0])
    teacher_map = L.vocabulary_log_map(teacher_z, mask, taus)  # keeps a graph: vmm must cut it
    s_map = L.vocabulary_log_map(student_z, mask, taus)
    s_map.retain_grad()
    L.vmm_loss(s_map, teacher_map, taus, w).backward()
    assert teacher_z.grad is None, "the cached teacher map must not receive gradient"
    # d/d log m_s of w tau^2 sum m_t (log m_t - log m_s) / B = -w tau^2 m_t / B
    want = -(w * taus ** 2)[:, None].double() * teacher_map.detach().exp().double() / b
    assert torch.allclose(s_map.grad.double(), want, rtol=1e-5, atol=1e-7)


# --- decoder-only functions vs references --------------------------------------------------------------------

@SETTINGS
@given(seed=st.integers(0, 10_000), b=st.integers(1, 4), t=st.integers(1, 6), v=st.integers(2, 9),
       scale=st.floats(0.1, 15.0), contiguous=st.booleans(), per_sample=st.booleans())
def test_token_losses_match_reference(seed, b, t, v, scale, contiguous, per_sample):
    rng = np.random.default_rng(seed)
    logits = t32(rng.normal(size=(b, t, v)) * scale)
    z64 = logits.double().numpy()
    labels = rng.integers(0, v, size=(b, t))
    mask = rand_mask(rng, b, t, contiguous)
    labels_arg = torch.tensor(labels)
    labels_arg[~torch.tensor(mask)] = -100  # labels outside the answer are never read
    m = torch.tensor(mask)
    taus = rng.uniform(0.3, 4.0, size=b).astype(np.float32) if per_sample else np.float32(1.3)
    tau_arg = torch.tensor(taus) if per_sample else float(taus)

    close(L.token_ce_per_sequence(logits, labels_arg, m), np_token_ce(z64, labels, mask), rtol=1e-5, atol=1e-5)
    close(L.sequence_uncertainty_weights(logits, m), np_seq_uncertainty(z64, mask), rtol=1e-4, atol=1e-5)
    vm = L.vocabulary_map(logits, m, tau_arg)
    ref_map = np_vocab_map(z64, mask, taus)
    close(vm, ref_map, rtol=1e-4, atol=1e-6)
    close(vm.sum(-1), np.ones(b), rtol=0, atol=1e-5)
    assert (vm >= 0).all() and (vm <= 1).all()
    close(L.vocabulary_log_map(logits, m, tau_arg), np.log(ref_map), rtol=1e-4, atol=1e-4)

    teacher = t32(rng.normal(size=(b, t, v)) * scale)
    t_map = np_vocab_map(teacher.double().numpy(), mask, taus)
    weights = rng.uniform(0, 1, size=b)
    kl = np_kl(np.log(t_map), np.log(ref_map))
    s_log = L.vocabulary_log_map(logits, m, tau_arg)
    t_log = L.vocabulary_log_map(teacher, m, tau_arg)
    close(L.vmm_kl_per_sample(s_log, t_log), kl, rtol=1e-3, atol=1e-5)
    want = np.mean(weights * np_tau(taus, b) ** 2 * kl)
    close(L.vmm_loss(s_log, t_log, tau_arg, t32(weights)), want, rtol=1e-3, atol=1e-5)
    close(L.vmm_loss(s_log, t_log, tau_arg), np.mean(np_tau(taus, b) ** 2 * kl), rtol=1e-3, atol=1e-5)


@SETTINGS
@given(seed=st.integers(0, 10_000), b=st.integers(1, 4), t=st.integers(1, 5), v=st.integers(2, 8),
       pad=st.integers(1, 4), prompt=st.integers(0, 3), per_sample=st.booleans())
def test_vocabulary_map_and_token_losses_ignore_padding(seed, b, t, v, pad, prompt, per_sample):
    rng = np.random.default_rng(seed)
    logits = t32(rng.normal(size=(b, t, v)) * 3)
    labels = torch.tensor(rng.integers(0, v, size=(b, t)))
    mask = torch.tensor(rand_mask(rng, b, t, contiguous=bool(seed % 2)))
    tau = t32(rng.uniform(0.5, 3.0, size=b)) if per_sample else 1.0
    # prompt positions before and padding after, with arbitrary (some huge) logits, all outside the mask
    junk = lambda n: t32(rng.normal(size=(b, n, v)) * rng.choice([1.0, 1e3, 1e4]))  # noqa: E731
    big = torch.cat([junk(prompt), logits, junk(pad)], dim=1)
    big_mask = torch.cat([torch.zeros(b, prompt, dtype=torch.bool), mask, torch.zeros(b, pad, dtype=torch.bool)], 1)
    big_labels = torch.cat([torch.full((b, prompt), -100), labels, torch.full((b, pad), 12345)], 1)

    a, z = L.vocabulary_map(logits, mask, tau), L.vocabulary_map(big, big_mask, tau)
    assert torch.allclose(a, z, rtol=1e-6, atol=1e-7)
    close(z.sum(-1), np.ones(b), rtol=0, atol=1e-5)
    assert torch.allclose(L.token_ce_per_sequence(logits, labels, mask),
                          L.token_ce_per_sequence(big, big_labels, big_mask), rtol=1e-6, atol=1e-7)
    assert torch.allclose(L.sequence_uncertainty_weights(logits, mask),
                          L.sequence_uncertainty_weights(big, big_mask), rtol=1e-6, atol=1e-7)


def test_integer_mask_is_treated_like_bool():
    """The collator's `answer_mask` is a 0/1 integer tensor; every function must read it as a boolean mask.

    token_ce_per_sequence and sequence_uncertainty_weights do; the vocabulary map indexes `seq_logits[seq_mask]`
    with the integer mask when the answer positions are not contiguous, i.e. it gathers rows 0 and 1 instead
    of masking, and silently returns a wrong map.
    """
    g = torch.Generator().manual_seed(11)
    z = torch.randn(2, 5, 6, generator=g) * 2
    labels = torch.randint(0, 6, (2, 5), generator=g)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 1]])
    assert torch.allclose(L.token_ce_per_sequence(z, labels, mask), L.token_ce_per_sequence(z, labels, mask.bool()))
    assert torch.allclose(L.sequence_uncertainty_weights(z, mask), L.sequence_uncertainty_weights(z, mask.bool()))
    want = np_vocab_map(z.double().numpy(), mask.numpy().astype(bool), 1.0)
    close(L.vocabulary_map(z, mask.bool(), 1.0), want, rtol=1e-5)
    close(L.vocabulary_map(z, mask, 1.0), want, rtol=1e-5)


def test_vocabulary_map_does_not_depend_on_length():
    """Repeating every answer position k times leaves the map (a mean over positions) unchanged."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(2, 3, 10, generator=g) * 2
    mask = torch.ones(2, 3, dtype=torch.bool)
    rep = z.repeat_interleave(3, dim=1)
    rep_mask = torch.ones(2, 9, dtype=torch.bool)
    assert torch.allclose(L.vocabulary_map(z, mask, 1.3), L.vocabulary_map(rep, rep_mask, 1.3), rtol=1e-5, atol=1e-7)


def test_vocabulary_log_map_has_no_log_of_zero():
    """A token that every position gives float32-probability 0 still has a finite log-map entry."""
    z = torch.tensor([[[0.0, -200.0, 0.0], [0.0, -300.0, 1.0]]])
    log_m = L.vocabulary_log_map(z, torch.ones(1, 2, dtype=torch.bool), 1.0)
    assert torch.isfinite(log_m).all()
    want = np.log(np_vocab_map(z.double().numpy(), np.ones((1, 2), bool), 1.0))
    close(log_m, want, rtol=1e-5)
    kl = L.vmm_kl_per_sample(log_m, log_m.flip(-1))
    assert torch.isfinite(kl).all()


@pytest.mark.parametrize("fn", ["token_ce", "uncertainty", "log_map", "map"])
def test_sequence_without_answer_position_raises(fn):
    z = torch.randn(3, 4, 5)
    labels = torch.zeros(3, 4, dtype=torch.long)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    call = {
        "token_ce": lambda: L.token_ce_per_sequence(z, labels, mask),
        "uncertainty": lambda: L.sequence_uncertainty_weights(z, mask),
        "log_map": lambda: L.vocabulary_log_map(z, mask, 1.0),
        "map": lambda: L.vocabulary_map(z, mask, 1.0),
    }[fn]
    with pytest.raises(ValueError, match=r"\[1\]"):
        call()


# --- uncertainty weights -----------------------------------------------------------------------------------

@SETTINGS
@given(seed=st.integers(0, 10_000), b=st.integers(1, 8), c=st.integers(2, 50), scale=st.floats(0.0, 1e4))
def test_uncertainty_weights_in_unit_interval(seed, b, c, scale):
    z = t32(np.random.default_rng(seed).normal(size=(b, c)) * scale)
    w = L.uncertainty_weights(z)
    assert w.shape == (b,) and w.dtype == torch.float32
    assert torch.isfinite(w).all() and (w >= 0).all() and (w <= 1).all()
    ws = L.sequence_uncertainty_weights(z.view(1, b, c), torch.ones(1, b, dtype=torch.bool))
    assert 0 <= ws.item() <= 1


@pytest.mark.parametrize("c", [2, 3, 10, 1000])
def test_uncertainty_weights_extremes(c):
    one_hot = torch.zeros(3, c)
    one_hot[:, 0] = 60.0
    one_hot[1, 0] = 1e4
    assert L.uncertainty_weights(one_hot).max().item() < 1e-6
    uniform = torch.zeros(2, c)
    uniform[1] += 123.0
    assert L.uncertainty_weights(uniform).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    seq = L.sequence_uncertainty_weights(torch.stack([one_hot[:2], uniform]), torch.ones(2, 2, dtype=torch.bool))
    assert seq.tolist() == pytest.approx([0.0, 1.0], abs=1e-6)


def test_uncertainty_weights_need_two_classes():
    with pytest.raises(ValueError):
        L.uncertainty_weights(torch.zeros(3, 1))


# --- temperatures ------------------------------------------------------------------------------------------

@SETTINGS
@given(seed=st.integers(0, 10_000), b=st.integers(1, 10), tau=st.floats(0.1, 10.0),
       lo=st.floats(0.1, 1.0), hi=st.floats(1.0, 5.0), c=st.floats(0.1, 100.0))
def test_temperature_bounds_and_batch_relative_scaling(seed, b, tau, lo, hi, c):
    l = t32(np.random.default_rng(seed).exponential(size=b) + 0.05)
    taus = L.temperature_from_losses(l, tau, lo, hi)
    assert taus.shape == (b,) and taus.dtype == torch.float32
    assert (taus >= tau * lo * (1 - 1e-6)).all() and (taus <= tau * hi * (1 + 1e-6)).all()
    close(taus, np_temperature(l.double().numpy(), tau, lo, hi, eps=0.0), rtol=1e-5, atol=1e-6)
    # batch-relative: scaling every loss by c changes nothing
    assert torch.allclose(L.temperature_from_losses(l * c, tau, lo, hi), taus, rtol=1e-4)
    # ordering: a larger teacher loss never gets a sharper target
    order = torch.argsort(l)
    assert (taus[order].diff() >= -1e-6).all()
    absolute = L.temperature_from_losses(l, tau, lo, hi, relative=False)
    close(absolute, np_temperature(l.double().numpy(), tau, lo, hi, relative=False), rtol=1e-5, atol=1e-6)


# --- dtypes ----------------------------------------------------------------------------------------------

HALF = [torch.float16, torch.bfloat16]


def _all_outputs(z_s, z_t, y, zt_s, zt_t, yt, mask, taus):
    s_log = L.vocabulary_log_map(zt_s, mask, taus)
    t_log = L.vocabulary_log_map(zt_t, mask, taus)
    return {
        "ce": L.per_sample_ce(z_s, y),
        "kl": L.kl_per_sample(z_s, z_t, taus),
        "lmbc": L.lmbc_loss(z_s, z_t, taus, torch.linspace(0, 1, len(y))),
        "w": L.uncertainty_weights(z_s),
        "tau": L.loss_scaled_temperature(z_t, y, 1.5),
        "dyn": L.dynamic_ce_loss(L.per_sample_ce(z_s, y), L.uncertainty_weights(z_s), 0.5),
        "tok_ce": L.token_ce_per_sequence(zt_s, yt, mask),
        "seq_w": L.sequence_uncertainty_weights(zt_s, mask),
        "log_map": s_log,
        "map": L.vocabulary_map(zt_s, mask, taus),
        "vmm_kl": L.vmm_kl_per_sample(s_log, t_log),
        "vmm": L.vmm_loss(s_log, t_log, taus),
    }


def _inputs(scale, seed=8):
    g = torch.Generator().manual_seed(seed)
    b, c, t, v = 4, 5, 6, 7
    return dict(
        z_s=torch.randn(b, c, generator=g) * scale, z_t=torch.randn(b, c, generator=g) * scale,
        y=torch.randint(0, c, (b,), generator=g),
        zt_s=torch.randn(b, t, v, generator=g) * scale, zt_t=torch.randn(b, t, v, generator=g) * scale,
        yt=torch.randint(0, v, (b, t), generator=g),
        mask=torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1], [1, 0, 1, 0, 1, 0]]).bool(),
        taus=torch.tensor([0.5, 1.0, 2.0, 3.0]),
    )


def _cast(inp, dtype):
    return {k: (v.to(dtype) if k in ("z_s", "z_t", "zt_s", "zt_t") else v) for k, v in inp.items()}


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_inputs_upcast(dtype):
    inp = _inputs(3.0)
    low = _all_outputs(**_cast(inp, dtype))
    # the same rounded values in float32: must agree (only the upcast differs)
    rounded = _all_outputs(**_cast(_cast(inp, dtype), torch.float32))
    full = _all_outputs(**inp)
    for k in low:
        assert low[k].dtype == torch.float32, k
        assert torch.isfinite(low[k]).all(), k
        assert torch.allclose(low[k], rounded[k], rtol=1e-5, atol=1e-6), k
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        assert torch.allclose(low[k], full[k], rtol=tol, atol=tol * 2), (k, low[k], full[k])


@pytest.mark.parametrize("dtype", HALF + [torch.float32])
def test_large_logits_stay_finite(dtype):
    inp = _cast(_inputs(1e4, seed=9), dtype)
    out = _all_outputs(**inp)
    for k, val in out.items():
        assert torch.isfinite(val).all(), (k, dtype)
        assert val.dtype == torch.float32
    # against float64 references on the same (rounded) values
    z_s, z_t = inp["z_s"].double().numpy(), inp["z_t"].double().numpy()
    y = inp["y"].numpy()
    taus = inp["taus"].double().numpy()
    close(out["ce"], np_ce(z_s, y), rtol=1e-5, atol=1e-2)
    _, kl = np_lmbc(z_s, z_t, taus)
    close(out["kl"], kl, rtol=1e-4, atol=1e-2)
    close(out["w"], np_entropy_weight(z_s), rtol=1e-4, atol=1e-5)
    m = inp["mask"].numpy()
    ref_map = np_vocab_map(inp["zt_s"].double().numpy(), m, taus)
    close(out["map"], ref_map, rtol=1e-4, atol=1e-6)
    close(out["map"].sum(-1), np.ones(4), rtol=0, atol=1e-5)
    close(out["tok_ce"], np_token_ce(inp["zt_s"].double().numpy(), inp["yt"].numpy(), m), rtol=1e-5, atol=1e-2)
    # gradients too
    z = inp["zt_s"].clone().requires_grad_()
    L.vmm_loss(L.vocabulary_log_map(z, inp["mask"], inp["taus"]),
               L.vocabulary_log_map(inp["zt_t"], inp["mask"], inp["taus"]), inp["taus"]).backward()
    assert z.grad.dtype == dtype and torch.isfinite(z.grad).all()
    zc = inp["z_s"].clone().requires_grad_()
    L.lmbc_loss(zc, inp["z_t"], inp["taus"]).backward()
    assert torch.isfinite(zc.grad).all()


# --- R-Drop (section 8.2) ----------------------------------------------------------------------------------------

def test_hand_worked_r_drop():
    # passes p_a = (1/2, 1/2) and p_b = (1/4, 3/4): KL(a||b) = 1/2 ln(4/3); KL(b||a) = 1/4 ln(1/2) + 3/4 ln(3/2)
    a, b = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, LN3]])
    sym = 0.5 * (0.5 * math.log(4 / 3) + 0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert L.symmetric_kl_per_sample(a, b).item() == pytest.approx(sym, rel=1e-6)
    assert L.symmetric_kl_per_sample(b, a).item() == pytest.approx(sym, rel=1e-6)
    # label 1: CE_a = ln 2, CE_b = ln(4/3); L = (ln 2 + ln(4/3)) / 2 + alpha * sym
    got = L.r_drop_loss(a, b, torch.tensor([1]), 0.7).item()
    assert got == pytest.approx(0.5 * (math.log(2) + math.log(4 / 3)) + 0.7 * sym, rel=1e-6)
    assert L.r_drop_loss(a, a, torch.tensor([1]), 5.0).item() == pytest.approx(math.log(2), rel=1e-6)


@SETTINGS
@given(seed=st.integers(0, 10_000), b=st.integers(1, 6), c=st.integers(2, 7), scale=st.floats(0.1, 20.0),
       alpha=st.floats(0.0, 5.0))
def test_r_drop_matches_reference(seed, b, c, scale, alpha):
    g = torch.Generator().manual_seed(seed)
    za, zb = torch.randn(b, c, generator=g) * scale, torch.randn(b, c, generator=g) * scale
    y = torch.randint(0, c, (b,), generator=g)
    la, lb = np_log_softmax(za.double().numpy()), np_log_softmax(zb.double().numpy())
    sym = 0.5 * (np_kl(la, lb) + np_kl(lb, la))
    np.testing.assert_allclose(L.symmetric_kl_per_sample(za, zb).double().numpy(), sym, rtol=1e-4, atol=1e-6)
    want = 0.5 * (np_ce(za.numpy(), y.numpy()).mean() + np_ce(zb.numpy(), y.numpy()).mean()) + alpha * sym.mean()
    assert L.r_drop_loss(za, zb, y, alpha).item() == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_r_drop_gradient_reaches_both_passes_symmetrically():
    """Both passes get gradient (neither is a detached target), and swapping them swaps the gradients."""
    g = torch.Generator().manual_seed(3)
    za, zb = torch.randn(4, 3, generator=g).requires_grad_(), torch.randn(4, 3, generator=g).requires_grad_()
    y = torch.tensor([0, 1, 2, 1])
    L.r_drop_loss(za, zb, y, 1.5).backward()
    ga, gb = za.grad.clone(), zb.grad.clone()
    za.grad, zb.grad = None, None
    L.r_drop_loss(zb, za, y, 1.5).backward()
    assert torch.allclose(za.grad, ga, atol=1e-6) and torch.allclose(zb.grad, gb, atol=1e-6)
    # the analytic gradient of the CE halves: (p - onehot) / (2B); the KL part vanishes where za == zb
    z = torch.randn(4, 3, generator=g).requires_grad_()
    L.r_drop_loss(z, z.detach().clone().requires_grad_(), y, 3.0).backward()
    onehot = torch.nn.functional.one_hot(y, 3).float()
    assert torch.allclose(z.grad, (torch.softmax(z.detach(), -1) - onehot) / 8, atol=1e-6)


# --- PS-KD (section 8.3) -----------------------------------------------------------------------------------------

def test_hand_worked_ps_kd():
    # prediction p = (1/4, 3/4), label 0, previous prediction (1/2, 1/2), a = 0.4:
    # target (0.8, 0.2); CE = -(0.8 ln 1/4 + 0.2 ln 3/4) = 0.8 ln 4 + 0.2 ln(4/3)
    z, y, prev = torch.tensor([[0.0, LN3]]), torch.tensor([0]), torch.tensor([[0.5, 0.5]])
    want = 0.8 * math.log(4) + 0.2 * math.log(4 / 3)
    assert L.ps_kd_loss(z, y, prev, 0.4).item() == pytest.approx(want, rel=1e-6)
    assert L.ps_kd_loss(z, y, prev, 0.0).item() == pytest.approx(math.log(4), rel=1e-6)  # a = 0: plain CE
    # H((1/2, 1/2), (1/4, 3/4)) = 1/2 ln 4 + 1/2 ln(4/3)
    assert L.soft_target_ce(z, prev).item() == pytest.approx(0.5 * math.log(4) + 0.5 * math.log(4 / 3), rel=1e-6)


@SETTINGS
@given(seed=st.integers(0, 10_000), b=st.integers(1, 6), c=st.integers(2, 7), scale=st.floats(0.1, 20.0))
def test_ps_kd_matches_reference(seed, b, c, scale):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, generator=g) * scale
    y = torch.randint(0, c, (b,), generator=g)
    prev = torch.softmax(torch.randn(b, c, generator=g) * scale, -1)
    a = torch.rand(b, generator=g)
    a64 = a.double().numpy()[:, None]
    target = (1 - a64) * np.eye(c)[y.numpy()] + a64 * prev.double().numpy()
    want = -(target * np_log_softmax(z.double().numpy())).sum(-1).mean()
    assert L.ps_kd_loss(z, y, prev, a).item() == pytest.approx(want, rel=1e-4, abs=1e-5)
    # the same as (1 - a) CE + a H(p_prev, p)
    split = ((1 - a) * L.per_sample_ce(z, y) + a * L.soft_target_ce(z, prev)).mean()
    assert L.ps_kd_loss(z, y, prev, a).item() == pytest.approx(split.item(), rel=1e-5, abs=1e-6)


# --- KD (section 8.4) --------------------------------------------------------------------------------------------

def test_hand_worked_kd():
    # student (0, 2 ln 3) at tau 2 is (1/4, 3/4); teacher (0, 0) uniform; label 1:
    # CE at tau 1 = ln(1 + 9) - 2 ln 3 = ln(10/9); tau^2 KL = 4 * 1/2 ln(4/3)
    s, t, y = torch.tensor([[0.0, 2 * LN3]]), torch.tensor([[0.0, 0.0]]), torch.tensor([1])
    want = 0.75 * math.log(10 / 9) + 0.25 * 4 * 0.5 * math.log(4 / 3)
    assert L.kd_loss(s, t, y, 0.25, 2.0).item() == pytest.approx(want, rel=1e-6)
    assert L.kd_loss(s, t, y, 0.0, 2.0).item() == pytest.approx(math.log(10 / 9), rel=1e-6)  # alpha 0: CE
    assert L.kd_loss(s, t, y, 1.0, 2.0).item() == pytest.approx(2 * math.log(4 / 3), rel=1e-6)  # alpha 1: KD only
