"""flexmerge against mergekit on the same job: 8 fine-tunes of a Llama-architecture model, fp16.

The small model has SmolLM-135M's shapes (134.5M parameters, hidden 576, 30 layers: 269 MB per
model, 2.4 GB of inputs); `--large` scales hidden and MLP width by 2 (hidden 1152, ~4x the
parameters). Two jobs (`--job tied|untied|both`, default both): `tied` has tied embeddings (no
lm_head.weight stored, as SmolLM-135M); `untied` stores its own trained `lm_head.weight`
(vocab x hidden, +28.3M parameters) in every model with `tie_word_embeddings: false`. The base
is random, each fine-tune is base + small noise on every tensor (embeddings, norms and lm_head
included: a full fine-tune), written as a Hugging Face directory (config.json +
model.safetensors, the layout of `save_pretrained`) once under --cache-dir, one folder per job.

mergekit 0.1.5 is installed by the script into its own venv under --cache-dir, torch pinned to
this interpreter's version and installed first, so that no other (CUDA) build is pulled.

    python benchmarks/vs_mergekit.py [--job tied|untied|both] [--large] [--skip-mergekit] [--csv results.csv]

Correctness: where mergekit and flexmerge's 1x both ran a method, their outputs are compared
tensor by tensor (max |flexmerge - mergekit| over all tensors, and over lm_head.weight where
mergekit wrote one), printed and written to the CSV (`max_abs_diff`, `lm_head_max_abs_diff`).

Every row runs in a fresh process after one untimed warm-up read of all inputs (page cache
warm), and reports wall time, the process's peak RSS (wait4) and the warm-read floor: the time
of reading every input byte from the page cache. On a shared machine, `--repeat N` runs each row
N times, round-robin over the rows (the minimum wall time is reported, with the spread max − min,
and the largest peak RSS), and `--lock DIR` holds a mkdir lock around each timed run. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SMALL = dict(hidden=576, mlp=1536, layers=30, heads=9, kv_heads=3, vocab=49152)
LARGE = dict(hidden=1152, mlp=3072, layers=30, heads=18, kv_heads=6, vocab=49152)
MERGEKIT = "mergekit==0.1.5"


def shapes(c: dict, tied: bool = True) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a LlamaForCausalLM; tied: no lm_head.weight stored."""
    h, kv = c["hidden"], c["hidden"] // c["heads"] * c["kv_heads"]
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c["vocab"], h)}
    for i in range(c["layers"]):
        p = f"model.layers.{i}"
        s.update({
            f"{p}.input_layernorm.weight": (h,), f"{p}.self_attn.q_proj.weight": (h, h),
            f"{p}.self_attn.k_proj.weight": (kv, h), f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, h), f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.mlp.gate_proj.weight": (c["mlp"], h), f"{p}.mlp.up_proj.weight": (c["mlp"], h),
            f"{p}.mlp.down_proj.weight": (h, c["mlp"]),
        })
    s["model.norm.weight"] = (h,)
    if not tied:
        s["lm_head.weight"] = (c["vocab"], h)
    return s


def hf_config(c: dict, tied: bool = True) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c["hidden"],
        "intermediate_size": c["mlp"], "num_hidden_layers": c["layers"], "num_attention_heads": c["heads"],
        "num_key_value_heads": c["kv_heads"], "vocab_size": c["vocab"], "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": tied, "torch_dtype": "float16",
        "rope_theta": 10000.0, "bos_token_id": 0, "eos_token_id": 0,
    }


