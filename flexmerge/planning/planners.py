"""The planners: the paper's greedy algorithm and its block-order ablations, the clustering
baselines, and the cost planners. Each is one small function registered by name."""

from __future__ import annotations

import numpy as np
import torch

from flexmerge.planning.activations import task_metrics
from flexmerge.planning.baselines import channel_assignments, cluster_assignments
from flexmerge.planning.costs import (
    QuadraticCost,
    method_weights,
    output_quadratics,
    parameter_quadratics,
    run_cost_greedy,
)
from flexmerge.planning.greedy import ORDERS, ConstituentLinkage, RawStep, Rescorer, run_greedy
from flexmerge.planning.merged import GramMerged, VectorMerged
from flexmerge.planning.path import Assignment, MergeStep
from flexmerge.planning.registry import PlanInputs, register_planner
from flexmerge.similarity import block_base, block_deltas, cosine_from_gram
from flexmerge.size import SizeModel


def _greedy_order(order: str):
    def run(inputs: PlanInputs) -> tuple[list[MergeStep], list[float]]:
        raw = run_greedy(_rescorer(inputs), order=order, seed=inputs.options.seed)
        return sized_steps(raw, len(inputs.partition), inputs.tasks.num_tasks, inputs.sizer)

    return run


for _order, _summary in zip(ORDERS, ("the most similar pair of groups over all blocks first (FlexMerge)",
                                     "blocks in order, first to last", "blocks in order, last to first",
                                     "blocks in a random order")):
    register_planner(_order, "order", summary=_summary)(_greedy_order(_order))


@register_planner("channel", "cluster", summary="per block k-means of the task vectors (Channel Merging)")
def channel(inputs: PlanInputs) -> list[Assignment]:
    return channel_assignments(_cosines(inputs.grams), seed=inputs.options.seed)


@register_planner("cluster", "cluster", summary="agglomerative clustering of whole models")
def cluster(inputs: PlanInputs) -> list[Assignment]:
    total = cosine_from_gram(_as_torch(inputs.grams.sum(0))).numpy()
    return cluster_assignments(total, len(inputs.partition), inputs.options.linkage)


@register_planner("recon", "cost", summary="least parameter-space reconstruction cost per byte saved")
def recon(inputs: PlanInputs) -> tuple[list[MergeStep], list[float]]:
    return _cost_path(inputs, parameter_quadratics(inputs.grams))


@register_planner("output", "cost", data_aware=True,
                  summary="least output-space cost per byte saved, on calibration activations")
def output(inputs: PlanInputs) -> tuple[list[MergeStep], list[float]]:
    metrics = task_metrics(inputs.tasks, inputs.calibration, int(inputs.options.cost_settings()["rank"]))
    return _cost_path(inputs, output_quadratics(inputs.tasks, inputs.partition, inputs.pipeline, metrics))


def _cost_path(inputs: PlanInputs, quad) -> tuple[list[MergeStep], list[float]]:
    """The path of a cost planner over the quadratics `quad` of its space."""
    costs, sizer = inputs.options.cost_settings(), inputs.sizer
    cost = QuadraticCost(quad, method_weights(inputs.method), costs["norm"])

    def saved(b: int, groups: list[list[int]], i: int, j: int) -> float:
        sizes = [len(g) for g in groups if g]
        fused = [len(g) for k, g in enumerate(groups) if g and k not in (i, j)] + [len(groups[i]) + len(groups[j])]
        return sizer.unit.of(sizer.block_total(b, sizes) - sizer.block_total(b, fused))

    raw = run_cost_greedy(cost, saved, byte_power=float(costs["byte_power"]))
    return sized_steps(raw, len(inputs.partition), inputs.tasks.num_tasks, sizer)


def _as_torch(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _cosines(grams: np.ndarray) -> np.ndarray:
    return cosine_from_gram(_as_torch(grams)).numpy()


def _rescorer(inputs: PlanInputs) -> Rescorer:
    options, method = inputs.options, inputs.method
    if options.mode == "constituent":
        return ConstituentLinkage(_cosines(inputs.grams), options.linkage)
    if options.measure != "sign" and method.linear_weights(2) is not None:
        return GramMerged(inputs.grams, method, options.measure)
    tasks, partition = inputs.tasks, inputs.partition
    vectors = [block_deltas(tasks, partition, b, inputs.pipeline) for b in range(len(partition))]
    bases = [block_base(tasks, partition, b) for b in range(len(partition))] if method.needs_base else None
    return VectorMerged(vectors, method, options.measure, [blk.views(tasks.meta) for blk in partition.blocks],
                        bases)


def sized_steps(raw: list[RawStep], num_blocks: int, num_tasks: int,
                sizer: SizeModel) -> tuple[list[MergeStep], list[float]]:
    """The steps of a greedy order with the exact size after each (point 0: every fine-tune)."""
    group_sizes = [[1] * num_tasks for _ in range(num_blocks)]
    block_bytes = [sizer.block_total(b, g) for b, g in enumerate(group_sizes)]
    total = sum(block_bytes) + sizer.specific_bytes
    sizes = [sizer.unit.of(total)]
    steps = []
    for b, left, right, sim in raw:
        g = group_sizes[b]
        g.remove(len(left))
        g.remove(len(right))
        g.append(len(left) + len(right))
        new = sizer.block_total(b, g)
        total += new - block_bytes[b]
        block_bytes[b] = new
        sizes.append(sizer.unit.of(total))
        steps.append(MergeStep(b, left, right, sim, sizes[-1]))
    return steps, sizes
