"""More tasks need more size: FlexMerge curves on wordnet (8 tasks), wordnet20 and wordnet30.

    python benchmarks/task_count.py [--suites wordnet,wordnet20,wordnet30] [--methods task_arithmetic,ties]
                                    [--sizes 1,1.25,1.5,2,3] [--out task_count/] [--plot docs/task_count.png]
    python benchmarks/task_count.py --results wordnet=runs/wn/results.json --results wordnet20=...
    (`--results` may name several files of one suite, e.g. one sweep per method)

Per suite, the paper's greedy planner is swept (the library's `run_sweep`, test split) or an
earlier sweep's results.json is read (`--results SUITE=PATH`: the same numbers `flexmerge sweep`
wrote). Printed per suite and method: mean normalized accuracy at each requested size, the 1x-3x
area, and the smallest exact size at which the curve reaches each `--targets` level (linear
between the measured points; '>' when the largest measured size does not reach it). The plot
draws normalized accuracy against exact size, one colour per suite, one line style per method.
Building wordnet20's and wordnet30's zoos (20 and 30 fine-tunes of the 6-layer encoder) takes
most of the time on a CPU; they are cached like every suite's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TARGETS = (0.90, 0.93, 0.95)


def size_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """The smallest exact size where the piecewise-linear curve through `points` reaches `target`."""
    points = sorted(points)
    if points and points[0][1] >= target:
        return points[0][0]
    for (s0, a0), (s1, a1) in zip(points, points[1:]):
        if a1 >= target > a0:
            return s0 + (target - a0) / (a1 - a0) * (s1 - s0)
    return None


def read_results(paths: list[str]) -> dict:
    """One suite's results.json files (e.g. one sweep per method), their curves and areas combined."""
    merged: dict = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not merged:
            merged = data
            continue
        merged["curves"].update(data["curves"])
        merged["areas"]["normalized"].update(data["areas"]["normalized"])
    return merged


def sweep_curves(suite: str, methods: list[str], sizes: list[float], out: Path) -> dict:
    from flexmerge.suites import get_suite, run_sweep

    _, paths = run_sweep(get_suite(suite), out / suite, methods=methods, sizes=sizes)
    return json.loads(Path(paths["json"]).read_text())


def greedy_curves(data: dict) -> dict[str, list[dict]]:
    """The paper's greedy curves of a results.json (other planners' curves are named METHOD/PLANNER)."""
    return {curve: points for curve, points in data["curves"].items() if "/" not in curve}


def table(results: dict[str, dict], sizes: list[float], targets: tuple[float, ...]) -> str:
    head = ["suite (tasks)", "method", *[f"{s:g}x" for s in sizes], "area 1x-3x",
            *[f"size for {t:.2f}" for t in targets]]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for suite, data in results.items():
        tasks = len(data["finetuned"])
        for curve, points in greedy_curves(data).items():
            at = {p["requested_size"]: p["normalized"] for p in points}
            xy = [(p["size"], p["normalized"]) for p in points]
            reach = [size_to_reach(xy, t) for t in targets]
            area = data["areas"]["normalized"].get(curve)
            cells = [f"{at[s]:.3f}" if s in at else "–" for s in sizes]
            cells += [f"{area:.3f}" if area is not None else "–"]
            cells += [f"{r:.2f}x" if r is not None else f"> {max(x for x, _ in xy):.2f}x" for r in reach]
            rows.append(f"| {suite} ({tasks}) | {curve} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods: list[str] = []
    for k, (suite, data) in enumerate(results.items()):
        for curve, points in greedy_curves(data).items():
            if curve not in methods:
                methods.append(curve)
            xy = sorted((p["size"], p["normalized"]) for p in points)
            ax.plot(*zip(*xy), styles[methods.index(curve) % len(styles)], marker="o", ms=3, color=f"C{k}",
                    label=f"{suite} ({len(data['finetuned'])} tasks), {curve}")
    ax.set_xlabel("exact size (x one model)")
    ax.set_ylabel("mean normalized accuracy")
    ax.set_title("FlexMerge greedy: more tasks need more size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suites", default="wordnet,wordnet20,wordnet30")
    ap.add_argument("--methods", default="task_arithmetic,ties")
    ap.add_argument("--sizes", default="1,1.25,1.5,2,3")
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)))
    ap.add_argument("--results", action="append", default=[], metavar="SUITE=PATH",
                    help="reuse a sweep's results.json for SUITE instead of sweeping it")
    ap.add_argument("--out", type=Path, default=Path("task_count"))
    ap.add_argument("--plot", type=Path, default=None, help="default: OUT/task_count.png")
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    given: dict[str, list[str]] = {}
    for r in args.results:
        suite, _, path = r.partition("=")
        given.setdefault(suite, []).append(path)
    results = {}
    for suite in args.suites.split(","):
        if suite in given:
            results[suite] = read_results(given[suite])
        else:
            results[suite] = sweep_curves(suite, args.methods.split(","), sizes, args.out)
    targets = tuple(float(t) for t in args.targets.split(","))
    text = table(results, sizes, targets)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "task_count.md").write_text(text + "\n")
    plot(results, args.plot or args.out / "task_count.png")


if __name__ == "__main__":
    main()