def write_model(directory: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """config.json + model.safetensors (format "pt"), as `save_pretrained` writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors.tmp"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    os.replace(directory / "model.safetensors.tmp", directory / "model.safetensors")


def job_dirs(root: Path, num_tasks: int) -> list[Path]:
    """The job's model directories, base first."""
    return [root / "base", *[root / f"task{t:02d}" for t in range(num_tasks)]]


def is_generated(dirs: list[Path]) -> bool:
    return all((d / "model.safetensors").exists() for d in dirs)


def generate(root: Path, c: dict, num_tasks: int, tied: bool = True) -> list[Path]:
    """Base ~ N(0, 0.02) (norms 1); task t = base + 1e-3·(0.5·shared drift + own noise) on every
    tensor (a full fine-tune: embeddings, norms and an untied lm_head too), fp16. Cached."""
    dirs = job_dirs(root, num_tasks)
    if is_generated(dirs):
        return dirs
    s, cfg = shapes(c, tied), hf_config(c, tied)
    g = torch.Generator().manual_seed(0)
    base = {k: (0.02 * torch.randn(v, generator=g)).half() for k, v in s.items()}
    for k in base:
        if k.endswith("norm.weight"):
            base[k] = torch.ones_like(base[k])
    write_model(dirs[0], base, cfg)
    drift = {k: 0.5e-3 * torch.randn(v, generator=g) for k, v in s.items()}
    for d in dirs[1:]:
        write_model(d, {k: (base[k].float() + drift[k] + 1e-3 * torch.randn(s[k], generator=g)).half()
                        for k in s}, cfg)
    return dirs


def generate_apart(root: Path, c: dict, num_tasks: int, tied: bool = True) -> list[Path]:
    """`generate` in a child process. A child's peak RSS (wait4) starts at its parent's high-water
    mark (Linux records the forked copy's at exec), so this process must never hold the models:
    generating the large job here made every later row report the generator's 5.05 GiB. A cached
    job needs no child."""
    import multiprocessing

    if is_generated(dirs := job_dirs(root, num_tasks)):
        return dirs

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(generate, (root, c, num_tasks, tied))


def read_all(paths: list[Path]) -> float:
    """Seconds to read every byte of `paths` (1 MiB reads into one buffer)."""
    buf = bytearray(1 << 20)
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def mergekit_env(cache: Path) -> Path:
    """A venv with mergekit, torch installed first at this interpreter's version (CPU wheel)."""
    venv = cache / "venv"
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    pin = f"torch=={torch.__version__.split('+')[0]}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, pin], check=True)
    subprocess.run([*pip, MERGEKIT, pin], check=True)  # mergekit asks torch>=2.0: the pin holds
    return exe


def mergekit_yaml(method: str, dirs: list[Path], keep: float) -> str:
    """TA as λ·mean with λ = 1 (weights 1/M, as flexmerge's lam=1); TIES with density = keep."""
    base, tasks = dirs[0], dirs[1:]
    if method == "ties":
        params = f"{{density: {keep}, weight: 1.0}}"
        extra = "parameters: {normalize: true}\n"
    else:
        params = f"{{weight: {1.0 / len(tasks)}}}"
        extra = "parameters: {normalize: false}\n"
    models = "".join(f"  - model: {t}\n    parameters: {params}\n" for t in tasks)
    return f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}{extra}dtype: float16\n"


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one fresh process; fails loudly if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 2**20


@contextlib.contextmanager
def held(lock: Path | None):
    """A mkdir lock (the convention of a machine shared by benchmarks), waited for; None: no lock."""
    while lock is not None:
        try:
            lock.mkdir()
            break
        except FileExistsError:
            time.sleep(5)
    try:
        yield
    finally:
        if lock is not None:
            lock.rmdir()


def timed_run(cmd: list[str], inputs: list[Path], lock: Path | None) -> tuple[float, float, float]:
    """(wall s, peak RSS GiB, warm-read floor s) of one fresh-process run, page cache warmed first."""
    with held(lock):
        read_all(inputs)  # warm the page cache
        floor = read_all(inputs)
        wall, rss = measure(cmd)
    return wall, rss, floor


def summary(walls: list[float], rsss: list[float], floors: list[float]) -> dict:
    """min wall, spread (max − min), largest peak RSS and the smallest floor of a row's runs."""
    return dict(wall_s=round(min(walls), 2), wall_spread_s=round(max(walls) - min(walls), 2), runs=len(walls),
                peak_rss_gib=round(max(rsss), 2), warm_read_s=round(min(floors), 3),
                wall_over_floor=round(min(walls) / min(floors), 1))


