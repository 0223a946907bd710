"""`build_model` on the real offline models: a truncated depth keeps the stored weights of the layers it keeps,
the task's head settings land in the config, and the stored config is read once (a GGUF file's metadata parse
takes seconds per trial start).

The references are independent of raysdpb: a plain `transformers` load of the folder model, and the GGUF
file's own tensors, dequantized by the `gguf` package.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoConfig, AutoModel

from raysdpb.models import build_model, load_tokenizer, resolve_model


@pytest.fixture
def config_reads(monkeypatch):
    """The paths `AutoConfig.from_pretrained` was called with, for as long as the test runs."""
    calls: list[str] = []
    original = AutoConfig.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        calls.append(str(path))
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", classmethod(spy))
    return calls


@pytest.mark.parametrize("num_layers", [None, 2, 6])
def test_minilm_classification_keeps_the_stored_weights_of_the_layers_it_keeps(config_reads, num_layers):
    source = resolve_model("minilm-l6")
    labels = {0: "contradiction", 1: "entailment", 2: "neutral"}
    model = build_model(source, kind="classification", num_labels=3, num_layers=num_layers, id2label=labels)
    assert config_reads == [source.path]
    assert len(model.bert.encoder.layer) == model.config.num_hidden_layers == (num_layers or 6)
    assert (model.config.num_labels, model.config.id2label) == (3, labels)
    assert model.config.label2id == {v: k for k, v in labels.items()}
    assert model.classifier.out_features == 3

    reference = AutoModel.from_pretrained(source.path).state_dict()
    ours = model.bert.state_dict()
    kept = [k for k in reference if not k.startswith("encoder.layer.") or int(k.split(".")[2]) < (num_layers or 6)]
    assert set(ours) >= set(kept) and len(kept) > 20
    for key in kept:
        assert torch.equal(ours[key], reference[key]), key


def test_smollm2_gguf_truncated_loads_the_files_own_tensors_reading_its_metadata_once(config_reads):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    source = resolve_model("smollm2-135m")
    model = build_model(source, kind="generation", num_layers=2, tokenizer=load_tokenizer(source))
    assert config_reads == [source.path]
    assert len(model.model.layers) == model.config.num_hidden_layers == 2

    tensors = {t.name: t for t in GGUFReader(os.path.join(source.path, source.gguf_file)).tensors}
    assert sum(name.endswith(".attn_norm.weight") for name in tensors) == 30  # the file holds all 30 layers

    def stored(name):
        tensor = tensors[name]
        return torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).float()

    # tensors the GGUF conversion does not permute (q and k are permuted for rotary embeddings)
    ours = model.state_dict()
    for hf_name, gguf_name in [("model.embed_tokens.weight", "token_embd.weight"),
                               ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight"),
                               ("model.layers.1.mlp.up_proj.weight", "blk.1.ffn_up.weight"),
                               ("model.layers.1.self_attn.v_proj.weight", "blk.1.attn_v.weight"),
                               ("model.layers.1.input_layernorm.weight", "blk.1.attn_norm.weight"),
                               ("model.norm.weight", "output_norm.weight")]:
        assert torch.allclose(ours[hf_name].float(), stored(gguf_name), atol=1e-6), hf_name
