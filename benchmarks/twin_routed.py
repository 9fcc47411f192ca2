"""Twin-Merging on the wordnet zoo with and without task ids: known-task Twin, routed Twin, the 1x merge.

    python benchmarks/twin_routed.py [--ranks 2,15] [--batch-size 64] [--epochs 50]

For each rank, Twin-Merging itself (every block one group of all 8 tasks: the twin path's last
point, `twin:rank=r`) is materialized in memory. The router (`flexmerge.routing.fit_router`,
Twin-Merging's MLP) is trained on the shared model's mean-pooled features of the tasks' validation
glosses (40 per class), then routes the mixed test set of all tasks (3800 glosses, no task ids).
Per task, normalized accuracy (accuracy / the fine-tune's) of:
  known     each test gloss through its own task's Twin weights and head (task id given);
  routed    each gloss through the Twin weights and head of the router's argmax task (per batch,
            `Runtime.predict_routed(mode="argmax")`); a gloss routed to another task is wrong
            (another label set);
  shared    the shared model θ* alone with the true task's head (Twin without residuals);
  ta_1x     FlexMerge's Task Arithmetic at 1x (λ = 1.5, mean), with the true task's head.
The per-example mixture (`mode="mixture"`) rebuilds the weights per gloss and is not run here.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from safetensors.torch import load_file

import flexmerge
from flexmerge.flexmodel.materialize import materialize
from flexmerge.routing import fit_router, route_weights
from flexmerge.suites import get_suite, get_zoo
from flexmerge.suites.training import accuracy


def pooled_all(suite, model, texts: list[str]) -> torch.Tensor:
    batch = suite.encode(texts)
    with torch.no_grad():
        return torch.cat([suite.pooled(model, batch, i) for i in torch.arange(len(texts)).split(128)])


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
    names = list(tasks.names)
    splits = suite.splits()
    finetuned = zoo.info["finetuned"]
    heads = {}
    for t in names:
        sd = load_file(zoo.head(t))
        heads[t] = torch.nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0])
        heads[t].load_state_dict(sd)
    model = suite.encoder().eval()
    test_texts = [x for t in names for x in splits[t]["test"].texts]
    test_task = torch.tensor([k for k, t in enumerate(names) for _ in splits[t]["test"].texts])
    test_label = torch.cat([splits[t]["test"].labels for t in names])

    def task_accuracy(state: dict[str, torch.Tensor], t: str) -> float:
        model.load_state_dict(state)
        x = suite.encode(splits[t]["test"].texts)
        return accuracy(lambda i: heads[t](suite.pooled(model, x, i)), splits[t]["test"].labels, 128)

    t0 = time.perf_counter()
    ta = flexmerge.merge(tasks, size=1.0, method="task_arithmetic")
    results = {"ta_1x": {"size": ta.size, "normalized": {t: task_accuracy(ta.state_dict(t), t) / finetuned[t]
                                                         for t in names}}}
    for rank in [int(r) for r in args.ranks.split(",")]:
        method = flexmerge.get_method("twin", rank=rank)
        path = flexmerge.plan(tasks, method=method)
        flex = materialize(tasks, flexmerge.discover_blocks(tasks), path.assignment(len(path.steps)), method)
        model.load_state_dict(flex.shared_state_dict())
        val = [(x, k) for k, t in enumerate(names) for x in splits[t]["val"].texts]
        router = fit_router(pooled_all(suite, model, [x for x, _ in val]), [k for _, k in val], len(names),
                            epochs=args.epochs, batch_size=args.batch_size)
        routed = route_weights(router, pooled_all(suite, model, test_texts)).argmax(-1)
        shared = {t: task_accuracy(flex.shared_state_dict(), t) / finetuned[t] for t in names}
        known = {t: task_accuracy(flex.state_dict(t), t) / finetuned[t] for t in names}
        correct = torch.zeros(len(test_texts), dtype=torch.bool)
        for k, t in enumerate(names):  # per batch: the glosses routed to task k run as task k
            rows = (routed == k).nonzero().flatten()
            if len(rows):
                model.load_state_dict(flex.state_dict(t))
                x = suite.encode([test_texts[i] for i in rows])
                with torch.no_grad():
                    pred = torch.cat([heads[t](suite.pooled(model, x, i)).argmax(-1)
                                      for i in torch.arange(len(rows)).split(128)])
                correct[rows] = (test_task[rows] == k) & (pred == test_label[rows])
        routed_acc = {t: float(correct[test_task == k].float().mean()) / finetuned[t] for k, t in enumerate(names)}
        results[f"twin:rank={rank}"] = {
            "size": flex.size, "router_accuracy": float((routed == test_task).float().mean()),
            "router_accuracy_per_task": {t: float((routed[test_task == k] == k).float().mean())
                                         for k, t in enumerate(names)},
            "known": known, "routed": routed_acc, "shared": shared}
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