def flexmerge_cmd(method: str, size: float, dirs: list[Path], out: Path, keep: float, executor: str) -> list[str]:
    models = [x for t in dirs[1:] for x in ("--model", f"{t.name}={t}")]
    params = ["--param", f"keep={keep}"] if method == "ties" else ["--param", "lam=1.0"]
    return [sys.executable, "-m", "flexmerge", "merge", "--base", str(dirs[0]), *models, "--method", method,
            *params, "--size", str(size), "--out", str(out), "--overwrite", "--no-resume", "--executor", executor]


def tensors_of(directory: Path) -> dict[str, Path]:
    """name -> file of every tensor in a directory's *.safetensors (one file or shards)."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            where.update(dict.fromkeys(h.keys(), f))
    return where


def compare(ours: Path, theirs: Path) -> dict:
    """max |ours - theirs| over the tensors both wrote (fp32, one tensor at a time), over
    lm_head.weight alone (None where either lacks one), and the names only one side wrote."""
    from safetensors import safe_open

    a, b = tensors_of(ours), tensors_of(theirs)
    worst, head = 0.0, None
    for name in sorted(a.keys() & b.keys()):
        with safe_open(str(a[name]), framework="pt") as fa, safe_open(str(b[name]), framework="pt") as fb:
            x, y = fa.get_tensor(name).float(), fb.get_tensor(name).float()
        if x.shape != y.shape:
            raise RuntimeError(f"{name}: flexmerge {tuple(x.shape)} against mergekit {tuple(y.shape)}")
        d = (x - y).abs().max().item()
        worst = max(worst, d)
        if name == "lm_head.weight":
            head = d
    return dict(max_abs_diff=worst, lm_head_max_abs_diff=head, compared=len(a.keys() & b.keys()),
                only_flexmerge=sorted(a.keys() - b.keys()), only_mergekit=sorted(b.keys() - a.keys()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "flexmerge" / "vs_mergekit")
    ap.add_argument("--job", choices=("tied", "untied", "both"), default="both",
                    help="tied embeddings (no lm_head stored), an untied trained lm_head, or both (default)")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--keep", type=float, default=0.2, help="TIES density / keep")
    ap.add_argument("--large", action="store_true", help="hidden 1152, MLP 3072 (~4x the parameters)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--methods", default="task_arithmetic,ties")
    ap.add_argument("--sizes", default="1,2,4", help="flexmerge sizes (mergekit: 1x only)")
    ap.add_argument("--executor", default="local", help="flexmerge --executor")
    ap.add_argument("--csv", type=Path, default=Path("vs_mergekit.csv"))
    ap.add_argument("--repeat", type=int, default=1, help="runs per row (min wall time and spread reported)")
    ap.add_argument("--lock", type=Path, default=None, help="mkdir lock held around each timed run")
    args = ap.parse_args(argv)

    model = "large" if args.large else "small"
    cfg = LARGE if args.large else SMALL
    jobs = ["tied", "untied"] if args.job == "both" else [args.job]
    kit = None if args.skip_mergekit else mergekit_env(args.cache_dir)
    rows, plan = [], []
    outputs: dict[tuple[str, str], dict[str, Path]] = {}  # (job, method) -> tool -> its 1x output
    for job in jobs:
        tied = job == "tied"
        # The tied job keeps the folder name of the days before --job, so its cache stays valid.
        dirs = generate_apart(args.cache_dir / (f"{model}-m{args.tasks}" if tied else f"{model}-untied-m{args.tasks}"),
                              cfg, args.tasks, tied)
        inputs = [d / "model.safetensors" for d in dirs]
        numel = sum(torch.Size(s).numel() for s in shapes(cfg, tied).values())
        print(f"job {model} {job}: {args.tasks} fine-tunes of {numel / 1e6:.1f}M parameters, fp16, "
              f"{sum(p.stat().st_size for p in inputs) / 1e9:.2f} GB of inputs")
        out = args.cache_dir / "out" / f"{model}-{job}"
        out.mkdir(parents=True, exist_ok=True)
        for method in args.methods.split(","):
            runs: list[tuple[str, float, list[str], Path]] = []
            if kit is not None:
                yml = out / f"{method}.yml"
                yml.write_text(mergekit_yaml(method, dirs, args.keep))
                runs.append(("mergekit", 1.0, [str(kit), str(yml), str(out / f"mk-{method}"), "--no-cuda",
                                               "-j", "2", "--allow-crimes"], out / f"mk-{method}"))
            for size in map(float, args.sizes.split(",")):
                where = out / f"fm-{method}-{size:g}x"
                runs.append(("flexmerge", size, flexmerge_cmd(method, size, dirs, where, args.keep, args.executor),
                             where))
            for tool, size, cmd, where in runs:
                plan.append((job, method, tool, size, cmd, inputs))
                if size == 1.0:
                    outputs.setdefault((job, method), {})[tool] = where
    # Round-robin: each round runs every row once, so a slow spell of a shared machine slows
    # all rows alike instead of one row's repeats, and the ratios of the minima stay comparable.
    results: list[tuple[list[float], list[float], list[float]]] = [([], [], []) for _ in plan]
    for r in range(args.repeat):
        for (job, method, tool, size, cmd, inputs), (walls, rsss, floors) in zip(plan, results):
            for samples, value in zip((walls, rsss, floors), timed_run(cmd, inputs, args.lock)):
                samples.append(value)
            print(f"  round {r + 1}/{args.repeat}: {job} {tool} {method} {size:g}x {walls[-1]:.2f} s", flush=True)
    # Correctness: flexmerge's 1x output against mergekit's, tensor by tensor (after every timed
    # run, so that no row's peak RSS starts at this process's reading of the outputs).
    diffs: dict[tuple[str, str], dict] = {}
    for (job, method), by_tool in outputs.items():
        if {"mergekit", "flexmerge"} <= by_tool.keys():
            # At 1x every task's model is the one merged model: export the first task's (HF layout).
            artifact = by_tool["flexmerge"]
            exported = artifact.with_name(artifact.name + "-export")
            subprocess.run([sys.executable, "-m", "flexmerge", "export", str(artifact), "--task", "task00",
                            "--out", str(exported), "--overwrite"], check=True, stdout=subprocess.DEVNULL)
            d = diffs[job, method] = compare(exported, by_tool["mergekit"])
            head = "n/a" if d["lm_head_max_abs_diff"] is None else f"{d['lm_head_max_abs_diff']:.3g}"
            print(f"{job:6s} {method:16s} flexmerge 1x vs mergekit: max |diff| {d['max_abs_diff']:.3g} over "
                  f"{d['compared']} tensors, lm_head {head}"
                  + (f"; only flexmerge wrote {d['only_flexmerge']}" if d["only_flexmerge"] else "")
                  + (f"; only mergekit wrote {d['only_mergekit']}" if d["only_mergekit"] else ""), flush=True)
    for (job, method, tool, size, _, _), runs_of_row in zip(plan, results):
        d = diffs.get((job, method)) if size == 1.0 else None
        row = dict(model=model, job=job, tool=tool, method=method, size=size, **summary(*runs_of_row),
                   max_abs_diff=None if d is None else d["max_abs_diff"],
                   lm_head_max_abs_diff=None if d is None else d["lm_head_max_abs_diff"])
        rows.append(row)
        print(f"{job:6s} {tool:9s} {method:16s} {size:g}x  {row['wall_s']:7.2f} s (+{row['wall_spread_s']:.2f} over "
              f"{args.repeat})  {row['peak_rss_gib']:5.2f} GiB peak  warm read {row['warm_read_s']:.3f} s  "
              f"({row['wall_over_floor']:.1f}x)", flush=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
