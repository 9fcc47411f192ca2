"""Every CLI command against bad input: each answer must be one `error:` line naming the file and
the problem, exit 2 (or a usage error, exit 2), never an internal error or a traceback (issue 30).

    PYTHONPATH=$PWD python3 benchmarks/cli_errors.py [WORD ...]    (only the cases whose name has a WORD)

Builds a tiny zoo, a flex-model artifact, a tiny Hugging Face BERT artifact and ~90 bad inputs in a
temporary folder: missing, empty, truncated and garbage files; malformed safetensors headers, shard
indexes, JSON lines, YAML (syntax, types, mergekit forms, alias bombs) and manifests; wrong option
values; unwritable outputs. Runs each command in-process (typer's CliRunner) and prints OK or BAD
per case; exits 1 if any is BAD. Takes about a minute (the sweep, route and pleas cases load models).
"""
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["FLEXMERGE_NO_PROGRESS"] = "1"
from typer.testing import CliRunner  # noqa: E402

import flexmerge  # noqa: E402
from flexmerge.cli import app  # noqa: E402
from tests.conftest import write_zoo  # noqa: E402
from tests.test_serve_http import build_artifact  # noqa: E402

R = Path(tempfile.mkdtemp(prefix="cli-errors-"))
base, models = write_zoo(R / "zoo", num_tasks=2)
M = [f"--model=task0={models['task0']}", f"--model=task1={models['task1']}"]
art = R / "art"
flexmerge.merge_to_disk(flexmerge.load_tasks(base, models), art, size=1.0)
hf_art = build_artifact(R / "hf")

