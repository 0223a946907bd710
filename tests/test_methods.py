"""The methods registry (section 5 of docs/method.md), the per-rank LogitCache and each method's loss, by hand
and through the recipe's own `train_step` on toy models (a classifier and a decoder-style token model) driven
by the method's sampler."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from raysdpb import methods as M
from raysdpb.config import TrialConfig
from raysdpb.data import TokenizedDataset
from raysdpb.errors import UserError
from raysdpb.methods import METHODS, ClassOutputs, LogitCache, MethodParams, TeacherState, TokenOutputs, get_method
from raysdpb.recipe import Recipe
from raysdpb.sampler import ShuffledBatchSampler

# method -> (loader, shuffle, epoch multiplier, soft targets, forward passes), the table of section 5
TABLE = {
    "finetune": ("plain", True, 1, "none", 1),
    "double_finetune": ("plain", True, 2, "none", 1),
    "sequential_dlb": ("overlap", False, 1, "previous_batch", 1),
    "random_dlb": ("overlap", True, 1, "previous_batch", 1),
    "dynamic_finetune": ("plain", True, 1, "none", 1),
    "dynsdpb": ("overlap", True, 1, "previous_batch", 1),
    "dynsdpb_alpha_only": ("overlap", True, 1, "previous_batch", 1),
    "dynsdpb_tau_only": ("overlap", True, 1, "previous_batch", 1),
    "r_drop": ("plain", True, 1, "other_pass", 2),
    "ps_kd": ("plain", True, 1, "previous_epoch", 1),
    "kd": ("plain", True, 1, "teacher", 1),
}
# the methods defined for classifiers only (refused for a decoder task at config time)
CLASSIFIERS_ONLY = {"r_drop", "ps_kd", "kd"}
# the methods whose alpha_i (uncertainty) and tau_i (teacher loss) are per sample
DYNAMIC_ALPHA = {"dynsdpb", "dynsdpb_alpha_only"}
DYNAMIC_TAU = {"dynsdpb", "dynsdpb_tau_only"}


# --- float64 references ----------------------------------------------------------------------------------

def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_ce(z, y):
    return -np_log_softmax(z)[np.arange(len(y)), np.asarray(y)]


def np_kl(p_log, q_log):
    return (np.exp(p_log) * (p_log - q_log)).sum(-1)


def np_weight(z):
    lp = np_log_softmax(z)
    return -(np.exp(lp) * lp).sum(-1) / math.log(z.shape[-1])


def np_token_stats(z, y, mask):
    """Per-sequence mean token CE and mean token entropy / log V over the answer positions."""
    ce, w = [], []
    for i in range(z.shape[0]):
        rows, labels = z[i][mask[i]], y[i][mask[i]]
        ce.append(np_ce(rows, labels).mean())
        w.append(np_weight(rows).mean())
    return np.array(ce), np.array(w)


def np_log_map(z, mask, taus):
    out = []
    for i in range(z.shape[0]):
        p = np.exp(np_log_softmax(z[i][mask[i]] / taus[i]))
        out.append(np.log(p.mean(0)))
    return np.stack(out)


def np_tau(l, tau, lo, hi):
    return tau * np.clip(l / l.mean(), lo, hi)


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# --- registry -------------------------------------------------------------------------------------------

def test_registry_is_the_table_of_section_5():
    assert set(METHODS) == set(TABLE)
    for name, (loader, shuffle, mult, targets, passes) in TABLE.items():
        m = get_method(name)
        assert m.name == name
        assert (m.loader, m.shuffle, m.epoch_multiplier, m.soft_targets, m.forward_passes) == \
            (loader, shuffle, mult, targets, passes), name
        assert m.distills == (targets != "none"), name
    assert set(get_method("dynsdpb").hyperparameters) >= {"alpha", "tau"}
    assert set(get_method("random_dlb").hyperparameters) == {"alpha", "tau"}
    # each ablation names only the hyperparameters of the part it keeps
    assert set(get_method("dynsdpb_alpha_only").hyperparameters) == {"alpha", "tau"}
    assert set(get_method("dynsdpb_tau_only").hyperparameters) == set(get_method("dynsdpb").hyperparameters)
    assert get_method("finetune").hyperparameters == ()
    assert "alpha" in get_method("dynamic_finetune").hyperparameters


def test_registry_says_which_kinds_of_task_each_method_trains():
    for name, method in METHODS.items():
        want = M.CLASSIFIER_KINDS if name in CLASSIFIERS_ONLY else M.ALL_KINDS
        assert method.kinds == want, name


@pytest.mark.parametrize("name", sorted(CLASSIFIERS_ONLY))
def test_a_classifier_method_on_a_decoder_task_is_one_clear_error(name):
    from raysdpb.config import load_trial_config

    with pytest.raises(UserError, match=rf"method {name} is defined for classifiers only .* nlg/gsm8k is a "
                                        r"generation task; choose one of: finetune, .*dynsdpb"):
        load_trial_config(None, raw=dict(task="nlg/gsm8k", model="tiny-llama", method=name, teacher_model="/t"))
    # multiple choice: class distributions
    TrialConfig(task="superglue/copa", model="tiny-bert", method=name, teacher_model="/t")


def test_registry_refuses_unknown_and_duplicate_names():
    with pytest.raises(UserError, match="dynsdpb"):
        get_method("no_such_method")
    with pytest.raises(ValueError):
        M.register(METHODS["finetune"])
    assert set(METHODS) == set(TABLE)


def test_teacher_state_of_a_method_without_distillation():
    out = ClassOutputs(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(AssertionError):
        METHODS["finetune"].teacher_state(out.slice(slice(2, None)), torch.tensor([5, 6]), MethodParams())


# --- LogitCache -------------------------------------------------------------------------------------------

def _state(indices, c=3):
    g = torch.Generator().manual_seed(len(indices))
    return TeacherState(torch.tensor(indices), torch.randn(len(indices), c, generator=g),
                        torch.linspace(0.5, 2.0, len(indices)))


def test_logit_cache_take_checks_the_overlap():
    cache = LogitCache()
    assert not cache and cache.take(torch.tensor([1, 2])) is None
    cache.put(_state([4, 7, 9]))
    assert cache
    with pytest.raises(RuntimeError, match="first half"):
        cache.take(torch.tensor([4, 7, 8]))
    cache.put(_state([4, 7, 9]))
    with pytest.raises(RuntimeError):
        cache.take(torch.tensor([7, 4, 9]))   # same samples, wrong order
    cache.put(_state([4, 7, 9]))
    with pytest.raises(RuntimeError):
        cache.take(torch.tensor([4, 7]))      # wrong length
    state = _state([4, 7, 9])
    cache.put(state)
    got = cache.take(torch.tensor([4, 7, 9], dtype=torch.int32))
    assert torch.equal(got.target, state.target) and torch.equal(got.tau, state.tau)
    assert cache.take(torch.tensor([4, 7, 9])) is None, "take consumes the cached state"
    cache.put(_state([1]))
    cache.clear()
    assert not cache and cache.take(torch.tensor([1])) is None


def test_logit_cache_state_dict_round_trip():
    import io

    cache = LogitCache()
    assert cache.state_dict() == {}
    restored = LogitCache()
    restored.load_state_dict(cache.state_dict())
    assert not restored

    state = _state([3, 1, 4, 1, 5])
    cache.put(state)
    buffer = io.BytesIO()
    torch.save(cache.state_dict(), buffer)
    buffer.seek(0)
    restored = LogitCache()
    restored.load_state_dict(torch.load(buffer))
    got = restored.take(torch.tensor([3, 1, 4, 1, 5]), device="cpu")
    assert torch.equal(got.indices, state.indices)
    assert torch.equal(got.target, state.target)
    assert torch.equal(got.tau, state.tau)


def test_logit_cache_catches_a_non_overlapping_sampler():
    """With a plain sampler the cached samples are not the next first half: take must raise, not distil."""
    method = METHODS["random_dlb"]
    sampler = ShuffledBatchSampler(40, 8, seed=0)
    cache = LogitCache()
    batches = iter(sampler)
    first = torch.tensor(next(batches))
    out = ClassOutputs(torch.randn(8, 3), torch.zeros(8, dtype=torch.long))
    cache.put(method.teacher_state(out.slice(slice(4, None)), first[4:], MethodParams()))
    second = torch.tensor(next(batches))
    with pytest.raises(RuntimeError):
        cache.take(second[:4])


# --- losses by hand ---------------------------------------------------------------------------------------

def _class_batch(seed, b=6, c=4, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * scale, torch.randint(0, c, (b,), generator=g)


@pytest.mark.parametrize("name", ["random_dlb", "sequential_dlb"])
def test_dlb_loss_is_ce_plus_alpha_lmbc_by_hand(name):
    method, params = METHODS[name], MethodParams(alpha=0.7, tau=2.5)
    prev_logits, prev_labels = _class_batch(0)
    logits, labels = _class_batch(1)
    indices = torch.tensor([10, 11, 12, 13, 14, 15])
    teacher = method.teacher_state(ClassOutputs(prev_logits, prev_labels).slice(slice(3, None)), indices[3:], params)
    assert torch.equal(teacher.target, prev_logits[3:]) and not teacher.target.requires_grad
    assert teacher.tau.tolist() == [2.5, 2.5, 2.5]

    z = logits.clone().requires_grad_()
    terms = method.loss(ClassOutputs(z, labels), teacher, params)
    ce = np_ce(f64(logits), labels.numpy()).mean()
    t = 2.5
    kl = np_kl(np_log_softmax(f64(prev_logits[3:]) / t), np_log_softmax(f64(logits[:3]) / t))
    lmbc = t ** 2 * kl.mean()
    assert terms.total.item() == pytest.approx(ce + 0.7 * lmbc, rel=1e-5)
    assert terms.ce.item() == pytest.approx(ce, rel=1e-5)
    assert terms.distill.item() == pytest.approx(lmbc, rel=1e-5)
    assert terms.alpha.tolist() == pytest.approx([0.7] * 3)
    terms.total.backward()
    assert torch.isfinite(z.grad).all()
    # the second half gets only the CE gradient
    onehot = torch.nn.functional.one_hot(labels, 4).double()
    ce_grad = (torch.softmax(logits.double(), -1) - onehot) / 6
    assert torch.allclose(z.grad[3:].double(), ce_grad[3:], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(z.grad[:3].double(), ce_grad[:3], rtol=1e-3, atol=1e-5)


def test_first_step_without_teacher_is_plain_ce():
    logits, labels = _class_batch(2)
    ce = np_ce(f64(logits), labels.numpy()).mean()
    for name in ("random_dlb", "sequential_dlb", "dynsdpb", "dynsdpb_alpha_only", "dynsdpb_tau_only", "finetune",
                 "double_finetune"):
        terms = METHODS[name].loss(ClassOutputs(logits, labels), None, MethodParams(alpha=3.0, tau=4.0))
        assert terms.total.item() == pytest.approx(ce, rel=1e-6), name
        assert terms.distill is None


def test_dynamic_finetune_by_hand():
    params = MethodParams(alpha=0.8)
    logits, labels = _class_batch(3, b=8, c=5)
    terms = METHODS["dynamic_finetune"].loss(ClassOutputs(logits, labels), None, params)
    ce, w = np_ce(f64(logits), labels.numpy()), np_weight(f64(logits))
    assert terms.total.item() == pytest.approx(np.mean((1 + 0.8 * w) * ce), rel=1e-5)
    assert terms.ce.item() == pytest.approx(ce.mean(), rel=1e-5)
    np.testing.assert_allclose(f64(terms.alpha), 0.8 * w, rtol=1e-4, atol=1e-6)
    assert terms.distill is None


def test_dynsdpb_classification_by_hand():
    params = MethodParams(alpha=0.9, tau=2.0, tau_min_scale=0.6, tau_max_scale=1.5)
    method = METHODS["dynsdpb"]
    prev_logits, prev_labels = _class_batch(4, b=8, c=3, scale=3.0)
    logits, labels = _class_batch(5, b=8, c=3, scale=3.0)
    teacher = method.teacher_state(ClassOutputs(prev_logits, prev_labels).slice(slice(4, None)),
                                   torch.arange(4, 8), params)
    # tau_i from the teacher's own CE, batch-relative over the cached half, clamped
    l = np_ce(f64(prev_logits[4:]), prev_labels[4:].numpy())
    taus = np_tau(l, 2.0, 0.6, 1.5)
    np.testing.assert_allclose(f64(teacher.tau), taus, rtol=1e-5)

    terms = method.loss(ClassOutputs(logits, labels), teacher, params)
    z = f64(logits)
    w = np_weight(z[:4])
    kl = np_kl(np_log_softmax(f64(prev_logits[4:]) / taus[:, None]), np_log_softmax(z[:4] / taus[:, None]))
    want = np_ce(z, labels.numpy()).mean() + np.mean(0.9 * w * taus ** 2 * kl)
    assert terms.total.item() == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(f64(terms.alpha), 0.9 * w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(f64(terms.tau), taus, rtol=1e-5)
    assert terms.distill.item() == pytest.approx(np.mean(taus ** 2 * kl), rel=1e-5)


@pytest.mark.parametrize("name", ["dynsdpb_alpha_only", "dynsdpb_tau_only"])
def test_dynsdpb_ablations_by_hand(name):
    """Each ablation keeps one of DynSDPB's two dynamic parts: alpha_only its alpha_i = alpha * w_i at DLB's fixed
    tau; tau_only its teacher-loss tau_i with DLB's constant alpha."""
    params = MethodParams(alpha=0.9, tau=2.0, tau_min_scale=0.6, tau_max_scale=1.5)
    method = METHODS[name]
    prev_logits, prev_labels = _class_batch(4, b=8, c=3, scale=3.0)
    logits, labels = _class_batch(5, b=8, c=3, scale=3.0)
    teacher = method.teacher_state(ClassOutputs(prev_logits, prev_labels).slice(slice(4, None)),
                                   torch.arange(4, 8), params)
    if name == "dynsdpb_tau_only":
        taus = np_tau(np_ce(f64(prev_logits[4:]), prev_labels[4:].numpy()), 2.0, 0.6, 1.5)
        assert taus.std() > 0  # really per sample here
    else:
        taus = np.full(4, 2.0)
    np.testing.assert_allclose(f64(teacher.tau), taus, rtol=1e-5)

    terms = method.loss(ClassOutputs(logits, labels), teacher, params)
    z = f64(logits)
    alphas = 0.9 * np_weight(z[:4]) if name == "dynsdpb_alpha_only" else np.full(4, 0.9)
    kl = np_kl(np_log_softmax(f64(prev_logits[4:]) / taus[:, None]), np_log_softmax(z[:4] / taus[:, None]))
    want = np_ce(z, labels.numpy()).mean() + np.mean(alphas * taus ** 2 * kl)
    assert terms.total.item() == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(f64(terms.alpha), alphas, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(f64(terms.tau), taus, rtol=1e-5)
    assert terms.distill.item() == pytest.approx(np.mean(taus ** 2 * kl), rel=1e-5)


def test_r_drop_by_hand_through_step_loss():
    """R-Drop of two passes: the CE of both halved, alpha times the mean symmetric KL, over the whole batch."""
    method, params = METHODS["r_drop"], MethodParams(alpha=0.6, tau=3.0)  # tau: not R-Drop's (no temperature)
    (za, y), (zb, _) = _class_batch(8, b=6, c=4), _class_batch(9, b=6, c=4)
    terms = method.step_loss([ClassOutputs(za, y), ClassOutputs(zb, y)], None, params)
    la, lb = np_log_softmax(f64(za)), np_log_softmax(f64(zb))
    sym = 0.5 * (np_kl(la, lb) + np_kl(lb, la))
    ce = 0.5 * (np_ce(f64(za), y.numpy()).mean() + np_ce(f64(zb), y.numpy()).mean())
    assert terms.total.item() == pytest.approx(ce + 0.6 * sym.mean(), rel=1e-5)
    assert terms.ce.item() == pytest.approx(ce, rel=1e-5)
    assert terms.distill.item() == pytest.approx(sym.mean(), rel=1e-5)
    with pytest.raises(ValueError, match="2 forward pass"):
        method.step_loss([ClassOutputs(za, y)], None, params)


def test_two_forward_passes_draw_their_own_dropout_masks():
    """`forward_passes`: the batch repeated, one forward, split: with dropout the passes differ (and each is a
    forward of the batch); without it (eval mode) they are the same logits, so R-Drop's KL is zero."""
    from raysdpb.recipe.recipe import forward_passes

    torch.manual_seed(0)
    model = _ClassModel(dropout=0.3)
    x, y = _class_data()
    batch = {"input_ids": x[:8], "labels": y[:8], "index": torch.arange(8)}
    first, second = forward_passes(model, batch, "classification", 2)
    assert first.logits.shape == second.logits.shape == (8, CLASSES)
    assert torch.equal(first.labels, y[:8]) and torch.equal(second.labels, y[:8])
    assert not torch.allclose(first.logits, second.logits)
    model.eval()
    first, second = forward_passes(model, batch, "classification", 2)
    assert torch.equal(first.logits, second.logits)
    assert torch.allclose(first.logits, model(x[:8]).logits)
    terms = METHODS["r_drop"].step_loss([first, second], None, MethodParams(alpha=2.0))
    assert terms.distill.item() == 0.0 and terms.total.item() == pytest.approx(terms.ce.item())


def test_ps_kd_alpha_mixes_two_targets_so_it_is_at_most_one():
    from raysdpb.config import load_trial_config

    with pytest.raises(UserError, match=r"ps_kd: alpha mixes its two targets, so it must lie in \[0, 1\]; got "
                                        r"alpha=1.5"):
        load_trial_config(None, raw=dict(task="superglue/cb", model="tiny-bert", method="ps_kd", alpha=1.5))
    assert TrialConfig(task="superglue/cb", model="tiny-bert", method="dynsdpb", alpha=1.5).alpha == 1.5


def test_ps_kd_memory_across_epochs_by_hand():
    """The memory hands epoch e the predictions recorded when each example was last trained on, weighted
    (e + 1) / T (0 where it has none); nothing in the first epoch; the loss is then PS-KD's by hand."""
    from raysdpb.soft_targets import EpochMemory

    params = MethodParams(alpha=0.8)
    memory = EpochMemory(num_examples=10, total_epochs=4)
    z0, y0 = _class_batch(10, b=4, c=3)
    assert memory.take(torch.tensor([1, 3, 5, 7]), "cpu", 0) is None  # nothing recorded, and the first epoch
    memory.put(torch.tensor([1, 3, 5, 7]), ClassOutputs(z0, y0), params)
    assert memory.take(torch.tensor([1, 3]), "cpu", 0) is None  # the first epoch is plain CE whatever is recorded
    z1, _ = _class_batch(11, b=4, c=3)
    memory.put(torch.tensor([3, 0, 2, 4]), ClassOutputs(z1, y0), params)  # 3 again: the later prediction wins
    got = memory.take(torch.tensor([7, 3, 9, 1]), "cpu", 2)
    want = np.stack([np.exp(np_log_softmax(f64(z0[3]))), np.exp(np_log_softmax(f64(z1[0]))), np.zeros(3),
                     np.exp(np_log_softmax(f64(z0[0])))])
    np.testing.assert_allclose(f64(got.target), want, rtol=1e-6, atol=1e-7)
    assert got.weight.tolist() == pytest.approx([0.75, 0.75, 0.0, 0.75])  # epoch index 2 of 4: t / T = 3 / 4

    z, y = _class_batch(12, b=4, c=3)
    terms = METHODS["ps_kd"].loss(ClassOutputs(z, y), got, params)
    a = 0.8 * np.array([0.75, 0.75, 0.0, 0.75])
    target = (1 - a)[:, None] * np.eye(3)[y.numpy()] + a[:, None] * want
    assert terms.total.item() == pytest.approx(-(target * np_log_softmax(f64(z))).sum(-1).mean(), rel=1e-5)
    np.testing.assert_allclose(f64(terms.alpha), a, rtol=1e-6)
    assert terms.ce.item() == pytest.approx(np_ce(f64(z), y.numpy()).mean(), rel=1e-5)
    assert METHODS["ps_kd"].loss(ClassOutputs(z, y), None, params).total.item() == pytest.approx(terms.ce.item())

    # the state round-trips, and refuses a memory of another training set
    restored = EpochMemory(num_examples=10, total_epochs=4)
    restored.load_state_dict(memory.state_dict())
    again = restored.take(torch.tensor([7, 3, 9, 1]), "cpu", 2)
    assert torch.equal(again.target, got.target) and torch.equal(again.weight, got.weight)
    with pytest.raises(ValueError, match="holds 10 examples, this trial trains on 12"):
        EpochMemory(num_examples=12, total_epochs=4).load_state_dict(memory.state_dict())


def test_ps_kd_memory_gathers_every_ranks_predictions():
    """Under DDP an example may come to another rank next epoch: each step's predictions of all ranks are kept."""
    from raysdpb.soft_targets import EpochMemory

    z, y = _class_batch(13, b=2, c=3)
    other = torch.tensor([[6.0, 0.0, 0.0, 0.0], [8.0, 0.0, 5.0, 0.0]])  # rank 1's (index, p) rows
    memory = EpochMemory(num_examples=10, total_epochs=2, gather=lambda rows: [rows, other])
    memory.put(torch.tensor([1, 2]), ClassOutputs(z, y), MethodParams())
    got = memory.take(torch.tensor([8, 1, 6]), "cpu", 1)
    assert got.weight.tolist() == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(f64(got.target[0]), [0.0, 5.0, 0.0])
    np.testing.assert_allclose(f64(got.target[1]), np.exp(np_log_softmax(f64(z[0]))), rtol=1e-6)


def test_kd_by_hand_from_the_teacher_table():
    """KD's loss of a batch against the teacher table's rows of its indices: (1 - alpha) CE + alpha tau^2 KL."""
    from raysdpb.soft_targets import TeacherTable

    table, _ = _class_batch(14, b=10, c=3, scale=3.0)
    z, y = _class_batch(15, b=4, c=3)
    indices = torch.tensor([9, 0, 4, 4])
    targets = TeacherTable(table).take(indices, "cpu", 0)
    assert torch.equal(targets.target, table[indices])
    params = MethodParams(alpha=0.3, tau=2.5)
    terms = METHODS["kd"].loss(ClassOutputs(z, y), targets, params)
    kl = np_kl(np_log_softmax(f64(table[indices]) / 2.5), np_log_softmax(f64(z) / 2.5))
    ce = np_ce(f64(z), y.numpy()).mean()
    assert terms.total.item() == pytest.approx(0.7 * ce + 0.3 * 2.5 ** 2 * kl.mean(), rel=1e-5)
    assert terms.distill.item() == pytest.approx(2.5 ** 2 * kl.mean(), rel=1e-5)
    assert terms.ce.item() == pytest.approx(ce, rel=1e-5)


def _token_batch(seed, b=4, t=6, v=9, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, t, v, generator=g) * scale
    y = torch.randint(0, v, (b, t), generator=g)
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i in range(b):  # prompt, answer, padding: answer lengths differ
        start = i % 2
        mask[i, start:start + 2 + i] = True
    return z, y, mask


@pytest.mark.parametrize("name", ["dynsdpb", "random_dlb", "dynsdpb_alpha_only", "dynsdpb_tau_only"])
def test_vmm_losses_by_hand(name):
    params = MethodParams(alpha=0.6, tau=1.5)
    method = METHODS[name]
    pz, py, pm = _token_batch(6)
    z, y, m = _token_batch(7)
    teacher = method.teacher_state(TokenOutputs(pz, py, pm).slice(slice(2, None)), torch.tensor([8, 9]), params)
    l_prev, _ = np_token_stats(f64(pz[2:]), py[2:].numpy(), pm[2:].numpy())
    taus = np_tau(l_prev, 1.5, 0.5, 2.0) if name in DYNAMIC_TAU else np.full(2, 1.5)
    np.testing.assert_allclose(f64(teacher.tau), taus, rtol=1e-5)
    # the cache holds a V-sized log vocabulary map per sequence, at the teacher's tau_i
    assert teacher.target.shape == (2, 9) and not teacher.target.requires_grad
    t_map = np_log_map(f64(pz[2:]), pm[2:].numpy(), taus)
    np.testing.assert_allclose(f64(teacher.target), t_map, rtol=1e-4, atol=1e-5)

    zz = z.clone().requires_grad_()
    terms = method.loss(TokenOutputs(zz, y, m), teacher, params)
    ce, w = np_token_stats(f64(z), y.numpy(), m.numpy())
    s_map = np_log_map(f64(z[:2]), m[:2].numpy(), taus)
    kl = np_kl(t_map, s_map)
    alpha = 0.6 * (w[:2] if name in DYNAMIC_ALPHA else np.ones(2))
    assert terms.total.item() == pytest.approx(ce.mean() + np.mean(alpha * taus ** 2 * kl), rel=1e-5)
    assert terms.ce.item() == pytest.approx(ce.mean(), rel=1e-5)
    terms.total.backward()
    assert torch.isfinite(zz.grad).all() and (zz.grad[~m] == 0).all()


def test_dynamic_finetune_tokens_by_hand():
    z, y, m = _token_batch(8)
    terms = METHODS["dynamic_finetune"].loss(TokenOutputs(z, y, m), None, MethodParams(alpha=1.3))
    ce, w = np_token_stats(f64(z), y.numpy(), m.numpy())
    assert terms.total.item() == pytest.approx(np.mean((1 + 1.3 * w) * ce), rel=1e-5)


# --- tiny training loops ------------------------------------------------------------------------------------

N_CLASS, DIM, CLASSES = 192, 10, 3
N_TOK, T, V = 96, 8, 12
BATCH = 16
STEPS = 36
PARAMS = MethodParams(alpha=0.8, tau=2.0, tau_min_scale=0.5, tau_max_scale=2.0)


def _class_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_CLASS, DIM, generator=g)
    w = torch.randn(DIM, CLASSES, generator=g)
    return x, (x @ w).argmax(-1)


