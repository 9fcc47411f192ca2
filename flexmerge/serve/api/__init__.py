"""The HTTP APIs of the server, one FastAPI `APIRouter` per API family, each built by a `router(...)`
factory that `flexmerge.serve.server.create_app` includes: `health` (GET /health) and `tasks`
(GET /tasks, POST /v1/tasks/{task}/predict). A new API (OpenAI-compatible, say) is one more module
here that submits its inputs to the app's batcher (`flexmerge.serve.batcher.running_batcher`)."""
