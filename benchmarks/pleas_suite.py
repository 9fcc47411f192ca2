"""PLeaS on a suite (digits: a residual MLP; fashion: a GroupNorm CNN): two tasks' accuracy at sizes 1, 1.25,
1.5, 2 for PLeaS, permutation-only matching and plain weight averaging, for two fine-tunes of one base and for
two models whose bases were trained from different random initializations (where task vectors mean nothing).

    python -m benchmarks.pleas_suite [--suite digits|fashion] [--tasks A B] [--sizes 1 1.25 1.5 2]
                                     [--schedule greedy] [--out results/pleas_SUITE]   # results.md + curves.png

Models are trained here with the suite's own data, splits and training recipe (digits: seconds; fashion:
minutes); both bases see the same pretraining data, only their initialization (and batch order) differs.
Calibration: the two tasks' validation inputs. Accuracy: each task's test split, read through its own
(widened) head. "Average (identity)" is PLeaS's pipeline with no permutation and no least squares: at 1x
it is plain weight averaging of the two encoders; above 1x the worst-correlated units (same index) stay
separate. "Weights (no data)" is weight matching (Git Re-Basin) with no calibration and no refit.
For the shared base, FlexMerge's curves (task_arithmetic and ties, greedy path, M = 2, planned once
and materialized at every size) are drawn beside PLeaS's in OUT/curves.png.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from flexmerge.pleas import pleas_merge
from flexmerge.suites import digits, fashion
from flexmerge.suites.training import accuracy, train

METHODS = {"PLeaS": {"matching": "activation", "least_squares": True},
           "perm only": {"matching": "activation", "least_squares": False},
           "average (identity)": {"matching": "identity", "least_squares": False},
           "weights (no data)": {"matching": "weights", "least_squares": False, "calibration": None}}
FLEX = {"FlexMerge TA": ("task_arithmetic", {}), "FlexMerge TIES": ("ties", {})}
FLEX_SIZES = [1 + k / 8 for k in range(9)]
DEFAULT_TASKS = {"digits": ("rot90", "invert_mod3"), "fashion": ("rot90", "digits")}


@dataclass(frozen=True)
class Recipe:
    """How a suite builds its models: the network, its feature width, the classes of a task, and the
    (lr, batch size) of pretraining and of fine-tuning (epochs: the suite's own)."""

    suite: object
    net: type
    features: int
    classes: dict[str, int]
    pretrain: tuple[float, int]
    finetune: tuple[float, int]


def recipe(name: str) -> Recipe:
    if name == "digits":
        suite = digits.DigitsSuite()
        return Recipe(suite, digits.DigitsNet, digits.WIDTH, {t.name: t.classes for t in digits.TASKS}, (2e-3, 64),
                      (1e-3, 32))
    suite = fashion.FashionSuite()
    reason = suite.unavailable_reason()
    if reason:
        raise SystemExit(reason)
    return Recipe(suite, fashion.FashionNet, fashion.FEATURES, {t.name: t.num_classes for t in fashion.TASKS},
                  (suite.lr, suite.batch_size), (suite.lr, suite.batch_size))


def pretrain(r: Recipe, init_seed: int) -> torch.nn.Module:
    """The suite's pretraining recipe, from the random initialization `init_seed`."""
    torch.manual_seed(init_seed)
    base, head = r.net(), torch.nn.Linear(r.features, 10)
    x, y = r.suite.data()["pretrain"]
    lr, batch = r.pretrain
    train(lambda i: head(base(x[i])), [*base.parameters(), *head.parameters()], y, epochs=r.suite.pretrain_epochs,
          batch_size=batch, lr=lr, seed=init_seed, desc=f"pretraining base (init seed {init_seed})")
    return base.eval()


def finetune(r: Recipe, base: torch.nn.Module, task: str, seed: int) -> tuple[dict, dict]:
    """The suite's fine-tuning recipe: encoder and a new head on the task's training split."""
    xt, yt = r.suite.data()["tasks"][task]["train"]
    torch.manual_seed(seed)
    model, head = r.net(), torch.nn.Linear(r.features, r.classes[task])
    model.load_state_dict(base.state_dict())
    lr, batch = r.finetune
    train(lambda i: head(model(xt[i])), [*model.parameters(), *head.parameters()], yt,
          epochs=r.suite.finetune_epochs, batch_size=batch, lr=lr, seed=seed, desc=f"fine-tuning {task}")
    return model.state_dict(), head.state_dict()


def test_accuracy(r: Recipe, task: str, encoder: torch.nn.Module, head: torch.nn.Module) -> float:
    xs, ys = r.suite.data()["tasks"][task]["test"]
    with torch.no_grad():
        return accuracy(lambda i: head(encoder(xs[i])), ys)


def plain_accuracy(r: Recipe, task, state, head_state) -> float:
    model = r.net().eval()
    model.load_state_dict(state)
    head = torch.nn.Linear(r.features, head_state["weight"].shape[0])
    head.load_state_dict(head_state)
    return test_accuracy(r, task, model, head)


def pleas_rows(r: Recipe, pair, models, heads, sizes, schedule) -> list[tuple]:
    x = r.suite.validation_inputs(list(models))
    rows = []
    for method, options in METHODS.items():
        options = dict(options)
        calib = options.pop("calibration", x)
        for s in sizes:
            merged = pleas_merge(models, calib, s, heads=heads, schedule_name=schedule, **options)
            enc = merged.module()
            accs = [test_accuracy(r, t, enc, merged.head(t)) for t in models]
            rows.append((pair, method, s, merged.config["size"], *accs))
    return rows


def flexmerge_rows(r: Recipe, pair, base, models, heads, sizes) -> list[tuple]:
    """FlexMerge's own curves for a shared base: one greedy path per method, materialized at each size."""
    import flexmerge

    with tempfile.TemporaryDirectory() as d:
        save_file(base.state_dict(), f"{d}/base.safetensors")
        for t, st in models.items():
            save_file(st, f"{d}/{t}.safetensors")
        tasks = flexmerge.load_tasks(f"{d}/base.safetensors", {t: f"{d}/{t}.safetensors" for t in models})
        rows = []
        for name, (method, params) in FLEX.items():
            path = flexmerge.plan(tasks, method=method, params=params)
            for s in sizes:
                flex = flexmerge.materialize(tasks, path, s)
                accs = [plain_accuracy(r, t, flex.state_dict(t), heads[t]) for t in models]
                rows.append((pair, name, s, flex.size, *accs))
        return rows


def plot(rows: list[tuple], out: Path, tasks: list[str], suite: str) -> Path:
    """Mean accuracy of the two tasks against the achieved size, one panel per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(dict.fromkeys(r[0] for r in rows))
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4.5), sharey=True, squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        for method in dict.fromkeys(r[1] for r in rows if r[0] == pair):
            pts = sorted((r[3], (r[4] + r[5]) / 2) for r in rows if r[:2] == (pair, method))
            if method == "fine-tuned":
                ax.axhline(pts[0][1], color="gray", ls=":", label="fine-tuned (2 models)")
                continue
            style = "--" if method.startswith("FlexMerge") else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=4, label=method)
        ax.set(title=f"{suite}, {pair}: {' + '.join(tasks)}", xlabel="size (x one model)",
               ylabel="mean test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    return out / "curves.png"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="digits", choices=["digits", "fashion"])
    ap.add_argument("--tasks", nargs=2, help="two of the suite's tasks (digits: rot90 invert_mod3; fashion: "
                                             "rot90 digits)")
    ap.add_argument("--sizes", nargs="+", type=float, default=[1.0, 1.25, 1.5, 2.0])
    ap.add_argument("--schedule", default="greedy", choices=["greedy", "uniform"])
    ap.add_argument("--out", type=Path, help="results.md and curves.png here (default results/pleas_SUITE)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    r = recipe(args.suite)
    ta, tb = args.tasks or DEFAULT_TASKS[args.suite]
    unknown = [t for t in (ta, tb) if t not in r.classes]
    if unknown:
        raise SystemExit(f"unknown {args.suite} task(s) {unknown}; the tasks are {list(r.classes)}")
    out = args.out or Path(f"results/pleas_{args.suite}")
    base0, base1 = pretrain(r, 0), pretrain(r, 1)
    (sa, ha), (sb, hb) = finetune(r, base0, ta, 10), finetune(r, base0, tb, 11)
    sb1, hb1 = finetune(r, base1, tb, 11)
    pairs = {"same base": ({ta: sa, tb: sb}, {ta: ha, tb: hb}),
             "different inits": ({ta: sa, tb: sb1}, {ta: ha, tb: hb1})}
    rows = []
    for pair, (models, heads) in pairs.items():
        rows.append((pair, "fine-tuned", 2.0, 2.0, *(plain_accuracy(r, t, models[t], heads[t]) for t in models)))
        rows += pleas_rows(r, pair, models, heads, args.sizes, args.schedule)
        if pair == "same base":
            rows += flexmerge_rows(r, pair, base0, models, heads, sorted({*args.sizes, *FLEX_SIZES}))
    lines = [f"| pair | method | S | size | {ta} | {tb} | mean |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {pair} | {method} | {s:g} | {size:.3f} | {a:.3f} | {b:.3f} | {(a + b) / 2:.3f} |"
              for pair, method, s, size, a, b in rows]
    lines.append(f"\nsuite={args.suite}; schedule={args.schedule}; {time.perf_counter() - t0:.0f} s in all")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"plot: {plot(rows, out, [ta, tb], args.suite)}")


if __name__ == "__main__":
    main()
