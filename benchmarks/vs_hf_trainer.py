"""Samples/s of our finetune (local mode, `raysdpb.recipe.run_trial`) against a plain Hugging Face Trainer.

    python benchmarks/vs_hf_trainer.py [--task superglue/cb] [--batch-size 8] [--max-length 128] [--epochs 2]
                                       [--device cpu|cuda] [--no-unfused] [--json PATH]

Both fine-tune MiniLM-L6 (`minilm-l6`, the same folder) on the same records (`raysdpb.tasks.load_examples`
from the local mirror), tokenized the same way (the same fast tokenizer, truncation to `--max-length`), with
the same batch size, epochs, learning rate, linear schedule and warm-up steps, weight decay, gradient
clipping (1.0) and precision (fp32 on CPU; bf16 autocast on CUDA). Both pad every batch dynamically to its
longest sequence (ours: the recipe's collator, which pads to a multiple of 8 on CUDA only; HF:
`DataCollatorWithPadding`, the same multiple on CUDA), both use no DataLoader workers, both evaluate on the
validation split and save a checkpoint (model and optimizer) at the end of every epoch, and both log every 10
steps (ours: TensorBoard scalars, HF: its log history). The HF side is left at its defaults otherwise
("plain"); its optimizer is `adamw_torch_fused`, and ours is fused AdamW too
(`raysdpb.recipe.components.make_optimizer`).

Lockstep, so that a noisy neighbour cannot favour one side: the sides run in one process, each in its own
thread, and take turns one training step at a time (ours step k, HF step k, ours_unfused step k, ours step
k+1, ...); only the side holding the turn computes. A step is measured from its start (ours: the recipe's
collator is called for the batch; HF: `on_step_begin`, after its batch is fetched) to the start of the next
step, so it includes everything the loop does per step (logging, the next fetch). Steps that end an epoch
(evaluation and checkpoint fall in them) and the first `--skip` steps are left out. The recipe is not
modified: the benchmark wraps the recipe's `collate` to get its boundaries.

Per side: `samples_per_s` (batch size over the median step time), `tokens_per_s` (median over steps of
padded tokens / step time: not sensitive to the sides drawing different batches, hence different padding),
`active_s` (the time the side held the turn: set-up, training, evaluation, checkpoints; imports excluded),
tokens/s and MFU on CUDA (6 x parameters x tokens/s over `--peak-tflops`). `throughput_ratio` = ours / HF
samples/s, and `paired_ratio` the median over k of ours' step k time over HF's step k time, inverted (so >1
means ours is faster), with its interquartile range.

A third side, `ours_unfused` (`--no-unfused` leaves it out), is our recipe with torch's default AdamW
(`fused=None`: a per-parameter loop on CPU, foreach on CUDA) patched in for its thread only: what the recipe
ran before `make_optimizer` (this benchmark found the gap: ours was 0.83x HF on CB, 2 CPU cores).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, default_peak, machine_info, median, mfu, offline_env, quantile,  # noqa: E402
                     quiet_libraries, table, write_json)

offline_env()

import torch  # noqa: E402

MODEL = "minilm-l6"


class Ring:
    """Turns between threads: one side computes at a time, in a fixed order."""

    def __init__(self, order: list[str], cuda: bool) -> None:
        self.order = list(order)
        self.turn = order[0]
        self.cv = threading.Condition()
        self.waited = dict.fromkeys(order, 0.0)
        self.cuda = cuda

    def wait(self, me: str) -> None:
        t = time.perf_counter()
        with self.cv:
            self.cv.wait_for(lambda: self.turn == me)
        self.waited[me] += time.perf_counter() - t

    def boundary(self, me: str) -> tuple[float, float]:
        """At a step boundary: (time the previous step ended, time the next one may start)."""
        if self.cuda:
            torch.cuda.synchronize()
        arrived = time.perf_counter()
        with self.cv:
            i = self.order.index(me)
            self.turn = self.order[(i + 1) % len(self.order)]
            self.cv.notify_all()
        self.wait(me)
        return arrived, time.perf_counter()

    def finish(self, me: str) -> None:
        with self.cv:
            if me in self.order:
                i = self.order.index(me)
                nxt = self.order[(i + 1) % len(self.order)]
                self.order.remove(me)
                if self.turn == me:
                    self.turn = nxt if nxt != me else None
            self.cv.notify_all()


class Side:
    def __init__(self, name: str) -> None:
        self.name = name
        self.starts: list[float] = []    # start of step k
        self.arrivals: list[float] = []  # end of step k-1 (arrival at boundary k)
        self.tokens: list[int] = []
        self.setup_s = 0.0
        self.t_begin = self.t_end = 0.0
        self.error: str | None = None
        self.metrics: dict = {}
        self.extra: dict = {}

    def step_times(self, steps_per_epoch: int, skip: int) -> list[tuple[int, float, int]]:
        """(step, seconds, padded tokens) of every whole step but the skipped and epoch-ending ones."""
        out = []
        for k in range(min(len(self.starts), len(self.arrivals) - 1)):
            if k < skip or (k + 1) % steps_per_epoch == 0:
                continue
            out.append((k, self.arrivals[k + 1] - self.starts[k], self.tokens[k]))  # main() checked the counts
        return out


class BoundaryCollator:
    """The recipe's collator, with a turn boundary before every training batch (not evaluation batches)."""

    def __init__(self, inner, side: Side, ring: Ring) -> None:
        self.inner, self.side, self.ring = inner, side, ring

    def __call__(self, items):
        if not torch.is_grad_enabled():  # evaluation (under no_grad): no boundary
            return self.inner(items)
        arrived, start = self.ring.boundary(self.side.name)
        self.side.arrivals.append(arrived)
        out = self.inner(items)
        self.side.starts.append(start)
        self.side.tokens.append(int(out["input_ids"].numel()))
        return out


