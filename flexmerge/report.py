"""Sweep results out: CSV, JSON, accuracy-size plots and the ranking of methods at each size."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, fields
from pathlib import Path

from flexmerge._atomic import write_bytes_atomic, write_text_atomic
from flexmerge.curve import AREA_SPAN, SweepRecord, SweepResult


def ranking(result: SweepResult) -> list[tuple[float, list[tuple[str, float]]]]:
    """For each requested size, the curves ordered by mean normalized accuracy (best first)."""
    by_size: dict[float, list[tuple[str, float]]] = {}
    for curve, points in result.curves().items():
        for p in points:
            by_size.setdefault(p["requested_size"], []).append((curve, p["normalized"]))
    return [(s, sorted(v, key=lambda x: -x[1])) for s, v in sorted(by_size.items())]


AREA_LABEL = f"area {AREA_SPAN[0]:g}-{AREA_SPAN[1]:g}x"


def _area_text(area: float | None) -> str:
    return "-" if area is None else f"{area:.3f}"


def summary_rows(result: SweepResult) -> tuple[list[str], list[list[str]]]:
    """A table: one row per curve, one column per requested size (mean normalized accuracy), and the
    curve's area over 1x-3x (`curve_area`: its mean normalized accuracy over that span)."""
    sizes = result.meta.get("sizes") or sorted({r.requested_size for r in result.records})
    curves, areas = result.curves(), result.areas()
    header = ["curve", *[f"{s:g}x" for s in sizes], AREA_LABEL]
    rows = []
    for curve in sorted(curves):
        at = {p["requested_size"]: p for p in curves[curve]}
        rows.append([curve, *[f"{at[s]['normalized']:.3f}" if s in at else "-" for s in sizes],
                     _area_text(areas[curve])])
    return header, rows


def area_ranking(result: SweepResult) -> list[tuple[str, float]]:
    """Curves with a defined 1x-3x area, best first."""
    return sorted(((c, a) for c, a in result.areas().items() if a is not None), key=lambda x: -x[1])


TARGET = 0.95  # the normalized accuracy `size_reaching` reports by default


def size_reaching(result: SweepResult, target: float = TARGET) -> dict[str, float | None]:
    """Per curve, the smallest deployed size among its evaluated points whose mean normalized
    accuracy is at least `target` (None: no point does): what a user with that accuracy goal
    must deploy, to the resolution of the sizes swept."""
    return {curve: min((p["size"] for p in points if p["normalized"] >= target), default=None)
            for curve, points in result.curves().items()}


