"""PLeaS for BERT-style Hugging Face encoders (BertModel and any encoder with BERT's parameter names).

Per layer, two kinds of units are matched: the MLP's intermediate units (intermediate.dense rows =
output.dense columns; merged or kept private, widths by the size budget) and the attention heads
(whole heads of Q/K/V rows = attention.output.dense columns, plus within-head dims permuted
consistently for Q and K, and for V and O). The residual stream is left unpermuted and shared:
every LayerNorm normalizes the whole hidden axis and the residual adds every layer into it, so one
stream permutation would tie all layers together, and a standard checkpoint has one hidden_size,
so the stream cannot be widened either. Heads are always all merged: BertConfig derives the head
size as hidden_size / num_attention_heads (and Q/K/V are hidden x hidden), so a checkpoint with
more heads of the same size does not exist. Shared parameters are averaged; the intermediate axis
is zero-padded to one uniform intermediate_size (a zero unit is act(0) = 0 times zero columns:
an exact no-op). See docs/pleas.md.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from flexmerge.errors import CheckpointError, ConfigError
from flexmerge.pleas.common import (PLEAS_INFO, PleasModel, State, allowed_inputs, check_matching, check_pair,
                                    check_two, layout, recording, widen_matrix)
from flexmerge.pleas.lstsq import NormalEquations
from flexmerge.pleas.matching import (CorrelationStats, Split, block_hungarian, hungarian, split, unit_perm,
                                       weight_matching)
from flexmerge.pleas.schedule import dense_size, schedule, size_of
from flexmerge.pleas.spec import PermSpec

# The spec, as data: module paths inside layer i (weights NAME.weight (out, in), NAME.bias).
BERT_LAYER = "encoder.layer.{i}."
BERT = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attn_out": "attention.output.dense",        # reads the per-head context vectors (columns by head)
    "inter": "intermediate.dense",               # rows: intermediate units
    "out": "output.dense",                       # columns: intermediate units
    "norms": ("attention.output.LayerNorm", "output.LayerNorm"),  # stream: shared, averaged
}
REFIT = ("attn_out", "inter", "out")             # layers refit by least squares
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def is_bert(model) -> bool:
    """A transformers model, or a directory whose config.json names a model type."""
    if isinstance(model, torch.nn.Module):
        return hasattr(model, "config") and hasattr(model.config, "num_attention_heads")
    path = Path(model) if isinstance(model, (str, Path)) else None
    return bool(path and path.is_dir() and (path / "config.json").is_file())


def load_encoder(model) -> torch.nn.Module:
    if isinstance(model, torch.nn.Module):
        return model.eval()
    import transformers

    try:
        return transformers.AutoModel.from_pretrained(str(model)).eval()
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot load the Hugging Face model in {model}: {e}") from None


def layers_of(state: State, config) -> int:
    """The number of encoder layers; an error naming every parameter the BERT spec needs and lacks."""
    depth = getattr(config, "num_hidden_layers", 0)
    need = [f"{BERT_LAYER.format(i=i)}{BERT[r]}.{t}" for i in range(depth) for r in ("query", "key", "value",
            "attn_out", "inter", "out") for t in ("weight", "bias")]
    need += [f"{BERT_LAYER.format(i=i)}{n}.weight" for i in range(depth) for n in BERT["norms"]]
    missing = [k for k in need if k not in state] or ([] if depth else ["num_hidden_layers in config"])
    if missing:
        shown = ", ".join(sorted(state)[:4])
        raise ConfigError(f"no PLeaS permutation spec fits this {type(config).__name__}: the bert spec needs "
                          f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} ({len(missing)} missing; "
                          f"its parameters: {shown}, ...); supported: residual-mlp, bert (BERT-style encoders)")
    from transformers.activations import ACT2FN

    if float(ACT2FN[config.hidden_act](torch.zeros(1))) != 0.0:
        raise ConfigError(f"hidden_act {config.hidden_act!r} is not 0 at 0, so zero-padded intermediate units "
                          "would not be no-ops")
    return depth


def _key(i: int, role: str, t: str = "weight") -> str:
    return f"{BERT_LAYER.format(i=i)}{BERT[role]}.{t}"


def inter_spec(state: State, depth: int) -> PermSpec:
    """The intermediate groups as a PermSpec (what the width schedules and weight matching read)."""
    groups = {f"inter.{i}": [(_key(i, "inter"), 0), (_key(i, "inter", "bias"), 0), (_key(i, "out"), 1)]
              for i in range(depth)}
    sizes = {f"inter.{i}": state[_key(i, "inter")].shape[0] for i in range(depth)}
    return PermSpec("bert", groups, sizes, [], {})


# ---- calibration -------------------------------------------------------------------------------------

def calibration_batches(calibration: Mapping[str, torch.Tensor], batch_size: int):
    """Token batches (dicts of (B, T) tensors) from input_ids [+ attention_mask, token_type_ids]."""
    if not isinstance(calibration, Mapping) or "input_ids" not in calibration:
        raise ConfigError("BERT calibration must hold 'input_ids' (N, T) [+ 'attention_mask', 'token_type_ids']: "
                          "a safetensors file, a dict of tensors, or a text file (one input a line)")
    ids = calibration["input_ids"]
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.is_floating_point():
        raise ConfigError(f"calibration input_ids must be a non-empty (N, T) integer tensor; got {tuple(ids.shape)}")
    full = {"attention_mask": torch.ones_like(ids), **{k: v for k, v in calibration.items()
                                                        if k in ("attention_mask", "token_type_ids")}}
    full["input_ids"] = ids
    for start in range(0, ids.shape[0], batch_size):
        yield {k: v[start:start + batch_size].long() for k, v in full.items()}


def tokenize_lines(path: Path, model_dir) -> dict[str, torch.Tensor]:
    """A text file, one calibration input a line, tokenized by model a's tokenizer."""
    import transformers

    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if not lines:
        raise ConfigError(f"calibration file {path} has no non-empty lines")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"text calibration needs a tokenizer in {model_dir}: {e}") from None
    enc = tok(lines, padding=True, truncation=True, max_length=128, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


# ---- matching -----------------------------------------------------------------------------------------

def match_heads(qk: torch.Tensor, vo: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heads matched as wholes, within-head dims matched per head pair.

    qk, vo: (H, H) similarities of a's dims with b's (Q and K outputs / rows together; V and O).
    A head pair's score is its best within-head assignment's total on qk plus on vo; the Hungarian
    over those scores picks the head permutation. Returns (head perm, qk dim perms, vo dim perms),
    dim perms (heads, d) for each of a's heads, indices into its matched b head."""
    perm, (pq, pv) = block_hungarian([qk, vo], qk.shape[0] // heads)
    return perm, pq, pv


def _head_rows(state: State, i: int, roles: tuple[str, ...]) -> torch.Tensor:
    """(H, ·): for every Q/K/V output dim (or O input dim), its weights (rows, bias; O: columns)."""
    parts = []
    for role in roles:
        if role == "attn_out":
            parts.append(state[_key(i, role)].T)
        else:
            parts += [state[_key(i, role)], state[_key(i, role, "bias")][:, None]]
    return torch.cat(parts, 1).double()


def weight_similarities(sa: State, sb: State, depth: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, dot products of a's dims with b's: (Q and K rows), (V rows and O columns)."""
    out = []
    for i in range(depth):
        sims = []
        for roles in (("query", "key"), ("value", "attn_out")):
            sims.append(_head_rows(sa, i, roles) @ _head_rows(sb, i, roles).T)
        out.append((sims[0], sims[1]))
    return out


@torch.no_grad()
def activation_stats(a: torch.nn.Module, b: torch.nn.Module, depth: int, calibration, batch_size: int
                     ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """Per layer: correlations of Q+K outputs and of context vectors (heads); of intermediate units."""
    hidden = a.config.hidden_size
    qk = [CorrelationStats(hidden) for _ in range(depth)]
    ctx = [CorrelationStats(hidden) for _ in range(depth)]
    inter = [CorrelationStats(a.config.intermediate_size) for _ in range(depth)]
    names = {f"{BERT_LAYER.format(i=i)}{BERT[r]}" for i in range(depth) for r in ("query", "key", "attn_out", "out")}
    with recording(a, names) as fa, recording(b, names) as fb:
        for batch in calibration_batches(calibration, batch_size):
            a(**batch), b(**batch)
            keep = batch["attention_mask"].bool()
            for i in range(depth):
                p = BERT_LAYER.format(i=i)
                for role in ("query", "key"):
                    qk[i].add(fa[p + BERT[role]][1][keep], fb[p + BERT[role]][1][keep])
                ctx[i].add(fa[p + BERT["attn_out"]][0][keep], fb[p + BERT["attn_out"]][0][keep])
                inter[i].add(fa[p + BERT["out"]][0][keep], fb[p + BERT["out"]][0][keep])
    heads = [(q.correlation(), c.correlation()) for q, c in zip(qk, ctx)]
    return heads, {f"inter.{i}": s.correlation() for i, s in enumerate(inter)}


# ---- merge ----------------------------------------------------------------------------------------------

def _whole(n: int) -> Split:
    """An axis merged unit for unit, in the given order (the shared stream)."""
    return Split(torch.arange(n), torch.arange(n), n)


def merged_state(sa: State, sb: State, depth: int, heads: int, head_match, splits: Mapping[str, Split]
                 ) -> tuple[State, dict[str, Split]]:
    """Averaged shared parameters, heads merged in matched order, intermediate axes [merged | a | b]
    zero-padded to the widest layer. Returns the state and, per layer, the Q/K and V/O dim splits."""
    state = {k: (sa[k] + sb[k]) / 2 if sa[k].is_floating_point() else sa[k].clone() for k in sa}
    dims: dict[str, Split] = {}
    width = max(s.width for s in splits.values())
    for i in range(depth):
        perm, pq, pv = head_match[i]
        n = sa[_key(i, "query")].shape[0]
        qk = Split(torch.arange(n), unit_perm(perm, pq), n)
        vo = Split(torch.arange(n), unit_perm(perm, pv), n)
        dims[f"qk.{i}"], dims[f"vo.{i}"] = qk, vo
        for role, s in (("query", qk), ("key", qk), ("value", vo)):
            for t in ("weight", "bias"):
                state[_key(i, role, t)] = layout(sa[_key(i, role, t)], sb[_key(i, role, t)], 0, s)
        state[_key(i, "attn_out")] = layout(sa[_key(i, "attn_out")], sb[_key(i, "attn_out")], 1, vo)
        s, stream = splits[f"inter.{i}"], _whole(sa[_key(i, "out")].shape[0])
        w_in = widen_matrix(sa[_key(i, "inter")], sb[_key(i, "inter")], s, stream)
        b_in = layout(sa[_key(i, "inter", "bias")], sb[_key(i, "inter", "bias")], 0, s)
        w_out = widen_matrix(sa[_key(i, "out")], sb[_key(i, "out")], stream, s)
        pad = width - s.width
        state[_key(i, "inter")] = torch.nn.functional.pad(w_in, (0, 0, 0, pad))
        state[_key(i, "inter", "bias")] = torch.nn.functional.pad(b_in, (0, pad))
        state[_key(i, "out")] = torch.nn.functional.pad(w_out, (0, pad))
    return state, dims


@torch.no_grad()
def refit(a: torch.nn.Module, b: torch.nn.Module, depth: int, calibration, splits: Mapping[str, Split],
          dims: Mapping[str, Split], state: State, batch_size: int, ridge: float) -> list[str]:
    """Least squares for every layer's attention output (over the merged heads' context vectors),
    intermediate.dense and output.dense, from both original models' own (permuted) activations;
    the shared stream is the mean of the two models' streams. Padding stays zero."""
    hidden = a.config.hidden_size
    stream = _whole(hidden)
    plan = {}
    for i in range(depth):
        s = splits[f"inter.{i}"]
        plan[f"{BERT_LAYER.format(i=i)}{BERT['attn_out']}"] = (i, "attn_out", dims[f"vo.{i}"], stream)
        plan[f"{BERT_LAYER.format(i=i)}{BERT['inter']}"] = (i, "inter", stream, s)
        plan[f"{BERT_LAYER.format(i=i)}{BERT['out']}"] = (i, "out", s, stream)
    eqs = {n: NormalEquations(si.width, so.width) for n, (_, _, si, so) in plan.items()}
    with recording(a, set(plan)) as fa, recording(b, set(plan)) as fb:
        for batch in calibration_batches(calibration, batch_size):
            a(**batch), b(**batch)
            keep = batch["attention_mask"].bool()
            for name, (_, _, si, so) in plan.items():
                (xa, ya), (xb, yb) = fa[name], fb[name]
                eqs[name].add(layout(xa[keep], xb[keep], -1, si), layout(ya[keep], yb[keep], -1, so))
    for name, (i, role, si, so) in plan.items():
        w, bias = eqs[name].solve(allowed_inputs(so, si, si.width), ridge)
        key = _key(i, role)
        new_w, new_b = torch.zeros_like(state[key]), torch.zeros_like(state[_key(i, role, "bias")])
        new_w[:w.shape[0], :w.shape[1]], new_b[:bias.shape[0]] = w.to(new_w.dtype), bias.to(new_b.dtype)
        state[key], state[_key(i, role, "bias")] = new_w, new_b
    return list(plan)


def pleas_bert(models: Mapping[str, object], size: float, calibration, *, schedule_name: str = "greedy",
               matching: str = "activation", least_squares: bool = True, ridge: float = 1e-6,
               batch_size: int = 32) -> PleasModel:
    """Two BERT-style encoders (HF directories or transformers models) merged by PLeaS to `size`."""
    check_two(models)
    (na, ma_src), (nb, mb_src) = models.items()
    a, b = load_encoder(ma_src), load_encoder(mb_src)
    sa, sb = ({k: v.detach() for k, v in m.state_dict().items()} for m in (a, b))
    check_pair(sa, sb, (na, nb))
    check_matching(matching, calibration is not None, least_squares)
    depth = layers_of(sa, a.config)
    if isinstance(calibration, (str, Path)):
        calibration = tokenize_lines(Path(calibration), ma_src)
    heads = a.config.num_attention_heads
    spec = inter_spec(sa, depth)
    if matching == "activation":
        head_sims, corr = activation_stats(a, b, depth, calibration, batch_size)
        perms = {g: hungarian(c) for g, c in corr.items()}
        quality = {g: corr[g][torch.arange(len(p)), p] for g, p in perms.items()}
    else:
        head_sims = weight_similarities(sa, sb, depth)
        perms, quality = weight_matching(spec.groups, spec.axes_of, sa, sb, rounds=100 if matching == "weights" else 0)
    if matching == "identity":  # rounds=0 above kept the intermediate identity
        d = sa[_key(0, "query")].shape[0] // heads
        head_match = [(torch.arange(heads), torch.arange(d).repeat(heads, 1), torch.arange(d).repeat(heads, 1))] * depth
    else:
        head_match = [match_heads(qk, vo, heads) for qk, vo in head_sims]
    shapes = {k: tuple(v.shape) for k, v in sa.items()}
    private = schedule(schedule_name, spec, shapes, size, {g: sorted(q.tolist(), reverse=True) for g, q in quality.items()})
    splits = {g: split(perms[g], quality[g], spec.sizes[g] - private[g]) for g in spec.sizes}
    state, dims = merged_state(sa, sb, depth, heads, head_match, splits)
    refitted = refit(a, b, depth, calibration, splits, dims, state, batch_size, ridge) if least_squares else []
    hf = a.config.to_dict()
    hf["intermediate_size"] = max(s.width for s in splits.values())
    samples = 0 if calibration is None else int(calibration["input_ids"].shape[0])
    config = {
        "architecture": "pleas-bert", "hf_config": hf, "tasks": [na, nb],
        "widths": "intermediate [merged, private] per layer " + str([[s.merged, s.private] for s in splits.values()])
                  + f", padded to {hf['intermediate_size']}; {heads} heads per layer, all merged",
        "intermediate": [[s.merged, s.private] for s in splits.values()],
        "size": size_of(spec, shapes, private), "dense_size": dense_size(spec, shapes, {g: (hf["intermediate_size"]
                - spec.sizes[g]) for g in spec.sizes}),
        "requested_size": size, "schedule": schedule_name, "matching": matching, "least_squares": least_squares,
        "ridge": ridge, "refitted": refitted, "calibration_samples": samples,
        "permutations": {**{g: {na: s.a_order.tolist(), nb: s.b_order.tolist()} for g, s in splits.items()},
                         **{f"heads.{i}": {nb: m[0].tolist()} for i, m in enumerate(head_match)}},
        "source": str(ma_src) if isinstance(ma_src, (str, Path)) else None,
    }
    return BertPleasModel(config, state)


class BertPleasModel(PleasModel):
    """A merged BERT-style encoder: a plain transformers model, written as a standard HF checkpoint."""

    def build(self) -> torch.nn.Module:
        import transformers

        hf = transformers.AutoConfig.for_model(**self.config["hf_config"])
        return transformers.AutoModel.from_config(hf).eval()

    def write(self, directory: Path) -> None:
        """config.json + model.safetensors (save_pretrained), pleas.json, and model a's tokenizer files."""
        self.module().save_pretrained(str(directory))
        info = {k: v for k, v in self.config.items() if k != "hf_config"}
        (directory / PLEAS_INFO).write_text(json.dumps(info, indent=1))
        source = self.config.get("source")
        for name in TOKENIZER_FILES if source else ():
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, directory / name)
