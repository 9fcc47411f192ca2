"""Text generation on a causal-LM artifact (`flexmerge.runtime.generation`): sequences of different
tasks and prompt lengths decode together on the mixed copy of the model, one forward pass per step,
joining and leaving mid-flight, and give token for token what each task's exported model gives
with transformers' own `generate`; seeded sampling equals the sampling formula written out here."""

from __future__ import annotations

import pytest
import torch

import flexmerge
from flexmerge.errors import ConfigError
from hypothesis import given, settings, strategies as st

from tests.conftest import llama_tokenizer, write_llama_zoo

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from flexmerge.runtime import Runtime  # noqa: E402
from flexmerge.runtime.batching import BatchRows, MixedModule, mixed_copy  # noqa: E402
from flexmerge.runtime.generation import (  # noqa: E402
    ContextLengthError,
    Generator,
    Lane,
    Sampling,
    TaskDecoding,
    TextStream,
    top_p_filter,
)

TASKS = ("copy", "rev", "next")
_TOKENIZER = llama_tokenizer()
PROMPTS = [("copy", "copy a b c ="), ("rev", "rev a b ="), ("next", "next a b c d e f"), ("copy", "copy a"),
           ("rev", "rev g h a b c d e f = . a b"), ("next", "next a"), ("copy", "b"), ("rev", "rev c d e f g h a =")]
NEW = 10


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """A 2x artifact of three tiny Llama fine-tunes (shared and per-task groups), and each task's
    export as a plain transformers directory."""
    root = tmp_path_factory.mktemp("llm")
    base, dirs = write_llama_zoo(root)
    out = root / "flex-2x"
    flexmerge.merge_to_disk(flexmerge.load_tasks(base, dirs), out, size=2.0)
    exports = {t: flexmerge.export(flexmerge.load(out), t, root / f"export-{t}") for t in TASKS}
    return out, exports


@pytest.fixture(scope="module")
def references(llm):
    """Per task: its exported model and tokenizer, loaded the ordinary way."""
    _, exports = llm
    return {t: (transformers.AutoModelForCausalLM.from_pretrained(d).eval(),
                transformers.AutoTokenizer.from_pretrained(d)) for t, d in exports.items()}


def _generate(references, task: str, prompt: list[int], new: int) -> list[int]:
    """transformers' generate, greedy, one prompt alone (no padding), stopped at EOS."""
    model, _ = references[task]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=2)
    return out[0, len(prompt):].tolist()


def test_a_mixed_batch_decodes_as_each_exported_model_generates(llm, references):
    """8 prompts of 3 tasks and lengths 2-13, at most 3 rows at a time: rows join while others
    decode (caches of different lengths merged, left padding) and leave as they end; every row's
    tokens equal its task's exported model's `generate`, and each step is one pass of the mixed
    copy (two when rows join: their prefill)."""
    rt = Runtime.load(llm[0])
    generator = rt.generator(max_batch=3)
    (lane,) = generator.lanes
    assert lane.rows is not None  # the mixed copy, not one model per task
    mixed_norms = [m for m in lane.model.modules() if isinstance(m, MixedModule)
                   and type(m.choices[0]).__name__ == "LlamaRMSNorm"]
    assert len(mixed_norms) == 5 and any(len(m.choices) > 1 for m in mixed_norms)  # norms are mixed too
    passes = []
    lane.model.register_forward_hook(lambda module, args, kwargs, out: passes.append(kwargs["input_ids"].shape),
                                     with_kwargs=True)
    runs, widths = [], []
    for i, (task, text) in enumerate(PROMPTS):
        sampling = Sampling(max_tokens=NEW - i % 3, temperature=0)
        runs.append(generator.submit(task, rt.encode_prompt(task, text), sampling))
        if i % 2:  # two more sequences arrive every second step
            before = len(passes)
            generator.step()
            widths.append([shape for shape in passes[before:]])
    generator.run()
    for (task, _), run in zip(PROMPTS, runs):
        assert run.tokens == _generate(references, task, run.prompt, run.sampling.max_tokens), task
        assert run.finish_reason == ("stop" if run.tokens[-1] == 2 else "length")
    assert all(1 <= len(step) <= 2 and step[0][1] == 1 for step in widths[1:])  # a decode pass, then a prefill
    assert max(shape[0] for shape in passes) == 3 and any(shape[1] > 1 and shape[0] > 1 for shape in passes)