# bad files
(R / "empty.safetensors").write_bytes(b"")
(R / "garbage.safetensors").write_bytes(os.urandom(300))
good = models["task0"].read_bytes()
(R / "trunc.safetensors").write_bytes(good[: len(good) // 2])
(R / "hdr.safetensors").write_bytes((10**12).to_bytes(8, "little") + b"{}")
(R / "json.safetensors").write_bytes((20).to_bytes(8, "little") + b'{"a": [1,2,3]}      ')
(R / "bad.pt").write_bytes(b"PK\x03\x04garbage")
(R / "bad.yaml").write_text("base: [unclosed\n")
(R / "list.yaml").write_text("- a\n- b\n")
(R / "types.yaml").write_text(f"base: {base}\nmodels: 5\nsize: big\n")
(R / "types2.yaml").write_text(f"base: {base}\nmodels:\n  task0: {models['task0']}\n  task1: {models['task1']}\nsize: big\n")
(R / "types3.yaml").write_text("base: 7\nmodels:\n  task0: [1]\n")
(R / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
(R / "bad.jsonl").write_text('{"text": "a", "task": "task0"}\n{not json\n')
(R / "wrong.jsonl").write_text('{"text": 5, "task": ["x"]}\n')
(R / "array.jsonl").write_text('[1, 2]\n')
(R / "dir.safetensors").mkdir()
# broken artifacts
def broken(name, edit=None, files=None):
    d = R / name
    shutil.copytree(art, d)
    if edit:
        m = json.loads((d / "manifest.json").read_text())
        edit(m)
        (d / "manifest.json").write_text(json.dumps(m))
    for f, data in (files or {}).items():
        (d / f).write_bytes(data)
    return d
trunc_manifest = broken("trunc_manifest", files={"manifest.json": (art / "manifest.json").read_bytes()[:200]})
wrong_types = broken("wrong_types", edit=lambda m: m.update(size="big", method=[1]))
shard = broken("trunc_shard", files={"shard-00000.safetensors": (art / "shard-00000.safetensors").read_bytes()[:500]})
no_version = broken("no_version", edit=lambda m: m.pop("flexmerge_version"))
bad_method = broken("bad_method", edit=lambda m: m.update(method={"name": 5}))
bad_unit = broken("bad_unit", edit=lambda m: m.update(unit_bytes=-5))
bad_router = broken("bad_router", edit=lambda m: m.update(router={"file": "router.safetensors", "bytes": 5, "sha256": "x",
                                                                  "features": 4, "hidden": 4, "tasks": 2}))
(R / "y_ts.yaml").write_text(f"base: {base}\nmodels:\n  task0: {models['task0']}\n  task1: {models['task1']}\nsize: 1\ntask_specific: 5\n")
(R / "y_blocks.yaml").write_text(f"base: {base}\nmodels:\n  task0: {models['task0']}\n  task1: {models['task1']}\nsize: 1\nblocks: [1, 2]\n")
(R / "y_params.yaml").write_text(f"base: {base}\nmodels:\n  task0: {models['task0']}\n  task1: {models['task1']}\nsize: 1\nparams: lam\n")
(R / "y_method.yaml").write_text(f"base: {base}\nmodels:\n  task0: {models['task0']}\n  task1: {models['task1']}\nsize: 1\nmethod: {{a: 1}}\n")
(R / "y_mk.yaml").write_text("merge_method: ties\nbase_model: nope\nmodels:\n  - model: 5\n    parameters: {density: abc}\n")
(R / "y_mk2.yaml").write_text("merge_method: ties\nslices: 5\n")
(R / "y_anchor.yaml").write_text("a: &a [*a]\n")
(R / "y_bomb.yaml").write_text("a: &a ['x','x','x','x','x','x','x','x','x']\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nh: [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n")
hfb = R / "hfbase"; shutil.copytree(hf_art.parent / "base", hfb); (hfb / "config.json").write_text("{broken")
hfi = R / "hfindex"; hfi.mkdir(); (hfi / "model.safetensors.index.json").write_text("{not json")
hfi2 = R / "hfindex2"; hfi2.mkdir(); (hfi2 / "model.safetensors.index.json").write_text('{"weight_map": {"a": 5}}')
hfi3 = R / "hfindex3"; hfi3.mkdir(); (hfi3 / "model.safetensors.index.json").write_text('[1]')
(R / "unreadable").mkdir(); (R / "unreadable" / "manifest.json").mkdir()
plan_file = R / "path.json"
r = CliRunner().invoke(app, ["plan", "--base", str(base), *M, "--out", str(plan_file)])
assert r.exit_code == 0, r.output
(R / "bad_path.json").write_text("{ nope")

(R / "good.jsonl").write_text('{"text": "a b", "task": "task0"}\n{"text": "c", "task": "task1"}\n')
(R / "badtask.jsonl").write_text('{"text": "a b", "task": "zzz"}\n{"text": "c", "task": "task1"}\n')
CASES = {
    "route train non-hf good cal": ["route", "train", str(art), "--calibration", str(R / "good.jsonl")],
    "route train unknown task": ["route", "train", str(hf_art), "--calibration", str(R / "badtask.jsonl")],
    "route train per-task w/o suite": ["route", "train", str(hf_art), "--calibration", str(R / "good.jsonl"), "--per-task", "3"],
    "export to /proc": ["export", str(art), "--task", "task0", "--out", "/proc/nope/x.safetensors"],
    "merge to /proc": ["merge", "--base", str(base), *M, "--size", "1", "--out", "/proc/nope"],
    "plan to /proc": ["plan", "--base", str(base), *M, "--out", "/proc/p.json"],
    "inspect unreadable manifest": ["inspect", str(R / "unreadable")],
    "yaml task_specific 5": ["merge", "--config", str(R / "y_ts.yaml"), "--out", str(R / "o1")],
    "yaml blocks list": ["merge", "--config", str(R / "y_blocks.yaml"), "--out", str(R / "o1")],
    "yaml params str": ["merge", "--config", str(R / "y_params.yaml"), "--out", str(R / "o1")],
    "yaml method dict": ["merge", "--config", str(R / "y_method.yaml"), "--out", str(R / "o1")],
    "yaml mergekit bad": ["merge", "--config", str(R / "y_mk.yaml"), "--out", str(R / "o1")],
    "yaml mergekit slices": ["merge", "--config", str(R / "y_mk2.yaml"), "--out", str(R / "o1")],
    "yaml recursive anchor": ["merge", "--config", str(R / "y_anchor.yaml"), "--out", str(R / "o1")],
    "yaml billion laughs": ["merge", "--config", str(R / "y_bomb.yaml"), "--out", str(R / "o1")],
    "sweep yaml bomb": ["sweep", "--config", str(R / "y_bomb.yaml"), "--out", str(R / "s3")],
    "hf index not json": ["merge", "--base", str(hfi), *M, "--size", "1", "--out", str(R / "o1")],
    "hf index wrong types": ["merge", "--base", str(hfi2), *M, "--size", "1", "--out", str(R / "o1")],
    "hf index array": ["merge", "--base", str(hfi3), *M, "--size", "1", "--out", str(R / "o1")],
    "plan missing base": ["plan", "--base", str(R / "nope"), *M, "--out", str(R / "p1.json")],
    "plan garbage base": ["plan", "--base", str(R / "garbage.safetensors"), *M, "--out", str(R / "p1.json")],
    "plan empty model": ["plan", "--base", str(base), "--model", f"t={R / 'empty.safetensors'}", "--model", f"u={models['task1']}", "--out", str(R / "p1.json")],
    "plan dir model": ["plan", "--base", str(base), "--model", f"t={R / 'dir.safetensors'}", "--model", f"u={models['task1']}", "--out", str(R / "p1.json")],
    "plan json-header model": ["plan", "--base", str(base), "--model", f"t={R / 'json.safetensors'}", "--model", f"u={models['task1']}", "--out", str(R / "p1.json")],
    "merge truncated model": ["merge", "--base", str(base), "--model", f"t={R / 'trunc.safetensors'}", "--model", f"u={models['task1']}", "--size", "1", "--out", str(R / "o1")],
    "merge huge header": ["merge", "--base", str(R / "hdr.safetensors"), *M, "--size", "1", "--out", str(R / "o1")],
    "merge bad pt": ["merge", "--base", str(R / "bad.pt"), *M, "--size", "1", "--out", str(R / "o1")],
    "merge bad yaml": ["merge", "--config", str(R / "bad.yaml"), "--out", str(R / "o1")],
    "merge list yaml": ["merge", "--config", str(R / "list.yaml"), "--out", str(R / "o1")],
    "merge types yaml": ["merge", "--config", str(R / "types.yaml"), "--out", str(R / "o1")],
    "merge types2 yaml": ["merge", "--config", str(R / "types2.yaml"), "--out", str(R / "o1")],
    "merge types3 yaml": ["merge", "--config", str(R / "types3.yaml"), "--out", str(R / "o1")],
    "merge binary yaml": ["merge", "--config", str(R / "bin.yaml"), "--out", str(R / "o1")],
    "merge missing yaml": ["merge", "--config", str(R / "none.yaml"), "--out", str(R / "o1")],
    "merge yaml dir": ["merge", "--config", str(R), "--out", str(R / "o1")],
    "merge size abc": ["merge", "--base", str(base), *M, "--size", "abc", "--out", str(R / "o1")],
    "merge size nan": ["merge", "--base", str(base), *M, "--size", "nan", "--out", str(R / "o1")],
    "merge max-bytes abc": ["merge", "--base", str(base), *M, "--max-bytes", "lots", "--out", str(R / "o1")],
    "merge param abc": ["merge", "--base", str(base), *M, "--size", "1", "--param", "lam=abc", "--out", str(R / "o1")],
    "merge param nokey": ["merge", "--base", str(base), *M, "--size", "1", "--param", "lam", "--out", str(R / "o1")],
    "merge method bad": ["merge", "--base", str(base), *M, "--size", "1", "--method", "ties:keep", "--out", str(R / "o1")],
    "merge gran bad": ["merge", "--base", str(base), *M, "--size", "1", "--granularity", "split:x", "--out", str(R / "o1")],
    "merge model no =": ["merge", "--base", str(base), "--model", "justaname", "--size", "1", "--out", str(R / "o1")],
    "merge out is file": ["merge", "--base", str(base), *M, "--size", "1", "--out", str(models["task0"])],
    "merge task-specific regex": ["merge", "--base", str(base), *M, "--size", "1", "--task-specific", "([", "--out", str(R / "o1")],
    "merge device bad": ["merge", "--base", str(base), *M, "--size", "1", "--device", "tpu9", "--out", str(R / "o1")],
    "merge executor bad": ["merge", "--base", str(base), *M, "--size", "1", "--executor", "nope", "--out", str(R / "o1")],
    "merge input-hash bad": ["merge", "--base", str(base), *M, "--size", "1", "--input-hash", "md5", "--out", str(R / "o1")],
    "merge mrc negative": ["merge", "--base", str(base), *M, "--size", "1", "--max-relative-change", "-1", "--out", str(R / "o1")],
    "inspect missing": ["inspect", str(R / "nope")],
    "inspect file": ["inspect", str(models["task0"])],
    "inspect trunc manifest": ["inspect", str(trunc_manifest)],
    "inspect wrong types": ["inspect", str(wrong_types)],
    "inspect no version": ["inspect", str(no_version)],
    "inspect bad method": ["inspect", str(bad_method)],
    "inspect bad unit": ["inspect", str(bad_unit)],
    "export trunc shard": ["export", str(shard), "--task", "task0", "--out", str(R / "e1.safetensors")],
    "export bad method": ["export", str(bad_method), "--task", "task0", "--out", str(R / "e1.safetensors")],
    "export bad unit": ["export", str(bad_unit), "--task", "task0", "--out", str(R / "e3.safetensors")],
    "export wrong types": ["export", str(wrong_types), "--task", "task0", "--out", str(R / "e1.safetensors")],
    "export bad router": ["export", str(bad_router), "--task", "task0", "--out", str(R / "e1.safetensors")],
    "export unknown task": ["export", str(art), "--task", "nope", "--out", str(R / "e1.safetensors")],
    "export bad dtype": ["export", str(art), "--task", "task0", "--out", str(R / "e1.safetensors"), "--out-dtype", "int3"],
    "export bad shard size": ["export", str(art), "--task", "task0", "--out", str(R / "e1"), "--max-shard-size", "big"],
    "methods extra arg": ["methods", "foo"],
    "sweep bad suite": ["sweep", "--suite", "nope"],
    "sweep bad methods": ["sweep", "--base", str(base), *M, "--methods", "nope", "--evaluator", "x:y", "--out", str(R / "s1")],
    "sweep bad evaluator": ["sweep", "--base", str(base), *M, "--evaluator", "no.such.module:f", "--sizes", "1", "--out", str(R / "s1")],
    "sweep evaluator not callable": ["sweep", "--base", str(base), *M, "--evaluator", "os:sep", "--sizes", "1", "--out", str(R / "s1")],
    "sweep eval-data missing": ["sweep", "--base", str(hf_art.parent / "base"), "--model", f"a={hf_art.parent / 'a'}", "--model", f"b={hf_art.parent / 'b'}", "--eval-data", f"a={R / 'nope.jsonl'}", "--eval-data", f"b={R / 'nope.jsonl'}", "--sizes", "1", "--out", str(R / "s2")],
    "sweep eval-data bad": ["sweep", "--base", str(hf_art.parent / "base"), "--model", f"a={hf_art.parent / 'a'}", "--model", f"b={hf_art.parent / 'b'}", "--eval-data", f"a={R / 'bad.jsonl'}", "--eval-data", f"b={R / 'bad.jsonl'}", "--sizes", "1", "--out", str(R / "s2")],
    "sweep eval-data wrong": ["sweep", "--base", str(hf_art.parent / "base"), "--model", f"a={hf_art.parent / 'a'}", "--model", f"b={hf_art.parent / 'b'}", "--eval-data", f"a={R / 'wrong.jsonl'}", "--eval-data", f"b={R / 'wrong.jsonl'}", "--sizes", "1", "--out", str(R / "s2")],
    "sweep eval-data array": ["sweep", "--base", str(hf_art.parent / "base"), "--model", f"a={hf_art.parent / 'a'}", "--model", f"b={hf_art.parent / 'b'}", "--eval-data", f"a={R / 'array.jsonl'}", "--eval-data", f"b={R / 'array.jsonl'}", "--sizes", "1", "--out", str(R / "s2")],
    "sweep bad sizes": ["sweep", "--base", str(base), *M, "--evaluator", "os:sep", "--sizes", "a,b", "--out", str(R / "s1")],
    "demo bad suite": ["demo", "--suite", "nope"],
    "serve missing": ["serve", str(R / "nope"), "--port", "18999"],
    "serve trunc manifest": ["serve", str(trunc_manifest), "--port", "18999"],
    "serve non-hf artifact": ["serve", str(art), "--port", "18999"],
    "serve bad suite": ["serve", "--suite", "nope", "--size", "2", "--port", "18999"],
    "route train missing cal": ["route", "train", str(hf_art), "--calibration", str(R / "nope.jsonl")],
    "route train bad cal": ["route", "train", str(hf_art), "--calibration", str(R / "bad.jsonl")],
    "route train wrong cal": ["route", "train", str(hf_art), "--calibration", str(R / "wrong.jsonl")],
    "route train array cal": ["route", "train", str(hf_art), "--calibration", str(R / "array.jsonl")],
    "route train non-hf": ["route", "train", str(art), "--calibration", str(R / "bad.jsonl")],
    "route predict no router": ["route", "predict", str(hf_art), "--text", "hi"],
    "route predict bad mode": ["route", "predict", str(hf_art), "--text", "hi", "--mode", "nope"],
    "route predict missing": ["route", "predict", str(R / "nope"), "--text", "hi"],
    "pleas missing": ["pleas", "--model", f"a={R / 'nope'}", "--model", f"b={R / 'nope'}", "--size", "1.5", "--out", str(R / "pl")],
    "pleas garbage": ["pleas", "--model", f"a={R / 'garbage.safetensors'}", "--model", f"b={R / 'garbage.safetensors'}", "--size", "1.5", "--out", str(R / "pl")],
    "pleas tiny zoo": ["pleas", "--model", f"a={models['task0']}", "--model", f"b={models['task1']}", "--size", "1.5", "--out", str(R / "pl")],
    "pleas size 3": ["pleas", "--model", f"a={models['task0']}", "--model", f"b={models['task1']}", "--size", "3", "--out", str(R / "pl")],
    "pleas bad cal": ["pleas", "--model", f"a={models['task0']}", "--model", f"b={models['task1']}", "--size", "1.5", "--calibration", str(R / "garbage.safetensors"), "--out", str(R / "pl")],
    "pleas bad head": ["pleas", "--model", f"a={models['task0']}", "--model", f"b={models['task1']}", "--size", "1.5", "--head", f"a={R / 'garbage.safetensors'}", "--out", str(R / "pl")],
    "pleas one model": ["pleas", "--model", f"a={models['task0']}", "--size", "1.5", "--out", str(R / "pl")],
}

only = sys.argv[1:]
bad = 0
for name, argv in CASES.items():
    if only and not any(o in name for o in only):
        continue
    r = CliRunner().invoke(app, argv)
    lines = [x for x in r.output.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    usage = "Usage:" in r.output
    ok = r.exit_code == 2 and (usage or (len(errors) == 1 and "internal error" not in r.output and "Traceback" not in r.output))
    if not ok:
        bad += 1
    print(("OK  " if ok else "BAD ") + f"{name}: exit {r.exit_code}: " + (" | ".join(lines[-3:])[:300] if not usage else "usage error"))
print(f"{bad} BAD of {sum(1 for n in CASES if not only or any(o in n for o in only))}; inputs in {R}")
shutil.rmtree(R, ignore_errors=True)
sys.exit(1 if bad else 0)
