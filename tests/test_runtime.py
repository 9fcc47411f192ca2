"""The multi-task runtime: one artifact, per-task modules sharing the stored tensors, and mixed-task
batches in one forward pass that answer exactly as each task's exported model does."""

from __future__ import annotations

import pytest
import torch

import flexmerge
from flexmerge.errors import ConfigError
from tests.conftest import bert_config, reseal_side_files, word_tokenizer

transformers = pytest.importorskip("transformers")
from flexmerge.runtime import Runtime  # noqa: E402
from flexmerge.runtime.batching import MixedModule  # noqa: E402

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "bird", "flew", "over", "tree", "red", "blue", "big", "small",
         "runs", "fast", "slow", "house", "car"]
LABELS = {"a": 2, "b": 3, "c": 5}
TEXTS = ["the cat sat on the mat", "a bird flew over the tree", "big red car", "small blue house runs fast",
         "dog", "the slow dog sat"]


def _tokenizer(directory):
    return word_tokenizer(WORDS)


def _config(n):
    return bert_config([f"{n}-L{i}" for i in range(n)], vocab_size=5 + len(WORDS), max_position_embeddings=64)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(_config(2)).eval()
    (root / "base").mkdir()
    base.save_pretrained(root / "base")
    _tokenizer(root / "base").save_pretrained(root / "base")
    dirs = {}
    for i, (name, n) in enumerate(LABELS.items()):
        torch.manual_seed(10 + i)
        ft = transformers.BertForSequenceClassification(_config(n)).eval()
        ft.load_state_dict({k: v + 0.005 * torch.randn_like(v) for k, v in base.state_dict().items()
                            if not k.startswith("classifier")}, strict=False)
        (root / name).mkdir()
        ft.save_pretrained(root / name)
        _tokenizer(root / name).save_pretrained(root / name)
        dirs[name] = root / name
    tasks = flexmerge.load_tasks(root / "base", dirs)
    out = root / "flex-2x"
    flexmerge.merge_to_disk(tasks, out, size=2.0)
    for name in LABELS:
        flexmerge.export(flexmerge.load(out), name, root / f"export-{name}")
    return out, root


def _reference(root, task, texts):
    """The task's exported model, loaded the ordinary way: what the runtime must reproduce."""
    model = transformers.BertForSequenceClassification.from_pretrained(root / f"export-{task}").eval()
    tok = transformers.AutoTokenizer.from_pretrained(root / f"export-{task}")
    with torch.no_grad():
        return torch.softmax(model(**tok(texts, padding=True, return_tensors="pt")).logits, -1)


def test_predict_equals_the_exported_models(artifact):
    out, root = artifact
    rt = Runtime.load(out)
    assert rt.tasks == list(LABELS) and rt.size <= 2.0
    for task, n in LABELS.items():
        info = rt.task_info(task)
        assert info["kind"] == "text-classification" and info["labels"] == [f"{n}-L{i}" for i in range(n)]
        want = _reference(root, task, TEXTS)
        got = rt.predict(task, TEXTS)
        for row, g in enumerate(got):
            probs = torch.tensor([g["scores"][label] for label in info["labels"]])
            torch.testing.assert_close(probs, want[row], rtol=0, atol=1e-5)
            assert g["label"] == info["labels"][int(want[row].argmax())]


def test_a_mixed_batch_is_one_pass_and_answers_in_input_order(artifact):
    out, root = artifact
    rt = Runtime.load(out)
    items = [(t, x) for x in TEXTS for t in ("c", "a", "b")][:13]
    mixed, _ = rt._mixed_model()
    routed = [m for m in mixed.modules() if isinstance(m, MixedModule)]
    calls, shared_rows = [], []
    for m in routed:
        m.register_forward_hook(lambda mod, *a: calls.append(mod))
        if len(m.choices) == 1:  # one weight set for every task: must see the whole batch at once
            m.choices[0].register_forward_hook(lambda mod, args, out: shared_rows.append(args[0].shape[0]))
    got = rt.predict_mixed(items)
    assert len(calls) == len(routed) and len(set(map(id, calls))) == len(routed)  # one forward pass
    assert shared_rows and all(n in (len(items), 1) for n in shared_rows)  # 1: position ids, shared by all rows
    for (task, text), g in zip(items, got):
        alone = rt.predict(task, [text])[0]
        assert g["label"] == alone["label"] and g["scores"] == pytest.approx(alone["scores"], abs=1e-5)


