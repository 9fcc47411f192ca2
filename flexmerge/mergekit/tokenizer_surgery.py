"""mergekit's tokenizer surgery (`tokenizer_source: union` or a model's path, `tokenizer:` with
`tokens` or `pad_to_multiple_of`), as mergekit 0.1.5 does it (`mergekit/tokenizer/build.py`,
`embed.py`), as a step before the merge: every input model is re-written over the output
vocabulary, so that the merge then proceeds as for models of one vocabulary, at any size.

1. The output tokenizer (`build_tokenizer`): the base's (its tokens past its `vocab_size`
   stripped), another model's, or the union of every model's (the base's tokenizer, then the
   tokens other models hold below their `vocab_size` and it lacks, then their added tokens);
   tokens forced by `tokens:` are added when missing.
2. Per model, where each output token is in its own vocabulary (`permutation`; a model without
   a tokenizer has the base's).
3. Per vocabulary tensor (input embeddings, output head; rows are tokens), each model's rows
   re-mapped (`remap_rows`, mergekit's `PermutedVocabulary`): a token it has keeps its row; one
   it lacks takes the row of the only model holding it, else the base's, else the mean of the
   models holding it (zeros when none does); `tokens:` forces a token's row from a model (its
   row of that token, or of a given token or id) or zeros; padding rows up to
   `pad_to_multiple_of` are the mean of the model's rows.
4. Each model is written to `OUT.vocabulary/N-NAME` (`remap_models`): hard links to its weight
   files (copies across file systems), a `vocabulary.safetensors` with its re-mapped tensors, an
   index that takes those from it, the output tokenizer and a config with the new `vocab_size`.

Where mergekit's order is a set's (which model's added tokens come first in a union; the first
model when there is no base), flexmerge takes the config's order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flexmerge._atomic import atomic_directory
from flexmerge.errors import CheckpointError, ConfigError
from flexmerge.io.open import open_checkpoint
from flexmerge.io.side_files import read_side_files_in
from flexmerge.io.source import HF_SIDE_GROUPS
from flexmerge.paths import inside

# tensors whose rows are tokens (mergekit's `vocabulary_axis: 0` weights), by name, when their row
# count is the model's vocab_size
VOCABULARY_TENSOR = re.compile(r"(.*\.)?(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out|"
                               r"tok_embeddings)\.weight")
REMAPPED_FILE = "vocabulary.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class ModelToken(BaseModel):
    """A token's row from one model: its row of `token`, or row `token_id` (mergekit's `model_token`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["model_token"]
    model: Path
    token_id: int | None = Field(None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ModelToken:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give one of token_id and token")
        return self


class Zero(BaseModel):
    """A row of zeros (mergekit's `zero`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["zero"]


class TokenSource(BaseModel):
    """Where one output token's row comes from (mergekit's `TokenEmbeddingConfig`): a model (its
    row of the token), a model's other token, zeros, or mergekit's default; `force`: for every
    model, even those that hold the token."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: ModelToken | Zero | Path | None = None
    force: bool = False


class TokenizerSurgery(BaseModel):
    """mergekit's tokenizer options with its model references resolved to paths: `inputs` are the
    models it merges (its `referenced_models`, in the config's order), `base_model` its base."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: Literal["union", "base"] | Path
    inputs: list[Path]
    base_model: Path | None = None
    tokens: dict[str, TokenSource] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(None, gt=0)

    @property
    def base(self) -> Path:
        """The model whose tokenizer the others default to (mergekit: base_model, else the first)."""
        return self.base_model if self.base_model is not None else self.inputs[0]


@dataclass
class Vocabularies:
    """The output tokenizer, its vocabulary and size (padded), and per model its own vocabulary and
    permutation (output id -> the model's row, -1 where it lacks the token)."""

    tokenizer: Any
    vocab: dict[str, int]
    size: int
    own: dict[Path, dict[str, int]]
    permutations: dict[Path, dict[int, int]]


# --- vocabularies --------------------------------------------------------------------------------


def build_vocabularies(surgery: TokenizerSurgery) -> Vocabularies:
    """The output tokenizer and each model's permutation onto it (mergekit's `build_tokenizer`)."""
    base_tok = _stripped_tokenizer(surgery.base)
    tokenizers: dict[Path, Any] = {surgery.base: base_tok}
    for model in surgery.inputs:
        if model != surgery.base and (tok := _tokenizer_of(model, required=False)) is not None:
            tokenizers[model] = tok
    if surgery.source == "base":
        out = base_tok
    elif surgery.source == "union":
        out = _union_tokenizer(base_tok, tokenizers)
    else:
        out = _tokenizer_of(surgery.source, required=True)
    existing = set(out.get_vocab())
    for token in surgery.tokens:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)
    vocab = out.get_vocab()
    own = {m: tok.get_vocab() for m, tok in tokenizers.items()}
    permutations = {}
    for model in surgery.inputs:
        model_vocab = own.get(model, own[surgery.base])
        rows = _vocab_size(model) or len(model_vocab)
        permutations[model] = {i: (model_vocab[t] if t in model_vocab and model_vocab[t] < rows else -1)
                               for t, i in vocab.items()}
    size = padded(len(vocab), surgery.pad_to_multiple_of)
    return Vocabularies(out, vocab, size, own, permutations)


