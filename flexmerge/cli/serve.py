"""Commands that run a merged model: serve (HTTP) and route (inputs of unknown task, Twin-Merging)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from flexmerge.cli.app import app, command, console, err, guarded, log_dim
from flexmerge.cli.options import CacheOpt
from flexmerge.errors import FlexMergeError
from flexmerge.evaluation import read_text_pairs
from flexmerge.extras import require_extra
from flexmerge.flexmodel.write import attach_router
from flexmerge.runtime import Runtime
from flexmerge.serve.limits import (DEFAULT_MAX_TOKENS, DEFAULT_REQUEST_TIMEOUT_S, allowed_hosts, check_api_key,
                                    check_connections, check_grace, check_limits, check_listen, check_max_tokens)
from flexmerge.suites import get_suite
from flexmerge.suites.serving import suite_artifact, suite_serve_options


@command
def serve(
    artifact: Optional[Path] = typer.Argument(None, help="flex-model directory (Hugging Face inputs: text tasks); "
                                                         "or --suite instead"),
    suite: Optional[str] = typer.Option(None, "--suite", help="instead of DIR: a text suite's zoo (wordnet | "
                                                               "wordnet20), merged to --size (built or reused)"),
    size: Optional[float] = typer.Option(None, "--size", help="with --suite: size to merge to, 1 <= size <= M"),
    method: Optional[str] = typer.Option(None, "--method", help="with --suite: merging method, optionally with its "
                                         "parameters, e.g. twin:rank=7 [default: task_arithmetic]"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="with --suite: where zoos and served artifacts "
                                                                       "are cached [default: ~/.cache/flexmerge]"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8000, "--port", help="TCP port to listen on"),
    max_batch: int = typer.Option(32, "--max-batch", help="most inputs in one forward pass, across tasks"),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms",
                                        help="how long a request waits for others to share its forward pass"),
    max_inputs: int = typer.Option(64, "--max-inputs", help="most inputs in one request (more: 413)"),
    max_chars: int = typer.Option(2000, "--max-chars", help="most characters in one input (more: 413)"),
    grace_s: float = typer.Option(10.0, "--grace-s", help="at SIGTERM, seconds to finish queued requests; what "
                                  "cannot start within 80% of it is answered 503"),
    max_connections: Optional[int] = typer.Option(None, "--max-connections", help="most connections open at once; "
                                                  "beyond, the oldest whose request has not arrived is closed "
                                                  "[default: 1000, or what `ulimit -n` leaves room for]"),
    request_timeout_s: float = typer.Option(DEFAULT_REQUEST_TIMEOUT_S, "--request-timeout-s",
                                            help="a request (line, headers, body) must arrive within this many "
                                                 "seconds of its first byte; else 408 and the connection closes"),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help="a Host header to answer (repeatable): "
                                           "example.com, *.example.com, or * for any; IP addresses and localhost "
                                           "always [default: the --host name and this machine's names]"),
    max_tokens: int = typer.Option(DEFAULT_MAX_TOKENS, "--max-tokens", help="causal LMs: most tokens one request "
                                   "generates (more: 400)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="FLEXMERGE_API_KEY", show_envvar=True,
                                          help="refuse requests without 'Authorization: Bearer KEY' (401), all "
                                          "but /health; prefer the environment variable (a flag shows in ps)"),
) -> None:
    """Serve every task of a flex model over HTTP (JSON): /health, /tasks, /v1/tasks/TASK/predict,
    and for causal LMs the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions; model = task).

    Concurrent requests, of any tasks, share forward passes. SIGTERM or Ctrl-C stops it gracefully.
    See docs/serving.md.

    Example: flexmerge serve flex-2x --port 8000
             flexmerge serve --suite wordnet --size 2     (the zoo merged to 2x, with its heads)
             curl localhost:8000/tasks
    """
    if artifact is not None and suite is not None:
        raise FlexMergeError("give an artifact directory or --suite NAME --size S, not both")
    if artifact is None and suite is None:
        raise FlexMergeError("give an artifact directory (flexmerge serve DIR) or --suite NAME --size S")
    if artifact is not None and (size, method, cache_dir) != (None, None, None):
        raise FlexMergeError("--size, --method and --cache-dir go with --suite; an artifact has its size already")
    if suite is not None and size is None:
        raise FlexMergeError(f"--suite {suite} needs --size S: the size to merge its zoo to")
    require_extra("serve", "flexmerge serve")
    # every flag and the port before anything is merged or loaded
    check_limits(max_inputs=max_inputs, max_chars=max_chars, max_batch=max_batch, batch_wait_ms=batch_wait_ms)
    check_grace(grace_s)
    connections = check_connections(max_connections, request_timeout_s)
    hosts = allowed_hosts(allowed_host, host)
    check_max_tokens(max_tokens)
    check_api_key(api_key)
    check_listen(host, port)
    from flexmerge.serve.server import create_app, run_server  # the serve extra (FastAPI, uvicorn)

    if suite is not None:
        the_suite = get_suite(suite)
        artifact, zoo = suite_artifact(the_suite, size, method or "task_arithmetic", cache_dir, log=log_dim)
        err.print(f"[dim]serving {escape(str(artifact))}[/]", soft_wrap=True)
        runtime = Runtime.load(artifact, **the_suite.serve_options(zoo))
    else:
        runtime = Runtime.load(artifact)
    # one input per task before listening: the models are built now (not in the first request),
    # and an artifact that cannot run fails here, with a message, instead of in every request
    runtime.warm_up()
    http = create_app(runtime, max_inputs=max_inputs, max_chars=max_chars, max_batch=max_batch,
                      batch_wait_ms=batch_wait_ms, allowed_hosts=hosts, max_tokens=max_tokens, api_key=api_key)
    run_server(http, host=host, port=port, log_level="info", grace_s=grace_s, max_connections=connections,
               request_timeout_s=request_timeout_s)


route_app = typer.Typer(no_args_is_help=True, help="Routed inference (Twin-Merging): inputs of unknown task.")
app.add_typer(route_app, name="route")
RouteSuiteOpt = typer.Option(None, "--suite", help="the artifact is a merge of this text suite's zoo (wordnet | "
                             "wordnet20 | wordnet30): its tokenizer and heads are the suite's")


@route_app.command("train")
@guarded
def route_train(
    artifact: Path = typer.Argument(..., help="flex-model directory (Hugging Face inputs, or a text suite's merge)"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="JSON lines {\"text\": ..., "
                                               "\"task\": ...}, a few hundred per task (e.g. a validation split)"),
    suite: Optional[str] = typer.Option(None, "--suite", help="instead of --calibration: the artifact is a merge of "
                                        "this text suite's zoo (wordnet | wordnet20 | wordnet30); the router "
                                        "learns from the suite's validation split"),
    per_task: Optional[int] = typer.Option(None, "--per-task", min=1, help="with --suite: examples per task, "
                                           "evenly spread over each task's split [default: all]"),
    cache_dir: Optional[Path] = CacheOpt,
    epochs: int = typer.Option(50, "--epochs", min=1, help="training epochs (Twin-Merging's 50)"),
    seed: int = typer.Option(0, "--seed", help="seed of the router's initialization, shuffling and dropout"),
    batch_size: int = typer.Option(1024, "--batch-size", min=2, help="examples per step (Twin-Merging's 1024)"),
) -> None:
    """Train the router on the shared model's pooled features and store it in the artifact.

    Example: flexmerge route train flex-twin --calibration val.jsonl

             flexmerge route train ~/.cache/flexmerge/served/wordnet-...-twin_rank=7-1.3x --suite wordnet
             --batch-size 64
    """
    if (calibration is None) == (suite is None):
        raise FlexMergeError("give exactly one of --calibration FILE (JSON lines of text and task) or "
                             "--suite NAME (its validation split)")
    if suite is None and (per_task is not None or cache_dir is not None):
        raise FlexMergeError("--per-task and --cache-dir go with --suite")
    if suite is not None:
        the_suite, options = suite_serve_options(artifact, suite, cache_dir, log=log_dim)
        pairs = the_suite.router_calibration(per_task)
    else:
        pairs = [(text, str(task)) for text, task in read_text_pairs(calibration, "task", what="calibration data")]
        options = {}
    runtime = Runtime.load(artifact, **options)
    router = runtime.train_router(pairs, epochs=epochs, seed=seed, batch_size=batch_size)
    routed = runtime.route([t for t, _ in pairs]).argmax(-1).tolist()
    hits = sum(r == runtime.tasks.index(k) for r, (_, k) in zip(routed, pairs))
    attach_router(artifact, router)
    console.print(f"router {router.shape} trained on {len(pairs)} examples; calibration routing accuracy "
                  f"{hits / len(pairs):.3f}; stored in {escape(str(artifact))}", soft_wrap=True)


@route_app.command("predict")
@guarded
def route_predict(
    artifact: Path = typer.Argument(..., help="flex-model directory with a router"),
    text: list[str] = typer.Option(..., "--text", help="an input (repeatable)"),
    mode: str = typer.Option("argmax", "--mode", help="argmax (one mixed pass) | mixture (weights mixed per input)"),
    suite: Optional[str] = RouteSuiteOpt,
    cache_dir: Optional[Path] = CacheOpt,
) -> None:
    """Answer inputs without task ids: route, then run the routed weights. Prints JSON lines.

    Example: flexmerge route predict flex-twin --text "a small dog" --mode mixture
    """
    if suite is None and cache_dir is not None:
        raise FlexMergeError("--cache-dir goes with --suite")
    options = suite_serve_options(artifact, suite, cache_dir, log=log_dim)[1] if suite is not None else {}
    for answer in Runtime.load(artifact, **options).predict_routed(text, mode=mode):
        console.print(json.dumps(answer), soft_wrap=True, markup=False)