def test_modules_share_the_stored_tensors(artifact):
    out, _ = artifact
    rt = Runtime.load(out)
    modules = {t: rt.module(t) for t in rt.tasks}
    params = {t: dict(m.named_parameters()) for t, m in modules.items()}
    shared = [k for k in params["a"] if all(params[t][k].data_ptr() == params["a"][k].data_ptr() for t in rt.tasks)]
    assert any(k.startswith("bert.encoder") for k in shared)  # blocks one group serves are one tensor
    flex = rt.flex
    stored = {t.data_ptr() for s in flex.blocks for g in s.groups for t in g.tensors}
    assert all(params["a"][k].data_ptr() in stored or k in flex.frozen or k.startswith("classifier") for k in shared)
    assert params["a"]["classifier.weight"].shape == (2, 32) and params["c"]["classifier.weight"].shape == (5, 32)


def test_unknown_task_is_a_clear_error(artifact):
    rt = Runtime.load(artifact[0])
    with pytest.raises(ConfigError, match="unknown task 'zz'; this model serves: a, b, c"):
        rt.predict("zz", ["x"])


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [0, 2, 1, 3], [3, 1, 0, 2]])
def test_routed_rows_equal_each_tasks_own_module_whatever_the_order(order):
    """Groups contiguous in the batch order read slices, the others gather their rows; heads of
    unequal widths are padded with -inf. Either way each row equals its own task's module."""
    from flexmerge.runtime.batching import BatchRows

    torch.manual_seed(0)
    cases = {((0, 2), (1,), (3,)): (4, 4, 4), ((0, 1), (2, 3)): (4, 3)}
    for members, widths in cases.items():
        groups = [(list(tasks), torch.nn.Linear(6, w)) for tasks, w in zip(members, widths)]
        router = BatchRows(order)
        routed = MixedModule(router, groups)
        row_tasks = sorted([2, 0, 3, 0, 1, 2, 3], key=router.sort_key)
        router.set(row_tasks)
        x = torch.randn(len(row_tasks), 5, 6)
        got = routed(x)
        for row, t in enumerate(row_tasks):
            want = next(m for tasks, m in groups if t in tasks)(x[row])
            torch.testing.assert_close(got[row, :, : want.shape[-1]], want)
            assert torch.isneginf(got[row, :, want.shape[-1]:]).all()
        position = {t: i for i, t in enumerate(order)}
        for i, rows in router.plan(routed.members):
            spots = sorted(position[t] for t in members[i])
            assert isinstance(rows, slice) == (spots[-1] - spots[0] == len(spots) - 1)


def test_task_order_makes_the_heaviest_grouping_contiguous():
    from flexmerge.runtime.batching import task_order

    groups = {"big": [([0, 2], None), ([1, 3], None)], "small": [([0, 1], None), ([2], None), ([3], None)],
              "shared": [([0, 1, 2, 3], None)]}
    order = task_order(groups, {"big": 100, "small": 1, "shared": 1000}, 4)
    position = {t: i for i, t in enumerate(order)}
    assert abs(position[0] - position[2]) == 1 and abs(position[1] - position[3]) == 1


def test_twin_artifact_serves_each_task_as_its_export(artifact, tmp_path):
    """A group with per-member residuals is rebuilt per task (θ0 + shared + A·B), alone and in a mixed batch."""
    _, root = artifact
    tasks = flexmerge.load_tasks(root / "base", {name: root / name for name in LABELS})
    out = tmp_path / "twin"
    flexmerge.merge_to_disk(tasks, out, size=2.5, method="twin", params={"rank": 2})
    flex = flexmerge.load(out)
    assert any(g.residuals for b in flex.blocks for g in b.groups)
    rt = Runtime(flex)
    items = [(t, x) for x in TEXTS[:3] for t in LABELS]
    mixed = rt.predict_mixed(items)
    for task in LABELS:
        exported = tmp_path / f"export-{task}"
        flexmerge.export(flex, task, exported)
        model = transformers.BertForSequenceClassification.from_pretrained(exported).eval()
        tok = transformers.AutoTokenizer.from_pretrained(exported)
        with torch.no_grad():
            want = torch.softmax(model(**tok(TEXTS, padding=True, return_tensors="pt")).logits, -1)
        labels = rt.task_info(task)["labels"]
        for row, g in enumerate(rt.predict(task, TEXTS)):
            torch.testing.assert_close(torch.tensor([g["scores"][lb] for lb in labels]), want[row], rtol=0, atol=1e-5)
    for (task, text), g in zip(items, mixed):
        assert g["scores"] == pytest.approx(rt.predict(task, [text])[0]["scores"], abs=1e-5)