def test_static_batches_give_the_same_tokens(llm, references):
    rt = Runtime.load(llm[0])
    generator = rt.generator(max_batch=4, join="static")
    runs = [generator.submit(t, rt.encode_prompt(t, x), Sampling(max_tokens=NEW, temperature=0)) for t, x in PROMPTS]
    generator.step()
    assert generator.running == 4 and len(generator._waiting) == 4  # the rest wait for the batch to end
    generator.run()
    for (task, _), run in zip(PROMPTS, runs):
        assert run.tokens == _generate(references, task, run.prompt, NEW)


def test_text_is_the_completion_of_the_prompt_and_stops_at_a_stop_string(llm, references):
    """The text is what follows the prompt's text (decoded with it), as the updates handed it out;
    a stop string ends it, and is not part of it."""
    rt = Runtime.load(llm[0])
    task, text = PROMPTS[0]
    (run,) = rt.generate([(task, text)], Sampling(max_tokens=NEW, temperature=0))
    tok = references[task][1]
    full = tok.decode(run.prompt + run.tokens, skip_special_tokens=True)
    assert run.text == full[len(tok.decode(run.prompt, skip_special_tokens=True)):] and run.text
    words = run.text.split()
    stop = " ".join(words[2:4])  # two words in
    generator = rt.generator()
    cut = generator.submit(task, run.prompt, Sampling(max_tokens=NEW, temperature=0, stop=("zzz", stop)))
    pieces = []
    while not cut.finished:
        pieces += [u.text for u in generator.step() if u.generation is cut]
    assert cut.finish_reason == "stop" and cut.text == run.text[:run.text.index(stop)] == "".join(pieces)


def test_a_stream_holds_back_what_may_begin_a_stop_string():
    tok = llama_tokenizer()
    ids = tok("a b c d", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, tok("copy =")["input_ids"], stop=("b c e",))
    out = [stream.push(i) for i in ids]
    assert out == [(" a", False), (" ", False), ("", False), ("b c d", False)]  # "b c" might have begun "b c e"
    stream = TextStream(tok, [], stop=("c",))
    assert [stream.push(i) for i in ids[:3]] == [("a", False), (" b", False), (" ", True)]


@settings(max_examples=150, deadline=None)
@given(tokens=st.lists(st.sampled_from([6, 7, 13, 14, 15, 16, 17]), min_size=1, max_size=12),
       stops=st.lists(st.sampled_from(["a", "b c", " b", "c d e", "= .", "h i", "zz"]), max_size=3))
def test_streamed_text_is_the_decoded_text_cut_at_the_first_stop(tokens, stops):
    """Whatever the tokens and stop strings: the pieces handed out add up to the completion's text
    (the prompt and completion decoded, less the prompt's text) up to the first stop string, and
    nothing of a stop string is handed out."""
    tok = _TOKENIZER
    prompt = tok("copy a =")["input_ids"]
    stream = TextStream(tok, prompt, stops)
    pieces, stopped = [], False
    for t in tokens:
        piece, stopped = stream.push(t)
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        pieces.append(stream.flush())
    full = tok.decode(prompt + tokens, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)):]
    ends = [full.find(s) for s in stops if s in full]
    assert "".join(pieces) == (full[:min(ends)] if ends else full)
    assert stopped == bool(ends)