def _install_hooks(ring: Ring, sides: dict[str, Side]) -> None:
    """Patch, for this process: the recipe's collator factory (boundaries), AdamW (not fused in ours_unfused)."""
    import raysdpb.recipe.recipe as recipe

    original = recipe.collate

    def collate(*a, **k):
        side = sides[threading.current_thread().name]
        return BoundaryCollator(original(*a, **k), side, ring)

    recipe.collate = collate

    class ThreadAwareAdamW(torch.optim.AdamW):
        def __init__(self, params, *a, **k):
            if threading.current_thread().name == "ours_unfused":
                k["fused"] = None
            super().__init__(params, *a, **k)

    torch.optim.AdamW = ThreadAwareAdamW


def run_ours(side: Side, ring: Ring, args) -> None:
    from raysdpb.config import TrialConfig
    from raysdpb.recipe import run_trial
    from raysdpb.recipe.context import LocalContext

    try:
        ring.wait(side.name)
        side.t_begin = time.perf_counter()
        cfg = TrialConfig(task=args.task, model=MODEL, method="finetune", epochs=args.epochs,
                          batch_size=args.batch_size, eval_batch_size=args.batch_size, max_length=args.max_length,
                          lr=args.lr, warmup_ratio=args.warmup_ratio, weight_decay=0.01, max_grad_norm=1.0,
                          seed=args.seed, device="cuda" if args.device.startswith("cuda") else "cpu",
                          precision="auto", max_train_samples=args.max_train_samples, progress_bar=False)
        out = tempfile.mkdtemp(prefix=f"raysdpb-vs-hf-{side.name}-")
        result = run_trial(cfg, LocalContext(out, keep=1))
        side.metrics = dict(result.metrics)
        shutil.rmtree(out, ignore_errors=True)
    except BaseException:  # noqa: BLE001 - reported by the main thread
        side.error = traceback.format_exc()
    finally:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        side.t_end = time.perf_counter()
        ring.finish(side.name)


