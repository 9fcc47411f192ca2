"""In-process serving of one artifact: every task from one process, mixed-task batches as one
forward pass, text generation of causal LMs with mixed-task continuous batching (`Runtime.generate`,
`Generator`, `Sampling`), routed inference for inputs of unknown task (`Runtime`), and routed
scoring (`routed_score`). Below `flexmerge.api`: it reads artifacts and never imports suites, curves or
the HTTP server (`flexmerge.serve` puts HTTP on top of it, `flexmerge.suites.serving` suites)."""

from flexmerge.runtime.generation import Generator, Sampling
from flexmerge.runtime.memory import release_freed_memory
from flexmerge.runtime.pooling import mean_pool
from flexmerge.runtime.routed import RoutedScore, routed_score
from flexmerge.runtime.runtime import Runtime

__all__ = ["Generator", "Runtime", "RoutedScore", "Sampling", "mean_pool", "release_freed_memory", "routed_score"]