def test_seeded_sampling_is_the_formula_and_does_not_depend_on_the_batch(llm, references):
    """temperature, then top-p (the least likely tokens dropped while their cumulative probability
    is at most 1 - top_p, the most likely kept), then a draw with a generator seeded by `seed`."""
    rt = Runtime.load(llm[0])
    task, text = PROMPTS[2]
    sampling = Sampling(max_tokens=NEW, temperature=0.7, top_p=0.8, seed=1234)
    alone = rt.generate([(task, text)], sampling)[0]
    crowd = rt.generate([*PROMPTS[:2], (task, text), *PROMPTS[3:]], sampling)[2]
    assert crowd.tokens == alone.tokens
    model, _ = references[task]
    random = torch.Generator().manual_seed(1234)
    ids = list(alone.prompt)
    for _ in range(NEW):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float() / 0.7
        probs = logits.softmax(-1)
        order = probs.argsort(descending=True)
        keep = torch.zeros_like(probs, dtype=torch.bool)
        total = 0.0
        for k in order.tolist():  # the most likely tokens until their probability passes top_p
            keep[k] = True
            total += float(probs[k])
            if total >= 0.8:
                break
        token = int(torch.multinomial(torch.where(keep, probs, 0) / probs[keep].sum(), 1, generator=random))
        ids.append(token)
        if token == 2:
            break
    assert alone.tokens == ids[len(alone.prompt):]
    assert rt.generate([(task, text)], Sampling(max_tokens=NEW, temperature=0.7, seed=99))[0].tokens != alone.tokens


def test_top_p_filter_equals_transformers_warper():
    from transformers.generation.logits_process import TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    for top_p in (0.0, 0.1, 0.5, 0.9, 0.999):
        want = TopPLogitsWarper(top_p if top_p > 0 else 1e-12)(None, logits.clone())
        assert torch.equal(top_p_filter(logits, top_p), want)


def test_an_end_of_sequence_token_ends_a_row_and_counts(llm, references):
    """A row ends at its task's end-of-sequence id (here declared to be the token the model
    emits third) with finish_reason "stop"; the other rows carry on."""
    rt = Runtime.load(llm[0])
    task, text = PROMPTS[0]
    prompt = rt.encode_prompt(task, text)
    want = _generate(references, task, prompt, NEW)
    decoding = rt.decoding(task)
    generator = Generator(rt.generator().lanes, {task: TaskDecoding(decoding.tokenizer, (want[2],)),
                                                 "rev": rt.decoding("rev")})
    ends = generator.submit(task, prompt, Sampling(max_tokens=NEW, temperature=0))
    other = generator.submit("rev", rt.encode_prompt("rev", "rev a ="), Sampling(max_tokens=NEW, temperature=0))
    generator.run()
    assert ends.tokens == want[:want.index(want[2]) + 1] and ends.finish_reason == "stop"
    assert other.tokens == _generate(references, "rev", other.prompt, NEW)


def test_a_cancelled_sequence_leaves_and_the_others_go_on(llm, references):
    rt = Runtime.load(llm[0])
    generator = rt.generator()
    greedy = Sampling(max_tokens=NEW, temperature=0)
    runs = [generator.submit(t, rt.encode_prompt(t, x), greedy) for t, x in PROMPTS[:3]]
    generator.step()
    generator.step()
    generator.cancel(runs[1])
    generator.step()
    assert generator.running == 2 and len(runs[1].tokens) == 2 and not runs[1].finished
    generator.run()
    for (task, _), run in zip([PROMPTS[0], PROMPTS[2]], [runs[0], runs[2]]):
        assert run.tokens == _generate(references, task, run.prompt, NEW)


def test_prompts_that_leave_no_room_are_refused(llm):
    rt = Runtime.load(llm[0])
    generator = rt.generator()
    with pytest.raises(ContextLengthError, match="maximum context length is 64 tokens; the prompt has 60 and "
                                                 "max_tokens asks for 5 more"):
        generator.submit("copy", [1] * 60, Sampling(max_tokens=5))
    with pytest.raises(ConfigError, match="top_p must be from 0 to 1"):
        Sampling(top_p=1.5)
    with pytest.raises(ConfigError, match="is a causal LM: it generates text"):
        rt.predict("copy", ["copy a"])
    assert rt.task_info("copy") == {"task": "copy", "kind": "text-generation", "labels": None}


