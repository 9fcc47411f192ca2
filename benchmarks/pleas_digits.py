"""PLeaS on the digits suite: two tasks' accuracy at sizes 1, 1.25, 1.5, 2 for PLeaS, permutation-only
matching and plain weight averaging, for two fine-tunes of one base and for two models whose bases
were trained from different random initializations (where task vectors mean nothing).

    python -m benchmarks.pleas_digits [--tasks rot90 invert_mod3] [--sizes 1 1.25 1.5 2] [--schedule greedy]

Models are trained here with the suite's own data, splits and training loop (seconds); both bases see
the same pretraining data, only their initialization (and batch order) differs. Calibration: the two
tasks' validation inputs. Accuracy: each task's test split, read through its own (widened) head.
"Average (identity)" is PLeaS's pipeline with no permutation and no least squares: at 1x it is
plain weight averaging of the two encoders; above 1x the worst-correlated units (same index) stay
separate. For the shared base, FlexMerge (task_arithmetic, greedy path, M = 2) is shown beside it.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from safetensors.torch import save_file

from flexmerge.pleas import calibration_inputs, pleas_merge
from flexmerge.suites.digits import TASKS, WIDTH, DigitsNet, DigitsSuite
from flexmerge.suites.training import accuracy, train

METHODS = {"PLeaS": {"matching": "activation", "least_squares": True},
           "perm only": {"matching": "activation", "least_squares": False},
           "average (identity)": {"matching": "identity", "least_squares": False}}


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
        for s in sizes:
            merged = pleas_merge(models, x, s, heads=heads, schedule_name=schedule, **options)
            enc = merged.module()
            accs = [test_accuracy(suite, t, enc, merged.head(t)) for t in models]
            rows.append((pair, method, s, merged.config["size"], *accs))
    return rows


def flexmerge_rows(suite, pair, base, models, heads, sizes) -> list[tuple]:
    """FlexMerge's own curve for a shared base (task_arithmetic, greedy, sublayer blocks)."""
    import flexmerge

    with tempfile.TemporaryDirectory() as d:
        save_file(base.state_dict(), f"{d}/base.safetensors")
        for t, st in models.items():
            save_file(st, f"{d}/{t}.safetensors")
        tasks = flexmerge.load_tasks(f"{d}/base.safetensors", {t: f"{d}/{t}.safetensors" for t in models})
        rows = []
        for s in sizes:
            flex = flexmerge.merge(tasks, size=s, method="task_arithmetic")
            accs = [plain_accuracy(suite, t, flex.state_dict(t), heads[t]) for t in models]
            rows.append((pair, "FlexMerge TA", s, flex.size, *accs))
        return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs=2, default=["rot90", "invert_mod3"])
    ap.add_argument("--sizes", nargs="+", type=float, default=[1.0, 1.25, 1.5, 2.0])
    ap.add_argument("--schedule", default="greedy", choices=["greedy", "uniform"])
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
            rows += flexmerge_rows(suite, pair, base0, models, heads, args.sizes)
    print(f"| pair | method | S | size | {ta} | {tb} | mean |")
    print("|---|---|---|---|---|---|---|")
    for pair, method, s, size, a, b in rows:
        print(f"| {pair} | {method} | {s:g} | {size:.3f} | {a:.3f} | {b:.3f} | {(a + b) / 2:.3f} |")
    print(f"\nschedule={args.schedule}; {time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
