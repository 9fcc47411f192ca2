"""Block discovery: every mergeable parameter lands in exactly one block, on real layouts."""

from __future__ import annotations

import pytest
import torch

from flexmerge.blocks import check_partition, discover_blocks, layer_of
from flexmerge.errors import ConfigError, UnknownNameError
from flexmerge.io.source import TensorMeta

transformers = pytest.importorskip("transformers")


def _meta(model: torch.nn.Module) -> dict[str, TensorMeta]:
    return {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _layouts():
    t = transformers
    return {
        "bert": lambda: t.BertModel(t.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64, vocab_size=100)),
        "vit": lambda: t.ViTModel(t.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=64, image_size=32, patch_size=8)),
        "gpt2": lambda: t.GPT2Model(t.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)),
        "t5": lambda: t.T5Model(t.T5Config(d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, vocab_size=100)),
    }


@pytest.mark.parametrize("arch", ["bert", "vit", "gpt2", "t5"])
@pytest.mark.parametrize("granularity", ["layer", "sublayer", "tensor", "split:4"])
def test_every_parameter_in_exactly_one_block(arch, granularity):
    meta = _meta(_layouts()[arch]())
    keys = list(meta)
    part = discover_blocks(keys, meta, granularity)
    check_partition(part, keys)  # raises on a gap or an overlap
    covered = {}
    for b in part.blocks:
        for p in b.parts:
            rows = p.rows or (0, meta[p.key].shape[0] if meta[p.key].shape else 1)
            covered.setdefault(p.key, []).append(rows)
    for k in keys:
        spans = sorted(covered[k])
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        if meta[k].shape:
            assert spans[-1][1] == meta[k].shape[0]


def test_sublayer_blocks_on_bert_and_t5():
    bert = discover_blocks(*_km(_layouts()["bert"]()), "sublayer").names()
    assert {"encoder.layer.0.attention", "encoder.layer.0.mlp", "encoder.layer.0.attention.output.LayerNorm",
            "encoder.layer.0.output.LayerNorm", "embeddings.word_embeddings"} <= set(bert)
    t5 = discover_blocks(*_km(_layouts()["t5"]()), "sublayer").names()
    assert {"decoder.block.1.layer.0.SelfAttention", "decoder.block.1.layer.1.EncDecAttention",
            "decoder.block.1.mlp", "encoder.block.0.layer.1.layer_norm", "shared"} <= set(t5)
    layers = discover_blocks(*_km(_layouts()["gpt2"]()), "layer").names()
    assert layers[:1] == ["wte"] and "h.0" in layers and "h.1" in layers and "ln_f" in layers


def _km(model):
    meta = _meta(model)
    return list(meta), meta


def test_layer_matching_is_anchored():
    assert layer_of("visual.transformer.resblocks.1.attn.in_proj_weight") == "visual.transformer.resblocks.1"
    assert layer_of("visual.transformer.resblocks.10.mlp.c_fc.weight") == "visual.transformer.resblocks.10"
    assert layer_of("encoder.block.3.layer.1.DenseReluDense.wi.weight") == "encoder.block.3"
    assert layer_of("conv1.weight") is None


def test_split_and_patterns():
    meta = {"a.0.w": TensorMeta((10, 4), torch.float32), "a.1.w": TensorMeta((10, 4), torch.float32),
            "a.10.w": TensorMeta((3, 4), torch.float32), "head.b": TensorMeta((4,), torch.float32)}
    part = discover_blocks(list(meta), meta, "split:3")
    assert [p.rows for b in part.blocks for p in b.parts if p.key == "a.0.w"] == [(0, 3), (3, 7), (7, 10)]
    part = discover_blocks(list(meta), meta, "tensor", patterns={"layer{0}": r"a\.(\d+)\..*"})
    assert part.names() == ["layer0", "layer1", "layer10", "head.b"]
    part = discover_blocks(list(meta), meta, "tensor", patterns={"one": r"a\.1\..*"})
    assert [p.key for b in part.blocks if b.name == "one" for p in b.parts] == ["a.1.w"]
    with pytest.raises(ConfigError, match="matches several block patterns"):
        discover_blocks(list(meta), meta, "tensor", patterns={"x": r"a\..*", "y": r".*\.w"})
    with pytest.raises(UnknownNameError, match="unknown granularity 'rows'; choose one of"):
        discover_blocks(list(meta), meta, "rows")
    with pytest.raises(ConfigError, match="split:K"):
        discover_blocks(list(meta), meta, "split:0")
