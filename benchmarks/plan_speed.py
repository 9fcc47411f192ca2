"""Planning speed on CLIP ViT-B/32 visual-encoder shapes (~88M parameters), M = 8 and M = 20.

Synthetic fine-tunes are written once as safetensors under --cache-dir and reused. The timed
part runs in a fresh process so that peak RSS reflects planning, not data generation:

    python benchmarks/plan_speed.py --tasks 8 20

Prints, per M: validation pass, similarity pass, path (greedy, after the pass), and peak RSS,
and the estimated time of recomputing every pair every step (the research code's approach).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

WIDTH, LAYERS, PATCH, TOKENS, EMBED = 768, 12, 32, 50, 512


def clip_vit_b32_visual_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "visual.class_embedding": (WIDTH,), "visual.positional_embedding": (TOKENS, WIDTH),
        "visual.conv1.weight": (WIDTH, 3, PATCH, PATCH), "visual.ln_pre.weight": (WIDTH,),
        "visual.ln_pre.bias": (WIDTH,),
    }
    for i in range(LAYERS):
        p = f"visual.transformer.resblocks.{i}"
        shapes.update({
            f"{p}.ln_1.weight": (WIDTH,), f"{p}.ln_1.bias": (WIDTH,),
            f"{p}.attn.in_proj_weight": (3 * WIDTH, WIDTH), f"{p}.attn.in_proj_bias": (3 * WIDTH,),
            f"{p}.attn.out_proj.weight": (WIDTH, WIDTH), f"{p}.attn.out_proj.bias": (WIDTH,),
            f"{p}.ln_2.weight": (WIDTH,), f"{p}.ln_2.bias": (WIDTH,),
            f"{p}.mlp.c_fc.weight": (4 * WIDTH, WIDTH), f"{p}.mlp.c_fc.bias": (4 * WIDTH,),
            f"{p}.mlp.c_proj.weight": (WIDTH, 4 * WIDTH), f"{p}.mlp.c_proj.bias": (WIDTH,),
        })
    shapes.update({"visual.ln_post.weight": (WIDTH,), "visual.ln_post.bias": (WIDTH,), "visual.proj": (WIDTH, EMBED)})
    return shapes


def generate(root: Path, num_tasks: int) -> None:
    """Base ~ N(0, 0.02); task t = base + 1e-3·(shared drift + own direction), as fp32 files."""
    root.mkdir(parents=True, exist_ok=True)
    shapes = clip_vit_b32_visual_shapes()
    g = torch.Generator().manual_seed(0)
    base = {k: 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()}
    if not (root / "base.safetensors").exists():
        save_file(base, str(root / "base.safetensors"))
    shared = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    for t in range(num_tasks):
        path = root / f"task{t:02d}.safetensors"
        if path.exists():
            continue
        gt = torch.Generator().manual_seed(100 + t)
        ft = {k: base[k] + 1e-3 * (0.5 * shared[k] + torch.randn(s, generator=gt)) for k, s in shapes.items()}
        save_file(ft, str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)


def measure(root: Path, num_tasks: int) -> dict[str, float]:
    import flexmerge
    from flexmerge.planning.greedy import ConstituentLinkage, run_greedy
    from flexmerge.similarity import block_grams, cosine_from_gram

    models = {f"task{t:02d}": root / f"task{t:02d}.safetensors" for t in range(num_tasks)}
    t0 = time.perf_counter()
    tasks = flexmerge.load_tasks(root / "base.safetensors", models)
    t1 = time.perf_counter()
    part = flexmerge.discover_blocks(tasks, "sublayer")
    grams = block_grams(tasks, part)  # summed from the Gram matrices the first pass accumulated
    cos = cosine_from_gram(grams).numpy()
    steps = run_greedy(ConstituentLinkage(cos, "min"))
    t3 = time.perf_counter()
    block_grams(dataclasses.replace(tasks, key_grams={}), part)  # a standalone similarity pass (what TIES needs)
    standalone = time.perf_counter() - t3
    naive = naive_recompute_estimate(tasks, part, steps)
    return {
        "tasks": num_tasks, "blocks": len(part), "steps": len(steps),
        "parameters": sum(tasks.meta[k].numel for k in tasks.mergeable),
        "first_pass_s": t1 - t0, "path_s": t3 - t1, "plan_total_s": t3 - t0,
        "standalone_similarity_pass_s": standalone, "naive_recompute_estimate_s": naive,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def naive_recompute_estimate(tasks, part, steps) -> float:
    """Seconds the research code's approach would take: every step recomputes the cosine of
    every pair of groups of every block from the vectors. One all-pairs pass over the largest
    block is timed on the real vectors; the rest is scaled by pairs x elements, step by step."""
    from flexmerge.similarity import block_deltas

    numel = part.numel(tasks.meta)
    big = max(range(len(part)), key=lambda b: numel[b])
    vec = block_deltas(tasks, part, big)
    m = tasks.num_tasks
    t0 = time.perf_counter()
    for i in range(m):
        for j in range(i + 1, m):
            torch.nn.functional.cosine_similarity(vec[i], vec[j], dim=0)
    per_pair_element = (time.perf_counter() - t0) / (m * (m - 1) / 2 * numel[big])
    groups = [m] * len(part)
    total = 0.0
    for b, *_ in steps:
        total += sum(g * (g - 1) / 2 * n for g, n in zip(groups, numel)) * per_pair_element
        groups[b] -= 1
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, nargs="+", default=[8, 20])
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "flexmerge" / "bench-clip-b32")
    ap.add_argument("--measure-only", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("FLEXMERGE_NO_PROGRESS", "1")
    if args.measure_only:
        print(json.dumps(measure(args.cache_dir, args.measure_only)))
        return
    generate(args.cache_dir, max(args.tasks))
    print("first pass = read + validate + Gram matrices (one read of the inputs); path = greedy path after it;\n"
          "re-read pass = a standalone similarity pass (needed after TIES/DARE preprocessing);\n"
          "naive = estimated time of recomputing every pair every step from the vectors (research code)")
    print(f"{'M':>3} {'blocks':>6} {'steps':>5} {'first pass':>10} {'path':>8} {'plan total':>10} "
          f"{'re-read pass':>12} {'naive est.':>10} {'peak RSS':>9}")
    for m in args.tasks:
        out = subprocess.run([sys.executable, __file__, "--cache-dir", str(args.cache_dir), "--measure-only", str(m)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{m:>3} {r['blocks']:>6} {r['steps']:>5} {r['first_pass_s']:>9.2f}s {r['path_s']:>7.4f}s "
              f"{r['plan_total_s']:>9.2f}s {r['standalone_similarity_pass_s']:>11.2f}s "
              f"{r['naive_recompute_estimate_s']:>9.0f}s {r['peak_rss_gib']:>7.2f}GiB")


if __name__ == "__main__":
    main()