ROUTE_WORDS = {"a": ["cat", "dog", "bird", "mat"], "b": ["red", "blue", "big", "small"], "c": ["runs", "fast", "slow", "flew"]}


def _routing_texts(seed: int, per_task: int) -> list[tuple[str, str]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for task, words in ROUTE_WORDS.items():
        for _ in range(per_task):
            idx = torch.randint(len(words), (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
            out.append((" ".join(words[i] for i in idx), task))
    return out


@pytest.fixture(scope="module")
def routing_zoo(tmp_path_factory):
    """Like `artifact`'s models, but with word embeddings large enough (std 1, BERT's init is 0.02)
    that a random encoder's pooled features tell the words apart."""
    root = tmp_path_factory.mktemp("routing")
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(_config(2)).eval()
    with torch.no_grad():
        base.bert.embeddings.word_embeddings.weight.normal_(0, 1)
    dirs = {}
    for i, (name, n) in enumerate({"base": 2, **LABELS}.items()):
        torch.manual_seed(20 + i)
        ft = transformers.BertForSequenceClassification(_config(n)).eval()
        ft.load_state_dict({k: v + (0.005 * torch.randn_like(v) if name != "base" else 0) for k, v in
                            base.state_dict().items() if not k.startswith("classifier")}, strict=False)
        (root / name).mkdir()
        ft.save_pretrained(root / name)
        _tokenizer(root / name).save_pretrained(root / name)
        dirs[name] = root / name
    return flexmerge.load_tasks(dirs.pop("base"), dirs)


def test_router_routes_unknown_inputs_and_lives_in_the_artifact(routing_zoo, tmp_path):
    from typer.testing import CliRunner

    from flexmerge.cli import app

    tasks = routing_zoo
    out = tmp_path / "twin"
    flexmerge.merge_to_disk(tasks, out, size=2.5, method="twin", params={"rank": 2})
    with pytest.raises(ConfigError, match="no router"):
        Runtime.load(out).predict_routed(["a cat"])
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(f'{{"text": "{t}", "task": "{k}"}}' for t, k in _routing_texts(0, 40)))
    r = CliRunner().invoke(app, ["route", "train", str(out), "--calibration", str(calib), "--epochs", "60",
                                 "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    assert "calibration routing accuracy 1.000" in r.output
    assert flexmerge.flexmodel.read.is_artifact(out)
    rt = Runtime.load(out)
    assert rt.flex.router is not None and rt.flex.router.shape == {"features": 32, "hidden": 64, "tasks": 3}
    test = _routing_texts(1, 10)
    texts = [t for t, _ in test]
    routed = rt.predict_routed(texts)
    assert sum(a["task"] == k for a, (_, k) in zip(routed, test)) >= 0.9 * len(test)
    for a, text in zip(routed, texts):  # argmax mode answers as the routed task's own model
        assert a["scores"] == pytest.approx(rt.predict(a["task"], [text])[0]["scores"], abs=1e-5)
        assert sum(a["weights"].values()) == pytest.approx(1, abs=1e-5)
    mixed = rt.predict_routed(texts[:3], mode="mixture")
    assert [m["task"] for m in mixed] == [a["task"] for a in routed[:3]]
    router_file = out / "router.safetensors"
    router_file.write_bytes(router_file.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(flexmerge.errors.ArtifactError, match="router.safetensors: missing, truncated or corrupted"):
        flexmerge.load(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a cat"}\n')
    r = CliRunner().invoke(app, ["route", "train", str(out), "--calibration", str(bad)])
    assert r.exit_code == 2 and "row 1 has no 'text' and 'task'" in r.output


def test_mixture_weights_rebuild_shared_plus_weighted_residuals(artifact):
    """At a Twin-Merging point, Σ_t w_t θ_t = θ* + Σ_t w_t A_t B_t; one-hot weights give the task itself."""
    _, root = artifact
    tasks = flexmerge.load_tasks(root / "base", {name: root / name for name in LABELS})
    method = flexmerge.get_method("twin", rank=2)
    path = flexmerge.plan(tasks, method=method)
    from flexmerge.flexmodel.materialize import materialize

    flex = materialize(tasks, flexmerge.discover_blocks(tasks), path.assignment(len(path.steps)), method)
    w = torch.tensor([0.2, 0.5, 0.3])
    mix, shared = flex.mixture_state_dict(w), flex.shared_state_dict()
    b = next(i for i, blk in enumerate(flex.partition.blocks) if len(blk.parts[0].key) and any(
        len(tasks.meta[p.key].shape) == 2 for p in blk.parts))
    (group,) = flex.blocks[b].groups
    for p, part in enumerate(flex.partition.blocks[b].parts):
        want = shared[part.key] + sum(w[t] * (r[0] @ r[1] if len(r) == 2 else r[0])
                                      for t, r in enumerate(m[p] for m in group.residuals))
        torch.testing.assert_close(mix[part.key], want, rtol=1e-5, atol=1e-6)
    one_hot = flex.mixture_state_dict(torch.tensor([0.0, 1.0, 0.0]))
    own = flex.state_dict("b")
    assert all(torch.allclose(one_hot[k], own[k], atol=1e-7) for k in tasks.mergeable)
    with pytest.raises(ConfigError, match="summing to 1"):
        flex.mixture_state_dict(torch.tensor([0.5, 0.5, 0.5]))


def test_inputs_longer_than_the_models_positions_are_cut_to_them(artifact):
    """The word-level tokenizer here has no maximum length (1e30): a 100-word input would index past
    the 64 position embeddings. It is cut to 64 tokens, as the exported model's own pipeline
    (tokenizer with max_length=64, truncation) gives."""
    out, root = artifact
    long = " ".join(WORDS[i % len(WORDS)] for i in range(100))
    got = Runtime.load(out).predict("a", [long, "the cat"])
    model = transformers.BertForSequenceClassification.from_pretrained(root / "export-a").eval()
    tok = transformers.AutoTokenizer.from_pretrained(root / "export-a")
    with torch.no_grad():
        want = torch.softmax(model(**tok([long, "the cat"], padding=True, truncation=True, max_length=64,
                                         return_tensors="pt")).logits, -1)
    for row, g in enumerate(got):
        torch.testing.assert_close(torch.tensor(list(g["scores"].values())), want[row], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("change,message", [
    ({"architectures": ["Trainer"]}, "its config names 'Trainer', which is not a model class of transformers"),
    ({"vocab_size": 8_000_000}, "its config.json says vocab_size 8000000, which matches no embedding"),
    ({"model_type": "not-a-model", "auto_map": {"AutoConfig": "evil.Config"}}, "its config.json cannot be used"),
])
def test_an_artifacts_config_is_checked_before_any_model_is_built(artifact, tmp_path, change, message):
    """Side files are untrusted: a config naming any class of transformers, claiming a huge vocabulary
    or asking for remote code is refused in one error, with no prompt and nothing allocated."""
    import json
    import shutil

    out, _ = artifact
    copy = tmp_path / "flex"
    shutil.copytree(out, copy)
    config = copy / "hf" / "a" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    reseal_side_files(copy)  # the checksums agree: the author of the artifact wrote this config
    with pytest.raises(flexmerge.errors.FlexMergeError, match=message):
        Runtime.load(copy).predict("a", ["the cat"])


def test_a_malformed_tokenizer_is_one_error(artifact, tmp_path):
    import shutil

    out, _ = artifact
    copy = tmp_path / "flex"
    shutil.copytree(out, copy)
    (copy / "hf" / "a" / "tokenizer.json").write_text("{ not json")
    reseal_side_files(copy)
    with pytest.raises(flexmerge.errors.FlexMergeError, match="task 'a': its tokenizer files cannot be used"):
        Runtime.load(copy).predict("a", ["the cat"])
