"""Tiny real checkpoints on disk: a 3-layer transformer-shaped base and M fine-tunes of it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("FLEXMERGE_NO_PROGRESS", "1")

LAYERS = 3
HIDDEN = 16


def tiny_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"embed.weight": torch.randn(20, HIDDEN, generator=g)}
    for i in range(LAYERS):
        p = f"layers.{i}"
        sd[f"{p}.attn.qkv.weight"] = torch.randn(3 * HIDDEN, HIDDEN, generator=g)
        sd[f"{p}.attn.qkv.bias"] = torch.randn(3 * HIDDEN, generator=g)
        sd[f"{p}.norm1.weight"] = torch.ones(HIDDEN) + 0.1 * torch.randn(HIDDEN, generator=g)
        sd[f"{p}.mlp.fc1.weight"] = torch.randn(2 * HIDDEN, HIDDEN, generator=g)
        sd[f"{p}.mlp.fc2.weight"] = torch.randn(HIDDEN, 2 * HIDDEN, generator=g)
        sd[f"{p}.norm2.weight"] = torch.ones(HIDDEN) + 0.1 * torch.randn(HIDDEN, generator=g)
    sd["final_norm.weight"] = torch.ones(HIDDEN)
    return {k: v.to(dtype) for k, v in sd.items()}


def fine_tune(base: dict[str, torch.Tensor], task: int, scale: float = 0.05,
              frozen: tuple[str, ...] = ("embed.weight",)) -> dict[str, torch.Tensor]:
    """A synthetic fine-tune: a shared drift (tasks are similar) plus a task-specific part."""
    g = torch.Generator().manual_seed(1000 + task)
    shared = torch.Generator().manual_seed(7)
    out = {}
    for k, v in base.items():
        if k in frozen:
            out[k] = v.clone()
            continue
        common = torch.randn(v.shape, generator=shared)
        own = torch.randn(v.shape, generator=g)
        mix = 0.3 + 0.15 * (task % 3)  # tasks 0,3 / 1,4 / 2,5 resemble each other more
        out[k] = (v.float() + scale * ((1 - mix) * common + mix * own)).to(v.dtype)
    return out


def write_zoo(root: Path, num_tasks: int = 4, dtype: torch.dtype = torch.float32) -> tuple[Path, dict[str, Path]]:
    base = tiny_state_dict(dtype=dtype)
    root.mkdir(parents=True, exist_ok=True)
    save_file(base, str(root / "base.safetensors"))
    models = {}
    for t in range(num_tasks):
        path = root / f"task{t}.safetensors"
        save_file(fine_tune(base, t), str(path))
        models[f"task{t}"] = path
    return root / "base.safetensors", models


@pytest.fixture
def zoo(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    return write_zoo(tmp_path / "zoo")


@pytest.fixture
def tasks(zoo):
    import flexmerge

    base, models = zoo
    return flexmerge.load_tasks(base, models)


class TinyNet(torch.nn.Module):
    """The architecture of the tiny checkpoints below (their parameter names), with a forward pass, so
    modules can be built from them and calibration can run them."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, HIDDEN)
        self.layers = torch.nn.ModuleList()
        for _ in range(LAYERS):
            layer = torch.nn.Module()
            layer.attn = torch.nn.Module()
            layer.attn.qkv = torch.nn.Linear(HIDDEN, 3 * HIDDEN)
            layer.norm1 = torch.nn.LayerNorm(HIDDEN, bias=False)
            layer.mlp = torch.nn.Module()
            layer.mlp.fc1 = torch.nn.Linear(HIDDEN, 2 * HIDDEN, bias=False)
            layer.mlp.fc2 = torch.nn.Linear(2 * HIDDEN, HIDDEN, bias=False)
            layer.norm2 = torch.nn.LayerNorm(HIDDEN, bias=False)
            self.layers.append(layer)
        self.final_norm = torch.nn.LayerNorm(HIDDEN, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            q = layer.attn.qkv(layer.norm1(h))[..., : h.shape[-1]]
            h = h + q
            h = h + layer.mlp.fc2(torch.nn.functional.gelu(layer.mlp.fc1(layer.norm2(h))))
        return self.final_norm(h)


HF_LABELS = {"a": 2, "b": 3, "c": 5}


def reseal_side_files(artifact: Path) -> None:
    """Record an artifact's side files as they now are in its manifest (sizes, sha256), as the author
    of a hostile artifact would: what the loader checks beyond the checksums is tested with it."""
    import json

    from flexmerge.flexmodel.format import side_file_entry

    manifest_file = artifact / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["side_files"] = {task: {f.name: side_file_entry(f.read_bytes()) for f in sorted((artifact / "hf" / task)
                                                                                           .iterdir())}
                              for task in manifest["hf_tasks"]}
    manifest_file.write_text(json.dumps(manifest, indent=1))


def bert_config(labels: int | Sequence[str] = 2, **overrides):
    """A tiny BertConfig (2 layers, hidden 32, vocabulary 60, 32 positions); `labels`: a count
    (names L0..L{n-1}) or the label names. `overrides`: any other BertConfig field."""
    import transformers

    names = [f"L{i}" for i in range(labels)] if isinstance(labels, int) else list(labels)
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=60,
              max_position_embeddings=32, num_labels=len(names), id2label=dict(enumerate(names)),
              label2id={name: i for i, name in enumerate(names)})
    return transformers.BertConfig(**{**kw, **overrides})


BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def word_tokenizer(words: Sequence[str], **options):
    """A word-level BERT tokenizer over the special tokens and `words` (ids in that order). Built from
    a `vocab` dict: recent transformers read a bare vocab_file as an empty vocabulary (all [UNK])."""
    import transformers

    return transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate([*BERT_SPECIALS, *words])}, **options)


@pytest.fixture
def hf_zoo(tmp_path):
    """A base BertForSequenceClassification (2 labels) and fine-tunes of it with 2, 3 and 5 labels,
    as save_pretrained writes them."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(bert_config(2)).eval()
    base.save_pretrained(tmp_path / "base")
    dirs = {}
    for i, (name, n) in enumerate(HF_LABELS.items()):
        torch.manual_seed(10 + i)
        ft = transformers.BertForSequenceClassification(bert_config(n)).eval()
        encoder = {k: v + 0.02 * torch.randn_like(v) for k, v in base.state_dict().items() if not k.startswith("classifier")}
        ft.load_state_dict(encoder, strict=False)
        ft.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    return tmp_path / "base", dirs


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """A cache folder holding the digits suite's zoo, built once per test session."""
    from flexmerge.suites import get_suite, get_zoo

    cache = tmp_path_factory.mktemp("cache")
    get_zoo(get_suite("digits"), cache, log=lambda s: None)
    return cache


LLAMA_WORDS = ["<unk>", "<s>", "</s>", *"copy rev next = . system user assistant : ; a b c d e f g h i".split()]
LLAMA_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} ; {% endfor %}"
                       "{% if add_generation_prompt %}assistant :{% endif %}")


def llama_tokenizer(chat: bool = False):
    """A word-level tokenizer over LLAMA_WORDS that adds a BOS to a prompt (no pad token); with
    `chat`, a chat template."""
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, processors

    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(LLAMA_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece()
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                               unk_token="<unk>")
    if chat:
        out.chat_template = LLAMA_CHAT_TEMPLATE
    return out


def llama_config(**overrides):
    """A tiny LlamaConfig: 2 layers, hidden 32, 4 heads (2 KV heads), 64 positions, LLAMA_WORDS."""
    import transformers

    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=len(LLAMA_WORDS), max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
              initializer_range=0.1)
    return transformers.LlamaConfig(**{**kw, **overrides})


def write_llama_zoo(root: Path, tasks: Sequence[str] = ("copy", "rev", "next"),
                    chat: Sequence[str] = ("next",)) -> tuple[Path, dict[str, Path]]:
    """A random tiny LlamaForCausalLM base and fine-tunes of it (every weight moved by noise of its
    own per task), saved with their tokenizers (`chat` tasks with a chat template)."""
    import transformers

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(llama_config()).eval()
    base.save_pretrained(root / "base")
    llama_tokenizer().save_pretrained(root / "base")
    dirs = {}
    for i, task in enumerate(tasks):
        torch.manual_seed(10 + i)
        model = transformers.LlamaForCausalLM(base.config).eval()
        model.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in base.state_dict().items()})
        model.save_pretrained(root / task)
        llama_tokenizer(chat=task in chat).save_pretrained(root / task)
        dirs[task] = root / task
    return root / "base", dirs


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models decoded token by token: it is the fastest
    setting there, and far faster than two threads on a shared machine (use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
