"""Twin-Merging on the wordnet zoo with and without task ids: known-task Twin, routed Twin, the 1x merge.

    python benchmarks/twin_routed.py [--ranks 2,15] [--batch-size 64] [--epochs 50]

For each rank, Twin-Merging itself (every block one group of all 8 tasks: the twin path's last
point, `twin:rank=r`) is materialized in memory and scored by the library's routed evaluation,
`flexmerge.suites.routing.SuiteRouting` (what `flexmerge sweep --routed` runs at every twin point): the
router (Twin-Merging's MLP) is trained on the shared model's mean-pooled features of the tasks'
validation glosses (40 per class), then routes the mixed test set of all tasks (3800 glosses, no
task ids). Per task, normalized accuracy (accuracy / the fine-tune's) of:
  known     each test gloss through its own task's Twin weights and head (task id given);
  routed    each gloss through the Twin weights and head of the router's argmax task (per batch,
            `Runtime.predict_routed(mode="argmax")`); a gloss routed to another task is wrong;
  shared    the shared model θ* alone with the true task's head (Twin without residuals);
  ta_1x     FlexMerge's Task Arithmetic at 1x (λ = 1.5, mean), with the true task's head.
"""

from __future__ import annotations

import argparse
import json
import time

import flexmerge
from flexmerge.flexmodel.materialize import materialize
from flexmerge.suites import get_suite, get_zoo
from flexmerge.suites.routing import SuiteRouting


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="2,15")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    suite = get_suite("wordnet")
    zoo = get_zoo(suite, None)
    tasks = flexmerge.load_tasks(zoo.base, zoo.models, **suite.load_options())
    finetuned, evaluate = zoo.info["finetuned"], suite.evaluator(zoo)
    routing = SuiteRouting(suite, zoo, epochs=args.epochs, batch_size=args.batch_size)

    def normalized(state_of) -> dict[str, float]:
        return {t: evaluate(t, state_of(t)) / finetuned[t] for t in tasks.names}

    t0 = time.perf_counter()
    ta = flexmerge.merge(tasks, size=1.0, method="task_arithmetic")
    results = {"ta_1x": {"size": ta.size, "normalized": normalized(ta.state_dict)}}
    for rank in [int(r) for r in args.ranks.split(",")]:
        method = flexmerge.get_method("twin", rank=rank)
        path = flexmerge.plan(tasks, method=method)
        flex = materialize(tasks, flexmerge.discover_blocks(tasks), path.assignment(len(path.steps)), method)
        score = routing(flex)
        results[f"twin:rank={rank}"] = {
            "size": flex.size, "router_accuracy": score.router_overall, "router_accuracy_per_task": score.router_accuracy,
            "known": normalized(flex.state_dict), "routed": {t: a / finetuned[t] for t, a in score.accuracy.items()},
            "shared": normalized(lambda t: flex.shared_state_dict())}
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    print(f"1x task_arithmetic: size {results['ta_1x']['size']:.3f}x, normalized {mean(results['ta_1x']['normalized']):.3f}")
    for name, r in results.items():
        if name != "ta_1x":
            print(f"{name}: size {r['size']:.3f}x, router accuracy {r['router_accuracy']:.3f}; normalized: known-task "
                  f"{mean(r['known']):.3f}, routed {mean(r['routed']):.3f}, shared only {mean(r['shared']):.3f}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
