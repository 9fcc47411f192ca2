"""Serving over HTTP (with the `serve` extra): `server` builds and runs the app, `api` holds its
endpoints, `batcher` pools requests into shared forward passes. `Runtime` (the in-process
multi-task runtime the server is built on, `flexmerge.runtime`) is re-exported for users."""

from flexmerge.runtime import Runtime

__all__ = ["Runtime"]