def padded(n: int, multiple: int | None) -> int:
    """`n` rounded up to a multiple of `multiple` (mergekit's pad_to_multiple_of)."""
    return n if not multiple or n % multiple == 0 else (n // multiple + 1) * multiple


def _transformers():
    try:
        import transformers
    except ModuleNotFoundError:
        raise ConfigError("tokenizer surgery (tokenizer_source union or a model, tokenizer: tokens or "
                          "pad_to_multiple_of) reads tokenizers with transformers: pip install 'flexmerge[suites]'"
                          ) from None
    return transformers


def _has_tokenizer(model: Path) -> bool:
    return model.is_dir() and any((model / n).is_file() for n in HF_SIDE_GROUPS["tokenizer"])


def _tokenizer_of(model: Path, required: bool) -> Any:
    """`model`'s fast tokenizer; None (it uses the base's, as mergekit assumes) when it has none."""
    if not _has_tokenizer(model):
        if required:
            raise ConfigError(f"tokenizer surgery: {model} has no tokenizer files")
        return None
    try:
        return _transformers().AutoTokenizer.from_pretrained(model, use_fast=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"tokenizer surgery: the tokenizer of {model} cannot be read "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _vocab_size(model: Path) -> int | None:
    """The rows of the model's embeddings, as its config.json says (None without one)."""
    try:
        config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size") if isinstance(config, dict) else None
    if size is None and isinstance(config, dict):
        size = (config.get("text_config") or {}).get("vocab_size")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _stripped_tokenizer(model: Path) -> Any:
    """The base's tokenizer without the tokens at ids past its vocab_size (mergekit's
    `get_stripped_tokenizer`: BPE only)."""
    tok = _tokenizer_of(model, required=True)
    size = _vocab_size(model) or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok
    data = json.loads(tok._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise ConfigError(f"tokenizer surgery: the base {model}'s tokenizer has tokens past its vocab_size and is "
                          f"{data['model']['type']}, not BPE, which mergekit cannot strip either")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if not any(t in unused for t in (m.split(" ") if isinstance(m, str) else m))]
    import tokenizers

    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


def _union_tokenizer(base_tok: Any, tokenizers: Mapping[Path, Any]) -> Any:
    """The base's tokenizer with every model's other tokens (below its vocab_size) added, its plain
    tokens first, then the added (special) ones (mergekit's `build_union_tokenizer`)."""
    import tempfile

    vocab_out: dict[str, int] = {}
    added_out: dict[str, Any] = {}
    for model, tok in tokenizers.items():
        size = _vocab_size(model) or tok.vocab_size
        for token, i in tok.get_vocab().items():
            if i < size and token not in vocab_out:
                vocab_out[token] = len(vocab_out)
        for i, info in tok.added_tokens_decoder.items():
            if i < size and info.content not in added_out:
                added_out[info.content] = info
    with tempfile.TemporaryDirectory() as d:  # a copy: the base's own tokenizer stays as it is
        base_tok.save_pretrained(d, legacy_format=False)
        out = _transformers().AutoTokenizer.from_pretrained(d, use_fast=True, trust_remote_code=False)
    base_vocab = base_tok.get_vocab()
    for token in vocab_out:
        if token not in added_out and token not in base_vocab:
            out.add_tokens(token)
    for info in added_out.values():
        out.add_tokens(info)
    return out


# --- rows ----------------------------------------------------------------------------------------


def remap_rows(tensors: Mapping[Path, torch.Tensor], v: Vocabularies, surgery: TokenizerSurgery
               ) -> dict[Path, torch.Tensor]:
    """Each model's (rows, ...) vocabulary tensor over the output vocabulary (mergekit's
    `PermutedVocabulary.execute`, vocabulary axis 0)."""
    models = list(tensors)
    dtype = tensors[models[0]].dtype
    for t in tensors.values():
        dtype = torch.promote_types(dtype, t.dtype)
    shape = tensors[models[0]].shape[1:]
    if any(t.shape[1:] != shape for t in tensors.values()):
        raise CheckpointError(f"tokenizer surgery: the models' vocabulary tensors differ past their rows "
                              f"({[tuple(t.shape) for t in tensors.values()]})")
    configs = dict(surgery.tokens)
    average = _default_sources(v, models, configs, surgery.base_model)
    defaults: dict[str, torch.Tensor] = {}
    for token, i in v.vocab.items():
        cfg = configs.get(token)
        if not (cfg and cfg.force) and all(v.permutations[m][i] >= 0 for m in models):
            continue
        if token in average:
            holders = [m for m in models if v.permutations[m][i] >= 0]
            embed = torch.zeros(shape, dtype=dtype)
            for m in holders:
                embed = embed + tensors[m][v.permutations[m][i]]
            defaults[token] = embed / len(holders)
        elif cfg is not None:
            defaults[token] = _forced_row(cfg, token, i, tensors, v, shape, dtype)
    out = {}
    for model in models:
        p, old = v.permutations[model], tensors[model]
        new = torch.zeros((v.size, *shape), dtype=dtype)
        for token, i in v.vocab.items():
            force = token in configs and configs[token].force
            if p[i] >= 0 and not force:
                new[i] = old[p[i]]
            elif token in defaults:
                new[i] = defaults[token]
        if v.size > len(v.vocab):  # padding rows: the mean of the model's rows (mergekit, after Hewitt)
            new[len(v.vocab):] = new[:len(v.vocab)].mean(dim=0)
        out[model] = new
    return out


def _default_sources(v: Vocabularies, models: Sequence[Path], configs: dict[str, TokenSource],
                     base_model: Path | None) -> set[str]:
    """mergekit's default for a token `tokens:` does not name: the only model holding it, else
    zeros when none does, else the base when it holds it; the tokens left are averaged."""
    average = set()
    for token, i in v.vocab.items():
        if token in configs:
            continue
        holders = [m for m in models if v.permutations[m][i] >= 0]
        if len(holders) == 1:
            configs[token] = TokenSource(source=holders[0])
        elif not holders:
            configs[token] = TokenSource(source=Zero(kind="zero"))
        elif base_model in models and v.permutations[base_model][i] >= 0:
            configs[token] = TokenSource(source=base_model)
        else:
            average.add(token)
    return average


def _forced_row(cfg: TokenSource, token: str, i: int, tensors: Mapping[Path, torch.Tensor], v: Vocabularies,
                shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The row `cfg` gives `token` (mergekit's `compute_default_embedding`)."""
    if isinstance(cfg.source, Zero):
        return torch.zeros(shape, dtype=dtype)
    model = cfg.source.model if isinstance(cfg.source, ModelToken) else cfg.source
    if model is None or model not in tensors:
        raise ConfigError(f"tokenizer surgery: token {token!r} takes its row from {model}, which is not one of the "
                          "models merged")
    if isinstance(cfg.source, ModelToken):
        row = cfg.source.token_id
        if row is None:
            own = v.own.get(model, v.own[next(iter(v.own))])
            if cfg.source.token not in own:
                raise ConfigError(f"tokenizer surgery: token {cfg.source.token!r} is not in {model}'s vocabulary")
            row = own[cfg.source.token]
        if not 0 <= row < tensors[model].shape[0]:
            raise ConfigError(f"tokenizer surgery: token id {row} is out of range for {model} "
                              f"({tensors[model].shape[0]} rows)")
        return tensors[model][row]
    row = v.permutations[model][i]
    if row < 0:
        raise ConfigError(f"tokenizer surgery: token {token!r} is not in {model}'s vocabulary")
    return tensors[model][row]


# --- models on disk ------------------------------------------------------------------------------


def remap_models(surgery: TokenizerSurgery, names: Mapping[Path, str], folder: Path) -> dict[Path, Path]:
    """Every input re-written over the output vocabulary under `folder` (see the module); returns
    {input path: its re-mapped directory}. `names`: a name for each input's directory."""
    v = build_vocabularies(surgery)
    sources = {m: _open(m) for m in surgery.inputs}
    keys = _vocabulary_keys(surgery, sources)
    remapped: dict[Path, dict[str, torch.Tensor]] = {m: {} for m in surgery.inputs}
    for key in keys:
        for model, rows in remap_rows({m: sources[m].read(key) for m in surgery.inputs}, v, surgery).items():
            remapped[model][key] = rows.contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for n, model in enumerate(surgery.inputs):
        target = folder / f"{n}-{names.get(model, model.name)}"
        _write_model(model, remapped[model], v, target)
        out[model] = target
    return out


def _open(model: Path):
    if not model.is_dir() or not any((model / n).is_file() for n in ("model.safetensors", INDEX_FILE)):
        raise ConfigError(f"tokenizer surgery re-writes Hugging Face model directories of safetensors weights; "
                          f"{model} is not one")
    return open_checkpoint(model)


def _vocabulary_keys(surgery: TokenizerSurgery, sources: Mapping[Path, Any]) -> list[str]:
    """The tensors whose rows are tokens: embedding and output-head names of the base's with as many
    rows as its vocab_size (mergekit's weights with a vocabulary axis); every model must hold them."""
    base = sources[surgery.base]
    size = _vocab_size(surgery.base)
    keys = [k for k in base.keys() if VOCABULARY_TENSOR.fullmatch(k) and len(base.meta(k).shape) == 2
            and (size is None or base.meta(k).shape[0] == size)]
    if not keys:
        raise ConfigError(f"tokenizer surgery: the base {surgery.base} has no embedding tensors whose rows are its "
                          f"{size} tokens ({VOCABULARY_TENSOR.pattern})")
    for model, src in sources.items():
        missing = [k for k in keys if k not in src.keys()]
        if missing:
            raise CheckpointError(f"tokenizer surgery: {model} has no {missing[0]!r}")
    return keys


def _write_model(model: Path, tensors: dict[str, torch.Tensor], v: Vocabularies, target: Path) -> None:
    """`model` as a directory over the output vocabulary: its weight files hard-linked, its
    re-mapped tensors in REMAPPED_FILE, an index choosing them, the output tokenizer, its other
    side files and a config with the new vocab_size."""
    from safetensors.torch import save_file

    with atomic_directory(target, overwrite=True, replaceable=is_remapped, what="a re-mapped model") as tmp:
        weight_map = {}
        for n, (name, keys) in enumerate(_weight_files(model).items()):
            linked = f"source-{n:05d}.safetensors"
            _link_or_copy(model / name, tmp / linked)
            weight_map.update({k: linked for k in keys if k not in tensors})
        save_file(tensors, str(tmp / REMAPPED_FILE), metadata={"format": "pt"})
        weight_map.update({k: REMAPPED_FILE for k in tensors})
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        side = read_side_files_in(model)
        for name, data in side.items():  # the output tokenizer brings its own chat template
            if name not in HF_SIDE_GROUPS["tokenizer"] and name not in HF_SIDE_GROUPS["chat template"]:
                (tmp / name).write_bytes(data)
        v.tokenizer.save_pretrained(str(tmp))
        config = json.loads(side.get("config.json", b"{}"))
        config["vocab_size"] = v.size
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _weight_files(model: Path) -> dict[str, list[str]]:
    """{weight file name: its tensor names} of a safetensors model directory."""
    if (model / "model.safetensors").is_file():
        return {"model.safetensors": open_checkpoint(model / "model.safetensors").keys()}
    weight_map = json.loads((model / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
    files: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        inside(model, name, f"shard named by {INDEX_FILE}")
        files.setdefault(name, []).append(key)
    return files


def is_remapped(directory: Path) -> bool:
    """Whether `directory` is a model `remap_models` wrote (and may replace)."""
    return (directory / REMAPPED_FILE).is_file() and (directory / INDEX_FILE).is_file()


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no copy of the weights), or a copy where the file system cannot link."""
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)