def prepare_hf(side: Side, ring: Ring, args):
    """The Trainer, built in the main thread (its time counts as HF's set-up)."""
    import numpy as np
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainerCallback,
                              TrainingArguments)

    from raysdpb.models import load_tokenizer, resolve_model
    from raysdpb.tasks import data_dir_from, get_task, load_examples

    t0 = time.perf_counter()
    task = get_task(args.task)
    source = resolve_model(MODEL)
    tokenizer = load_tokenizer(source)

    def encode(split: str, limit: int | None) -> list[dict]:
        records = load_examples(task, split, data_dir_from(None))
        records = records[:limit] if limit else records
        pairs = [r.get("text_pair") for r in records]
        has_pair = any(p is not None for p in pairs)
        enc = tokenizer([r["text"] for r in records], [p or "" for p in pairs] if has_pair else None,
                        truncation=True, max_length=args.max_length)
        return [{k: enc[k][i] for k in enc.keys()} | {"labels": r["label"]} for i, r in enumerate(records)]

    train = encode(task.train_split, args.max_train_samples)
    evaluation = encode(task.eval_splits[0][0], None)
    model = AutoModelForSequenceClassification.from_pretrained(
        source.path, num_labels=task.num_labels, id2label=dict(enumerate(task.labels)),
        label2id={v: k for k, v in enumerate(task.labels)})
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    cuda = args.device.startswith("cuda")
    inner = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if cuda else None)

    in_epoch = [False]  # between on_epoch_begin and on_epoch_end: the Trainer collates training batches only
    # (not `model.training`: the Trainer collates each epoch's first batch before training_step's model.train(),
    # while the model is still in eval mode from loading or from the last evaluation)

    def collator(features):
        out = inner(features)
        if in_epoch[0]:  # not an evaluation batch
            side.tokens.append(int(out["input_ids"].numel()))
        return out

    class Boundaries(TrainerCallback):
        def on_epoch_begin(self, targs, state, control, **kw):
            in_epoch[0] = True

        def on_epoch_end(self, targs, state, control, **kw):
            in_epoch[0] = False

        def on_step_begin(self, targs, state, control, **kw):
            arrived, start = ring.boundary(side.name)
            side.arrivals.append(arrived)
            side.starts.append(start)

    steps = -(-len(train) // args.batch_size)
    out = tempfile.mkdtemp(prefix="raysdpb-vs-hf-hf-")
    extra = {"optim": args.hf_optim} if args.hf_optim else {}
    targs = TrainingArguments(
        output_dir=out, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        num_train_epochs=args.epochs, learning_rate=args.lr, weight_decay=0.01, max_grad_norm=1.0,
        lr_scheduler_type="linear", warmup_steps=int(args.warmup_ratio * steps * args.epochs), seed=args.seed,
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=1, logging_steps=10, report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=not cuda, bf16=cuda, **extra)

    def compute_metrics(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    trainer = Trainer(model=model, args=targs, train_dataset=train, eval_dataset=evaluation, data_collator=collator,
                      compute_metrics=compute_metrics, callbacks=[Boundaries()])
    side.setup_s = time.perf_counter() - t0
    side.extra = {"optim": targs.optim, "out_dir": out}
    return trainer


def run_hf(side: Side, ring: Ring, trainer, args) -> None:
    try:
        ring.wait(side.name)
        side.t_begin = time.perf_counter()
        out = trainer.train()
        side.extra["hf_train_samples_per_second"] = out.metrics.get("train_samples_per_second")
        side.metrics = next(({k: v for k, v in h.items() if k.startswith("eval_")}
                             for h in reversed(trainer.state.log_history) if "eval_loss" in h), {})
    except BaseException:  # noqa: BLE001
        side.error = traceback.format_exc()
    finally:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        side.t_end = time.perf_counter()
        shutil.rmtree(side.extra.get("out_dir", ""), ignore_errors=True)
        ring.finish(side.name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="superglue/cb", help="superglue/cb (default) or glue/rte, ...")
    p.add_argument("--batch-size", type=int, default=8, help="8: the paper's SuperGLUE setting (32 for GLUE)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--hf-optim", default=None, help="HF's optimizer (default: HF's default, adamw_torch_fused)")
    p.add_argument("--no-unfused", action="store_true", help="leave out the side ours_unfused")
    p.add_argument("--skip", type=int, default=3, help="warm-up steps left out per side")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--json", default=None, help=f"e.g. {RESULTS / 'vs_hf_trainer.json'}")
    args = p.parse_args()
    quiet_libraries()
    torch.manual_seed(args.seed)
    # what run_trial imports lazily, imported before any clock starts (the HF side imports Trainer up front)
    import raysdpb.recipe  # noqa: F401
    import raysdpb.recipe.evaluation  # noqa: F401
    import raysdpb.tasks  # noqa: F401
    importlib.import_module("torch.utils.tensorboard")
    from transformers import AutoModelForSequenceClassification, Trainer, get_linear_schedule_with_warmup  # noqa: F401

    names = ["ours", "hf"] + ([] if args.no_unfused else ["ours_unfused"])
    cuda = args.device.startswith("cuda")
    ring = Ring(names, cuda)
    sides = {n: Side(n) for n in names}
    _install_hooks(ring, sides)
    t0 = time.perf_counter()
    trainer = prepare_hf(sides["hf"], ring, args)
    threads = [threading.Thread(target=run_hf, args=(sides["hf"], ring, trainer, args), name="hf")]
    for n in names:
        if n != "hf":
            threads.append(threading.Thread(target=run_ours, args=(sides[n], ring, args), name=n))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for s in sides.values():
        if s.error:
            sys.stderr.write(f"--- {s.name} failed:\n{s.error}\n")
    if any(s.error for s in sides.values()):
        raise SystemExit("a side failed")
    for s in sides.values():  # every timed step must have its batch's token count, in step order
        if len(s.tokens) != len(s.starts):
            raise SystemExit(f"{s.name}: {len(s.tokens)} training batches counted for {len(s.starts)} steps")

    from raysdpb.tasks import data_dir_from, get_task, load_examples

    task = get_task(args.task)
    n_train = len(load_examples(task, task.train_split, data_dir_from(None)))
    n_train = min(n_train, args.max_train_samples) if args.max_train_samples else n_train
    steps_per_epoch = -(-n_train // args.batch_size)
    peak = default_peak(args.device, args.peak_tflops)
    params = sum(q.numel() for q in trainer.model.parameters())
    rows, summary = [], {}
    times = {n: s.step_times(steps_per_epoch, args.skip) for n, s in sides.items()}
    hf_by_step = {k: sec for k, sec, _ in times["hf"]}
    for n, s in sides.items():
        st = times[n]
        step_s = median([sec for _, sec, _ in st])
        tps = median([tok / sec for _, sec, tok in st if tok])
        paired = [hf_by_step[k] / sec for k, sec, _ in st if k in hf_by_step]
        active = (s.t_end - s.t_begin) - ring.waited[n] + s.setup_s
        summary[n] = {"steps_timed": len(st), "step_s": step_s, "samples_per_s": args.batch_size / step_s,
                      "tokens_per_s": tps, "mean_tokens_per_step": sum(t for _, _, t in st) / max(len(st), 1),
                      "active_s": active, "mfu": mfu(trainer.model, tps, peak),
                      "paired_speedup_vs_hf": median(paired) if n != "hf" else 1.0,
                      "paired_q25": quantile(paired, 0.25) if n != "hf" else None,
                      "paired_q75": quantile(paired, 0.75) if n != "hf" else None,
                      "eval": s.metrics, "step_seconds": [sec for _, sec, _ in st], **{k: v for k, v in s.extra.items()
                                                                                        if k != "out_dir"}}
        rows.append({"side": n, **summary[n]})
    result = {
        "benchmark": "vs_hf_trainer", "machine": machine_info(), "device": args.device, "task": args.task,
        "model": MODEL, "params": params, "batch_size": args.batch_size, "max_length": args.max_length,
        "epochs": args.epochs, "train_samples": n_train, "steps_per_epoch": steps_per_epoch, "skip": args.skip,
        "peak_tflops": peak, "sides": summary,
        "throughput_ratio": summary["ours"]["samples_per_s"] / summary["hf"]["samples_per_s"],
        "token_throughput_ratio": summary["ours"]["tokens_per_s"] / summary["hf"]["tokens_per_s"],
        "paired_ratio": summary["ours"]["paired_speedup_vs_hf"],
        "active_time_ratio": summary["hf"]["active_s"] / summary["ours"]["active_s"],
        "elapsed_s": elapsed,
    }
    if "ours_unfused" in summary:
        unfused, hf = summary["ours_unfused"], summary["hf"]
        result["unfused_throughput_ratio"] = unfused["samples_per_s"] / hf["samples_per_s"]
        result["unfused_token_throughput_ratio"] = unfused["tokens_per_s"] / hf["tokens_per_s"]
        result["unfused_paired_ratio"] = summary["ours_unfused"]["paired_speedup_vs_hf"]
    print(f"\n== finetune of {MODEL} on {args.task} ({n_train} samples): batch {args.batch_size}, max_length "
          f"{args.max_length}, {args.epochs} epoch(s), {args.device}; lockstep, {elapsed:.0f}s")
    print(table(rows, [("side", "side", ""), ("steps_timed", "steps", "d"), ("step_s", "step_s", ".3f"),
                       ("samples_per_s", "samples/s", ".2f"), ("tokens_per_s", "tokens/s", ".0f"),
                       ("mean_tokens_per_step", "tok/step", ".0f"), ("paired_speedup_vs_hf", "paired_vs_hf", ".3f"),
                       ("paired_q25", "q25", ".3f"), ("paired_q75", "q75", ".3f"), ("active_s", "active_s", ".1f"),
                       ("mfu", "MFU", ".4f")]))
    print(f"HF optimizer: {summary['hf'].get('optim')}; HF's own train_samples_per_second (lockstep waits "
          f"included, not comparable): {summary['hf'].get('hf_train_samples_per_second')}")
    print(f"throughput_ratio (ours/HF samples/s) {result['throughput_ratio']:.3f}; tokens/s "
          f"{result['token_throughput_ratio']:.3f}; paired {result['paired_ratio']:.3f}; active time (HF/ours) "
          f"{result['active_time_ratio']:.3f}; target >= 1: {'MET' if result['throughput_ratio'] >= 1 else 'MISSED'}")
    if "unfused_throughput_ratio" in result:
        print(f"with torch's default AdamW in the recipe (ours_unfused/HF): samples/s "
              f"{result['unfused_throughput_ratio']:.3f}; "
              f"tokens/s {result['unfused_token_throughput_ratio']:.3f}; paired {result['unfused_paired_ratio']:.3f}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