def test_mixed_modules_cut_keyword_and_tuple_io_by_rows():
    """Any parameter-holding module is mixed: inputs given by keyword are cut by rows too, and a
    tuple output is gathered element by element (None kept); shared inputs serve every row."""

    class Scale(torch.nn.Module):
        def __init__(self, w: float):
            super().__init__()
            self.w = torch.nn.Parameter(torch.full((3,), w))

        def forward(self, x, *, shift=None):
            return x * self.w + (0 if shift is None else shift), None

    rows = BatchRows([0, 1, 2])
    module = MixedModule(rows, [([0, 2], Scale(2.0)), ([1], Scale(-1.0))])
    rows.set([0, 1, 1, 2])
    x, shift = torch.randn(4, 5, 3), torch.randn(1, 5, 3)  # shift: one row, for every row
    got, nothing = module(x, shift=shift)
    assert nothing is None
    torch.testing.assert_close(got, x * torch.tensor([2.0, -1, -1, 2])[:, None, None] + shift)


def test_linear_groups_of_few_rows_equal_each_linear_on_its_rows():
    """A Linear group reading few rows runs as (W · xᵀ)ᵀ, not through its forward: equal to each
    task's Linear on its rows (bias or none, 2-D and 3-D inputs, groups over SKINNY_ROWS too);
    a Linear with a hook runs as itself, so the hook sees its rows."""
    torch.manual_seed(0)
    with_bias, without = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5, bias=False)
    rows = BatchRows([0, 1])
    module = MixedModule(rows, [([0], with_bias), ([1], without)])
    for row_tasks, shape in (([0, 0, 1], (1,)), ([0, 1, 1], (4,)), ([0, 1], ()), ([0] * 3 + [1] * 12, (2,))):
        rows.set(row_tasks)
        x = torch.randn(len(row_tasks), *shape, 6)
        want = torch.stack([x[i] @ without.weight.T if t else x[i] @ with_bias.weight.T + with_bias.bias
                            for i, t in enumerate(row_tasks)])
        torch.testing.assert_close(module(x), want)

    rows.set([0, 1, 1])
    without.forward = with_bias.forward = None  # few rows: not called
    module(torch.randn(3, 1, 6))
    del without.forward, with_bias.forward
    seen = []
    without.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    module(torch.randn(3, 1, 6))
    assert seen == [2]


def test_mixed_copy_declines_sequence_first_modules():
    class Seq(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(4, 2)  # batch_first=False: dim 0 is the sequence
            self.out = torch.nn.Linear(4, 4)

    assert mixed_copy([Seq(), Seq()], Seq) is None

    class Nested(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = torch.nn.Module()
            self.block.scale = torch.nn.Parameter(torch.ones(4))  # holds one of its own: mixed as a whole
            self.block.inner = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 2)

    mixed, _ = mixed_copy([Nested(), Nested()], Nested)
    assert isinstance(mixed.block, MixedModule) and isinstance(mixed.head, MixedModule)
    assert not any(isinstance(m, MixedModule) for m in mixed.block.choices[0].modules())


def test_a_plain_model_lane_decodes_alone(references):
    """The core on one ordinary model (as the evaluators use it): left padding for prompts of
    different lengths, the same tokens as generate."""
    model, tok = references["rev"]
    prompts = [tok(x)["input_ids"] for _, x in PROMPTS]
    generator = Generator([Lane(model, {"rev": 0})], {"rev": TaskDecoding(None, (2,))}, max_batch=8)
    runs = [generator.submit("rev", p, Sampling(max_tokens=NEW, temperature=0)) for p in prompts]
    generator.run()
    assert [r.tokens for r in runs] == [_generate(references, "rev", p, NEW) for p in prompts]
