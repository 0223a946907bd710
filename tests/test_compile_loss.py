"""`compile_loss`: every registered method's loss through torch.compile gives the eager loss's numbers and
gradients, for encoder logits (LMBC) and decoder logits (VMM), with and without the previous step's soft targets.

On this CPU, every method is compiled with `aot_eager` (TorchDynamo's graph and AOTAutograd's forward and backward,
run by PyTorch's own kernels); one method (dynsdpb, the most terms) also through inductor, the default backend, which
generates C++ here (it needs a C compiler: the test says so and fails without one), for the encoder's logits. For a
decoder's logits inductor's gradients of the VMM loss with per-sample temperatures were wrong (torch 2.13: up to
44% off, `vmm_loss(vocabulary_log_map(x, mask, tau), ...)` with a tensor tau; the map alone at one float tau and the
KL alone agree), so the recipe keeps a decoder's loss eager (tested below); aot_eager agrees for both kinds."""

from __future__ import annotations

import shutil

import pytest
import torch

from raysdpb.methods import METHODS, ClassOutputs, MethodParams, TeacherState, TokenOutputs, compiled_loss

PARAMS = MethodParams(alpha=0.7, tau=2.0, tau_min_scale=0.5, tau_max_scale=2.0, tau_relative=True)


def _outputs(kind: str, seed: int, batch: int = 6):
    g = torch.Generator().manual_seed(seed)
    if kind == "class":
        logits = torch.randn(batch, 3, generator=g, requires_grad=True)
        return logits, lambda x: ClassOutputs(x, torch.randint(0, 3, (batch,), generator=torch.Generator()
                                                                .manual_seed(seed)))
    logits = torch.randn(batch, 5, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (batch, 5), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(batch, 5, dtype=torch.bool)
    mask[:, 2:] = True
    return logits, lambda x: TokenOutputs(x, labels, mask)


def _targets(method, kind, seed):
    """What the method's source hands a step of 6 samples (`Method.soft_targets`), made by hand."""
    prev_logits, prev_wrap = _outputs(kind, seed + 100)
    prev = prev_wrap(prev_logits.detach())
    if method.soft_targets == "previous_batch":  # the previous batch's second half, as the recipe caches it
        return method.teacher_state(prev.slice(slice(3, None)), torch.arange(3), PARAMS)
    if method.soft_targets == "previous_epoch":  # PS-KD: last epoch's probabilities, a_t / alpha per sample
        return TeacherState(torch.arange(6), torch.softmax(prev_logits.detach(), -1), torch.ones(6),
                            torch.tensor([0.5, 0.5, 0.0, 0.5, 0.5, 0.5]))
    if method.soft_targets == "teacher":  # KD: the teacher's logits at the fixed tau
        return TeacherState(torch.arange(6), prev_logits.detach(), torch.full((6,), PARAMS.tau))
    return None


def _terms(loss, method, kind, seed, with_targets):
    inputs = [_outputs(kind, seed + 50 * k) for k in range(method.forward_passes)]  # R-Drop: two passes
    targets = _targets(method, kind, seed) if with_targets else None
    terms = method.step_loss([wrap(logits) for logits, wrap in inputs], targets, PARAMS, loss)
    terms.total.backward()
    values = {k: getattr(terms, k) for k in ("total", "ce", "distill", "alpha", "tau")}
    return {k: v.detach() for k, v in values.items() if v is not None}, [logits.grad for logits, _ in inputs]


def _check(backend: str, method_name: str, kind: str) -> None:
    method = METHODS[method_name]
    compiled = compiled_loss(method, backend=backend)
    # a step without targets: the first of a run (DLB, DynSDPB), the first epoch (PS-KD); KD always has its teacher's
    cases = {"previous_batch": (False, True), "previous_epoch": (False, True), "teacher": (True,)}
    for seed in (0, 1):
        for with_targets in cases.get(method.soft_targets, (False,)):
            want, want_grads = _terms(None, method, kind, seed, with_targets)
            got, got_grads = _terms(compiled, method, kind, seed, with_targets)
            assert set(got) == set(want), (method_name, kind, with_targets)
            for key in want:
                torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6,
                                           msg=f"{method_name} {kind} {key} targets={with_targets}")
            for got_grad, want_grad in zip(got_grads, want_grads):
                torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


# each method on the kinds of model it trains (`Method.kinds`: the classifier-only baselines have no token form)
CASES = [(name, kind) for name in sorted(METHODS) for kind in ("class", "token")
         if kind == "class" or "generation" in METHODS[name].kinds]


@pytest.mark.parametrize("method_name, kind", CASES)
def test_the_compiled_loss_equals_the_eager_loss(method_name, kind):
    torch._dynamo.reset()
    _check("aot_eager", method_name, kind)


def test_the_inductor_compiled_loss_equals_the_eager_loss():
    assert shutil.which("cc") or shutil.which("gcc"), "inductor needs a C compiler on the CPU"
    torch._dynamo.reset()
    _check("inductor", "dynsdpb", "class")


def test_the_recipe_compiles_an_encoder_s_loss_only(shared_data_dir, monkeypatch):
    from raysdpb.recipe import Recipe
    from trial_configs import decoder_trial, encoder_trial

    monkeypatch.setenv("RAYSDPB_COMPILE_BACKEND", "aot_eager")
    encoder = Recipe(encoder_trial(shared_data_dir, compile_loss=True))
    encoder.setup_runtime()
    assert callable(encoder.loss_fn)
    decoder = Recipe(decoder_trial(shared_data_dir, compile_loss=True))
    decoder.setup_runtime()
    assert decoder.loss_fn is None  # the method's own loss
    plain = Recipe(encoder_trial(shared_data_dir))
    plain.setup_runtime()
    assert plain.loss_fn is None  # the default: unchanged


def test_an_encoder_trial_with_the_compiled_loss_reports_the_eager_trial_s_numbers(shared_data_dir, tmp_path,
                                                                                     monkeypatch):
    """The recipe's own loop, compiled loss (aot_eager) against eager: every report's numbers."""
    from raysdpb.recipe import run_trial
    from raysdpb.recipe.context import LocalContext
    from trial_configs import encoder_trial

    monkeypatch.setenv("RAYSDPB_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    eager = run_trial(encoder_trial(shared_data_dir, max_train_samples=24), LocalContext(tmp_path / "eager"))
    compiled = run_trial(encoder_trial(shared_data_dir, max_train_samples=24, compile_loss=True),
                         LocalContext(tmp_path / "compiled"))
    assert len(compiled.history) == len(eager.history)
    for got, want in zip(compiled.history, eager.history):
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