def write_results(result: SweepResult, out: str | Path) -> dict[str, Path]:
    """results.csv, results.json, ranking.md and the two PNG plots under `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf)
    cols = [f.name for f in fields(SweepRecord)]
    writer.writerow(cols)
    for r in result.records:
        writer.writerow([asdict(r)[c] for c in cols])
    write_text_atomic(out / "results.csv", buf.getvalue())
    write_text_atomic(out / "results.json", json.dumps(result.to_dict(), indent=1))
    write_text_atomic(out / "ranking.md", ranking_markdown(result))
    write_text_atomic(out / "areas.csv", areas_csv(result))
    paths = {"csv": out / "results.csv", "json": out / "results.json", "ranking": out / "ranking.md",
             "areas": out / "areas.csv"}
    paths.update(plot_curves(result, out))
    return paths


def areas_csv(result: SweepResult) -> str:
    """One row per curve: method, planner and its 1x-3x area of mean normalized accuracy (empty: undefined)."""
    planner_of = {r.curve: (r.method, r.planner) for r in result.records}
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["curve", "method", "planner", "area_from", "area_to", "normalized_area"])
    for curve, area in sorted(result.areas().items()):
        writer.writerow([curve, *planner_of[curve], *AREA_SPAN, "" if area is None else area])
    return buf.getvalue()


def ranking_markdown(result: SweepResult) -> str:
    header, rows = summary_rows(result)
    lines = ["## Mean normalized accuracy (merged / fine-tuned, per task, averaged)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "## Ranking at each size", "", "| size | ranking (best first) |", "|---|---|"]
    for size, order in ranking(result):
        lines.append(f"| {size:g}x | " + " > ".join(f"{c} ({v:.3f})" for c, v in order) + " |")
    lines.append(f"| {AREA_LABEL} | " + " > ".join(f"{c} ({v:.3f})" for c, v in area_ranking(result)) + " |")
    reach = sorted(size_reaching(result).items(), key=lambda x: (x[1] is None, x[1] or 0.0, x[0]))
    lines += ["", f"## Smallest swept size reaching {TARGET:g} normalized accuracy", "",
              "| curve | size |", "|---|---|"]
    lines += [f"| {c} | {'-' if s is None else f'{s:.3f}x'} |" for c, s in reach]
    routed = {c: ps for c, ps in result.curves().items() if "router_accuracy" in ps[0]}
    if routed:
        lines += ["", "## Routed (no task ids): normalized accuracy and router accuracy at each point", "",
                  "| curve | size | normalized | router accuracy |", "|---|---|---|---|"]
        lines += [f"| {c} | {p['size']:.3f}x | {p['normalized']:.3f} | {p['router_accuracy']:.3f} |"
                  for c, ps in sorted(routed.items()) for p in ps]
    return "\n".join(lines) + "\n"


def plot_curves(result: SweepResult, out: str | Path) -> dict[str, Path]:
    """normalized_accuracy.png and absolute_accuracy.png: one curve per method, reference levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    curves, areas = result.curves(), result.areas()
    ft_mean = sum(result.finetuned.values()) / len(result.finetuned)
    base_mean = sum(result.base.values()) / len(result.base) if result.base else None
    scored = [t for t in result.finetuned if result.finetuned[t]]  # the normalized mean's tasks (`curves`)
    base_norm = sum(result.base[t] / result.finetuned[t] for t in scored) / len(scored) if result.base else None
    score = result.meta.get("score_name", "accuracy")  # a suite's names; own models: the defaults
    base_label = result.meta.get("base_name", "base + trained head")
    paths = {}
    for key, ylabel, ft_level, base_level in [
        ("normalized", f"mean normalized {score} (merged / fine-tuned)", 1.0, base_norm),
        ("accuracy", f"mean {score}", ft_mean, base_mean),
    ]:
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
        for curve, points in sorted(curves.items()):
            routed = "router_accuracy" in points[0]  # no task ids: dashed, each point labelled with its router's accuracy
            label = f"{curve} ({AREA_LABEL} {_area_text(areas[curve])})" if key == "normalized" else curve
            ax.plot([p["size"] for p in points], [p[key] for p in points], marker="x" if routed else "o",
                    linestyle="--" if routed else "-", label=label + (" (router acc. at points)" if routed else ""))
            for p in points if routed else []:
                ax.annotate(f"{p['router_accuracy']:.2f}", (p["size"], p[key]), fontsize=6,
                            textcoords="offset points", xytext=(3, -8))
        ax.axhline(ft_level, color="black", linestyle="--", linewidth=1, label="fine-tuned (Mx)")
        if base_level is not None:
            ax.axhline(base_level, color="gray", linestyle=":", linewidth=1, label=base_label)
        ax.set_xlabel("deployed size (x one model, exact bytes)")
        ax.set_ylabel(ylabel)
        tasks = len(result.finetuned)
        suite = f"{result.meta['suite']}, " if result.meta.get("suite") else ""
        ax.set_title(f"accuracy-size trade-off, {suite}{tasks} tasks")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        name = "normalized_accuracy.png" if key == "normalized" else "absolute_accuracy.png"
        write_bytes_atomic(out / name, buf.getvalue(), overwrite=True)
        paths[key + "_plot"] = out / name
    return paths
