"""PLeaS on the digits suite: two tasks' accuracy at sizes 1, 1.25, 1.5, 2 for PLeaS, permutation-only
matching and plain weight averaging, for two fine-tunes of one base and for two models whose bases
were trained from different random initializations (where task vectors mean nothing).

    python -m benchmarks.pleas_digits [--tasks rot90 invert_mod3] [--sizes 1 1.25 1.5 2] [--schedule greedy]
                                      [--out results/pleas_digits]   # results.md + curves.png

Models are trained here with the suite's own data, splits and training loop (seconds); both bases see
the same pretraining data, only their initialization (and batch order) differs. Calibration: the two
tasks' validation inputs. Accuracy: each task's test split, read through its own (widened) head.
"Average (identity)" is PLeaS's pipeline with no permutation and no least squares: at 1x it is
plain weight averaging of the two encoders; above 1x the worst-correlated units (same index) stay
separate. "Weights (no data)" is weight matching (Git Re-Basin) with no calibration and no refit.
For the shared base, FlexMerge's curves (task_arithmetic and ties, greedy path, M = 2, planned once
and materialized at every size) are drawn beside PLeaS's in OUT/curves.png.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from flexmerge.pleas import calibration_inputs, pleas_merge
from flexmerge.suites.digits import TASKS, WIDTH, DigitsNet, DigitsSuite
from flexmerge.suites.training import accuracy, train

METHODS = {"PLeaS": {"matching": "activation", "least_squares": True},
           "perm only": {"matching": "activation", "least_squares": False},
           "average (identity)": {"matching": "identity", "least_squares": False},
           "weights (no data)": {"matching": "weights", "least_squares": False, "calibration": None}}
FLEX = {"FlexMerge TA": ("task_arithmetic", {}), "FlexMerge TIES": ("ties", {})}
FLEX_SIZES = [1 + k / 8 for k in range(9)]


def pretrain(suite: DigitsSuite, init_seed: int) -> DigitsNet:
    """The suite's pretraining recipe, from the random initialization `init_seed`."""
    torch.manual_seed(init_seed)
    base, head = DigitsNet(), torch.nn.Linear(WIDTH, 10)
    x, y = suite.data()["pretrain"]
    train(lambda i: head(base(x[i])), [*base.parameters(), *head.parameters()], y, epochs=suite.pretrain_epochs,
          batch_size=64, lr=2e-3, seed=init_seed, desc=f"pretraining base (init seed {init_seed})")
    return base


def finetune(suite: DigitsSuite, base: DigitsNet, task: str, seed: int) -> tuple[dict, dict]:
    """The suite's fine-tuning recipe: encoder and a new head on the task's training split."""
    spec = next(t for t in TASKS if t.name == task)
    xt, yt = suite.data()["tasks"][task]["train"]
    torch.manual_seed(seed)
    model, head = DigitsNet(), torch.nn.Linear(WIDTH, spec.classes)
    model.load_state_dict(base.state_dict())
    train(lambda i: head(model(xt[i])), [*model.parameters(), *head.parameters()], yt,
          epochs=suite.finetune_epochs, batch_size=32, lr=1e-3, seed=seed, desc=f"fine-tuning {task}")
    return model.state_dict(), head.state_dict()


def test_accuracy(suite: DigitsSuite, task: str, encoder: torch.nn.Module, head: torch.nn.Module) -> float:
    xs, ys = suite.data()["tasks"][task]["test"]
    return accuracy(lambda i: head(encoder(xs[i])), ys)


def plain_accuracy(suite, task, state, head_state) -> float:
    model = DigitsNet().eval()
    model.load_state_dict(state)
    head = torch.nn.Linear(WIDTH, head_state["weight"].shape[0])
    head.load_state_dict(head_state)
    return test_accuracy(suite, task, model, head)


def pleas_rows(suite, pair, models, heads, sizes, schedule) -> list[tuple]:
    x = calibration_inputs("digits", list(models))
    rows = []
    for method, options in METHODS.items():
        options = dict(options)
        calib = options.pop("calibration", x)
        for s in sizes:
            merged = pleas_merge(models, calib, s, heads=heads, schedule_name=schedule, **options)
            enc = merged.module()
            accs = [test_accuracy(suite, t, enc, merged.head(t)) for t in models]
            rows.append((pair, method, s, merged.config["size"], *accs))
    return rows


def flexmerge_rows(suite, pair, base, models, heads, sizes) -> list[tuple]:
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
                accs = [plain_accuracy(suite, t, flex.state_dict(t), heads[t]) for t in models]
                rows.append((pair, name, s, flex.size, *accs))
        return rows


def plot(rows: list[tuple], out: Path, tasks: list[str]) -> Path:
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
        ax.set(title=f"digits, {pair}: {' + '.join(tasks)}", xlabel="size (x one model)",
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
    ap.add_argument("--tasks", nargs=2, default=["rot90", "invert_mod3"])
    ap.add_argument("--sizes", nargs="+", type=float, default=[1.0, 1.25, 1.5, 2.0])
    ap.add_argument("--schedule", default="greedy", choices=["greedy", "uniform"])
    ap.add_argument("--out", type=Path, default=Path("results/pleas_digits"), help="results.md and curves.png here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    suite, (ta, tb) = DigitsSuite(), args.tasks
    base0, base1 = pretrain(suite, 0), pretrain(suite, 1)
    (sa, ha), (sb, hb) = finetune(suite, base0, ta, 10), finetune(suite, base0, tb, 11)
    sb1, hb1 = finetune(suite, base1, tb, 11)
    pairs = {"same base": ({ta: sa, tb: sb}, {ta: ha, tb: hb}),
             "different inits": ({ta: sa, tb: sb1}, {ta: ha, tb: hb1})}
    rows = []
    for pair, (models, heads) in pairs.items():
        rows.append((pair, "fine-tuned", 2.0, 2.0, *(plain_accuracy(suite, t, models[t], heads[t]) for t in models)))
        rows += pleas_rows(suite, pair, models, heads, args.sizes, args.schedule)
        if pair == "same base":
            rows += flexmerge_rows(suite, pair, base0, models, heads, sorted({*args.sizes, *FLEX_SIZES}))
    lines = [f"| pair | method | S | size | {ta} | {tb} | mean |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {pair} | {method} | {s:g} | {size:.3f} | {a:.3f} | {b:.3f} | {(a + b) / 2:.3f} |"
              for pair, method, s, size, a, b in rows]
    lines.append(f"\nschedule={args.schedule}; {time.perf_counter() - t0:.0f} s in all")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"plot: {plot(rows, args.out, [ta, tb])}")


if __name__ == "__main__":
    main()
