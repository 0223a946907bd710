"""What DynSDPB's extra loss terms cost next to one forward+backward of the model they train.

    python benchmarks/loss_cost.py [--repeats 10] [--json PATH] [--device cpu|cuda] [--only encoder|decoder]
                                   [--encoder-model minilm-l6] [--decoder-model smollm2-135m]

Two ratios, each measured in one run on one machine (medians over repeats after a warm-up):

* encoder: dynsdpb's extra terms (uncertainty weights, loss-scaled temperatures, the per-sample LMBC KL and
  its backward, caching the second half) over one forward+backward of MiniLM-L6 at batch (32, 128);
* decoder: `vocabulary_map` as one step uses it at batch (2, 256) with a 49152-token vocabulary (the student's
  map of the first half, forward and backward, and the teacher's map of the second half) over one
  forward+backward of SmolLM2-135M at (2, 256); and all of dynsdpb's extra VMM terms (`extra_ratio`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import offline_env  # noqa: E402  (also puts the checkout's raysdpb on the path)

offline_env()

import torch  # noqa: E402


def _median_time(fn, repeats: int, warmup: int = 2) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()  # the warm-up's queued kernels are not timed
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def encoder_ratio(repeats: int, device: str, model_name: str = "minilm-l6") -> dict:
    from raysdpb.methods import ClassOutputs, METHODS, MethodParams
    from raysdpb.models import build_model, load_tokenizer, resolve_model

    source = resolve_model(model_name)
    tok = load_tokenizer(source)
    model = build_model(source, kind="classification", num_labels=3, tokenizer=tok).to(device)
    model.train()
    batch, length = 32, 128
    ids = torch.randint(1000, 20000, (batch, length), device=device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 3, (batch,), device=device)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask).logits
        torch.nn.functional.cross_entropy(out, labels).backward()

    method, params = METHODS["dynsdpb"], MethodParams(alpha=1.0, tau=2.0)
    logits = torch.randn(batch, 3, device=device, requires_grad=True)
    teacher = method.teacher_state(ClassOutputs(torch.randn(batch // 2, 3, device=device), labels[batch // 2:]),
                                   torch.arange(batch // 2), params).to(device)
    ce_only = METHODS["finetune"]

    def loss_terms(m, t):
        def run():
            outputs = ClassOutputs(logits, labels)
            terms = m.loss(outputs, t, params)
            terms.total.backward()
            if m.distills:
                m.teacher_state(outputs.slice(slice(batch // 2, None)), torch.arange(batch // 2), params)
        return run

    t_model = _median_time(forward_backward, repeats)
    t_dyn = _median_time(loss_terms(method, teacher), repeats * 20)
    t_ce = _median_time(loss_terms(ce_only, None), repeats * 20)
    extra = max(t_dyn - t_ce, 0.0)
    return {"model_fwd_bwd_s": t_model, "dynsdpb_loss_s": t_dyn, "ce_loss_s": t_ce,
            "extra_terms_s": extra, "ratio": extra / t_model}


def decoder_ratio(repeats: int, device: str, model_name: str = "smollm2-135m") -> dict:
    from raysdpb.losses import vocabulary_log_map
    from raysdpb.methods import METHODS, MethodParams, TokenOutputs
    from raysdpb.models import build_model, load_tokenizer, resolve_model

    source = resolve_model(model_name)
    tok = load_tokenizer(source)
    model = build_model(source, kind="generation", tokenizer=tok).to(device)
    model.train()
    batch, length, vocab = 2, 256, model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length), device=device)

    def forward_backward():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1)).backward()

    # logits as the loop sees them: (2, 255, V), the answer being the second half of each sequence
    logits = torch.randn(batch, length - 1, vocab, device=device, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length - 1), device=device)
    answer = torch.zeros(batch, length - 1, dtype=torch.bool, device=device)
    answer[:, length // 2:] = True
    tau = torch.tensor([1.5, 2.5], device=device)

    def vocabulary_map_fwd_bwd():
        # what one step computes with vocabulary_map: the student's map of the first half (with backward)
        # and the teacher's map of the second half (cached for the next step), at batch 2
        logits.grad = None
        vocabulary_log_map(logits[:1], answer[:1], tau[:1]).sum().backward()
        with torch.no_grad():
            vocabulary_log_map(logits[1:].detach(), answer[1:], tau[1:])

    params = MethodParams(alpha=1.0, tau=2.0)
    dyn, ce_only = METHODS["dynsdpb"], METHODS["finetune"]
    teacher = dyn.teacher_state(TokenOutputs(logits[1:].detach(), labels[1:], answer[1:]), torch.arange(1), params)

    def loss_step(method, state):
        def run():
            logits.grad = None
            outputs = TokenOutputs(logits, labels, answer)
            method.loss(outputs, state, params).total.backward()
            if method.distills:
                method.teacher_state(outputs.slice(slice(1, None)), torch.arange(1), params)
        return run

    t_model = _median_time(forward_backward, max(repeats // 2, 3))
    t_map = _median_time(vocabulary_map_fwd_bwd, repeats)
    t_dyn = _median_time(loss_step(dyn, teacher), repeats)
    t_ce = _median_time(loss_step(ce_only, None), repeats)
    extra = max(t_dyn - t_ce, 0.0)
    return {"model_fwd_bwd_s": t_model, "vocabulary_map_s": t_map, "ratio": t_map / t_model,
            "dynsdpb_loss_s": t_dyn, "ce_loss_s": t_ce, "extra_terms_s": extra, "extra_ratio": extra / t_model}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--only", choices=["encoder", "decoder"], default=None)
    p.add_argument("--encoder-model", default="minilm-l6", help="an alias, a local HF folder or a hub id")
    p.add_argument("--decoder-model", default="smollm2-135m",
                   help="a LLaMA-family causal LM: an alias, a local HF folder or a hub id")
    args = p.parse_args()
    torch.manual_seed(0)
    results = {"device": args.device, "torch_threads": torch.get_num_threads(),
               "models": {"encoder": args.encoder_model, "decoder": args.decoder_model}}
    if args.only in (None, "encoder"):
        results["encoder"] = encoder_ratio(args.repeats, args.device, args.encoder_model)
    if args.only in (None, "decoder"):
        results["decoder"] = decoder_ratio(args.repeats, args.device, args.decoder_model)
    for name in ("encoder", "decoder"):
        if name in results:
            r = results[name]
            print(f"{name:8s} " + "  ".join(f"{k}={v:.4f}" for k, v in r.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
