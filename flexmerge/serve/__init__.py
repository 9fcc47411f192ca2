"""Serving: a multi-task runtime over one artifact (`Runtime`) and, with the `serve` extra, an HTTP server."""

from flexmerge.serve.runtime import Runtime

__all__ = ["Runtime"]