def _token_data():
    """Sequences whose next token follows from the current one (x_{t+1} = 3 x_t + 1 mod V), with a random span of
    answer positions (at least one after the first token, which predicts nothing)."""
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(N_TOK, T, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (N_TOK,), generator=g)
    for t in range(1, T):
        x[:, t] = (3 * x[:, t - 1] + 1) % V
    mask = torch.zeros(N_TOK, T, dtype=torch.long)
    starts = torch.randint(1, 4, (N_TOK,), generator=g)
    lengths = torch.randint(1, T - 3, (N_TOK,), generator=g)
    for i in range(N_TOK):
        mask[i, starts[i]:starts[i] + lengths[i]] = 1
    return x, mask


def _perfect_teacher_logits():
    """The logits of the rule that labels `_class_data` (x @ w), as a teacher's table."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_CLASS, DIM, generator=g)
    return 2.0 * (x @ torch.randn(DIM, CLASSES, generator=g))


class _ClassModel(torch.nn.Module):
    """A tiny classifier with a Hugging Face model's call: `model(input_ids=...).logits` (features here); dropout
    before the output layer when asked (R-Drop needs some)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        layers = [torch.nn.Linear(DIM, 32), torch.nn.Tanh()] + ([torch.nn.Dropout(dropout)] if dropout else [])
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(32, CLASSES))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.net(input_ids))


class _TokenModel(torch.nn.Module):
    """A tiny causal token model with a Hugging Face model's call: `model(input_ids=..., use_cache=...).logits`."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, 24)
        self.pos = torch.nn.Parameter(torch.zeros(T, 24))
        self.out = torch.nn.Linear(24, V)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.out(torch.tanh(self.emb(input_ids) + self.pos)))


def _recipe(name: str, kind: str, params: MethodParams, epochs: int) -> Recipe:
    """The real recipe, set up step by step with a toy model and data in its format (items with `index`)."""
    task = "superglue/cb" if kind == "class" else "nlg/gsm8k"  # a classification and a generation task
    cfg = TrialConfig(task=task, model="tiny-bert", method=name, alpha=params.alpha, tau=params.tau,
                      teacher_model="/toy-teacher" if name == "kd" else None,
                      tau_min_scale=params.tau_min_scale, tau_max_scale=params.tau_max_scale, lr=0.02,
                      weight_decay=0.0, max_grad_norm=None, batch_size=BATCH, epochs=epochs, seed=1,
                      progress_bar=False)
    recipe = Recipe(cfg)
    recipe.setup_runtime()
    if kind == "class":
        x, y = _class_data()
        items = [{"input_ids": x[i], "labels": y[i], "index": i} for i in range(N_CLASS)]
        model = _ClassModel(dropout=0.1 if recipe.method.forward_passes > 1 else 0.0)
    else:
        x, mask = _token_data()
        items = [{"input_ids": x[i], "attention_mask": torch.ones(T, dtype=torch.long), "answer_mask": mask[i],
                  "index": i} for i in range(N_TOK)]
        model = _TokenModel()
    recipe.setup_data(TokenizedDataset(items, "toy"), [])
    if recipe.method.soft_targets == "teacher":  # the rule that labels the data, as a teacher's logits
        recipe.teacher_logits = _perfect_teacher_logits
    recipe.setup_model(model)
    recipe.setup_loader(default_collate)
    recipe.setup_optimization()
    return recipe


def _train(name: str, kind: str, params: MethodParams = PARAMS, steps: int = STEPS):
    """`steps` of `Recipe.train_step` over the recipe's own loader (the method's sampler), across epochs."""
    torch.manual_seed(0)
    recipe = _recipe(name, kind, params, epochs=8)  # more than enough epochs for `steps` of every method
    log, epoch_of_step = [], []
    for epoch in range(recipe.total_epochs):
        recipe.sampler.set_epoch(epoch)
        for batch in recipe.loader:
            terms = recipe.train_step(batch)
            assert terms is not None
            log.append(terms)
            epoch_of_step.append(epoch)
            if len(log) >= steps:
                return recipe.method, log, epoch_of_step
    raise AssertionError(f"{name}: {len(log)} steps in {recipe.total_epochs} epochs, fewer than {steps}")


def _check_run(name, kind, params=PARAMS):
    method, log, epochs = _train(name, kind, params)
    totals = np.array([t.total.item() for t in log])
    ces = np.array([t.ce.item() for t in log])
    assert np.isfinite(totals).all() and np.isfinite(ces).all()
    assert totals[-5:].mean() < totals[:5].mean(), (name, kind, totals)
    assert ces[-5:].mean() < 0.8 * ces[:5].mean(), (name, kind, ces)
    if method.loader == "overlap":
        assert epochs[-1] >= 1, "the run must cross an epoch boundary"
    half = BATCH // 2
    if method.soft_targets == "previous_epoch":  # PS-KD: plain CE in the first epoch, then the memory's targets
        assert epochs[-1] >= 1
        for terms, epoch in zip(log, epochs):
            if epoch == 0:
                assert terms.distill is None and terms.total.item() == pytest.approx(terms.ce.item(), rel=1e-6)
            else:
                assert terms.distill is not None and terms.tau is None
                assert torch.allclose(terms.alpha, torch.full((BATCH,), params.alpha * (epoch + 1) / 8))
        assert max(abs(t.total.item() - t.ce.item()) for t, e in zip(log, epochs) if e >= 1) > 1e-3
        return log
    if method.distills:  # the soft targets really pull: a clearly positive term early in the run
        early = [t.total.item() - t.ce.item() for t in log[1:6]]
        assert max(early) > 1e-3, (name, kind, early)
    for step, terms in enumerate(log):
        if not method.distills:
            assert terms.distill is None and terms.tau is None
            if name == "dynamic_finetune":
                assert terms.alpha.shape == (BATCH,)
                assert (terms.alpha >= 0).all() and (terms.alpha <= params.alpha + 1e-6).all()
                assert terms.total.item() >= terms.ce.item() - 1e-6
            else:
                assert terms.total.item() == pytest.approx(terms.ce.item(), rel=1e-6)
            continue
        if method.soft_targets == "teacher":  # KD: the teacher's table, from the first step on
            assert terms.alpha is None and terms.tau is None and terms.distill.item() >= -1e-6
            assert terms.total.item() == pytest.approx((1 - params.alpha) * terms.ce.item()
                                                       + params.alpha * terms.distill.item(), rel=1e-5, abs=1e-7)
            continue
        if method.soft_targets == "other_pass":  # R-Drop: the other dropout pass, from the first step on
            assert terms.alpha is None and terms.tau is None and terms.distill.item() >= -1e-6
            assert terms.total.item() == pytest.approx(terms.ce.item() + params.alpha * terms.distill.item(),
                                                       rel=1e-5, abs=1e-7)
            continue
        if step == 0:  # no previous mini-batch yet: CE only
            assert terms.distill is None and terms.total.item() == pytest.approx(terms.ce.item(), rel=1e-6)
            continue
        assert terms.distill is not None, f"{name}: no distillation term at step {step}"
        distill = terms.distill.item()
        assert math.isfinite(distill) and distill >= -1e-6  # a KL (float32 rounding near zero)
        assert terms.alpha.shape == (half,) and terms.tau.shape == (half,)
        extra = terms.total.item() - terms.ce.item()
        # 0 <= mean(alpha_i tau_i^2 KL_i) <= alpha * mean(tau_i^2 KL_i) since 0 <= alpha_i <= alpha
        assert -1e-6 <= extra <= params.alpha * distill * (1 + 1e-5) + 1e-6
        if name in DYNAMIC_ALPHA:
            assert (terms.alpha >= 0).all() and (terms.alpha <= params.alpha + 1e-6).all()
        else:
            assert torch.allclose(terms.alpha, torch.full((half,), params.alpha))
        if name in DYNAMIC_TAU:
            lo, hi = params.tau * params.tau_min_scale, params.tau * params.tau_max_scale
            assert (terms.tau >= lo - 1e-6).all() and (terms.tau <= hi + 1e-6).all()
        else:
            assert torch.allclose(terms.tau, torch.full((half,), params.tau))
        if name not in DYNAMIC_ALPHA:
            assert terms.total.item() == pytest.approx(terms.ce.item() + params.alpha * terms.distill.item(),
                                                       rel=1e-5, abs=1e-7)
    return log


@pytest.mark.parametrize("name", sorted(METHODS))
def test_training_classifier(name):
    _check_run(name, "class")


@pytest.mark.parametrize("name", sorted(set(METHODS) - CLASSIFIERS_ONLY))
def test_training_token_model(name):
    _check_run(name, "token")


@pytest.mark.parametrize("kind", ["class", "token"])
def test_dynsdpb_bounds_with_narrow_clamp(kind):
    """Logged alpha_i in [0, alpha] and tau_i in [tau * min_scale, tau * max_scale] with non-default bounds;
    tau_i actually varies per sample."""
    params = MethodParams(alpha=0.5, tau=3.0, tau_min_scale=0.8, tau_max_scale=1.25)
    log = _check_run("dynsdpb", kind, params)
    taus = torch.cat([t.tau for t in log[1:]])
    alphas = torch.cat([t.alpha for t in log[1:]])
    assert taus.min() >= 2.4 - 1e-5 and taus.max() <= 3.75 + 1e-5
    assert taus.std() > 0 and alphas.std() > 0
    assert alphas.min() >= 0 and alphas.max() <= 0.5 + 1e-6
