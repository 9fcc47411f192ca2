#!/usr/bin/env bash
# Each way of installing flexmerge works on its own, as a new user would get it: the core package
# alone (`pip install .`, no extras), then core + each extra (suites, serve, ray), each in a fresh
# virtual environment that holds nothing else. CI runs it after the tests (.ci/run).
#   core:   flexmerge --help, a tiny merge / inspect / export; the commands that need an extra say
#           which one, in one line, with exit 2
#   suites: flexmerge demo --suite digits (builds the digits zoo and sweeps it)
#   serve:  flexmerge serve on a tiny Hugging Face merge answers /health and a classification
#   ray:    flexmerge merge --executor ray
# Usage: bash scripts/check_installs.sh [core|suites|serve|ray ...]   (default: all four)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export FLEXMERGE_NO_PROGRESS=1 HF_HUB_OFFLINE=1

say() { printf '\n== %s\n' "$*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }

fresh_venv() {  # fresh_venv NAME SPEC: a venv with torch (pinned, as install.sh) and flexmerge SPEC
  "$PY" -m venv "$WORK/$1"
  "$WORK/$1/bin/python" -m pip install -qq "${TORCH_SPEC:-torch==2.13.0}"
  "$WORK/$1/bin/python" -m pip install -qq "$ROOT$2"
}

tiny_models() {  # tiny_models VENV DIR: a base and 3 fine-tunes as safetensors files
  "$WORK/$1/bin/python" - "$2" <<'EOF'
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
out = Path(sys.argv[1]); out.mkdir(parents=True)
g = torch.Generator().manual_seed(0)
base = {f"layers.{i}.{n}.weight": torch.randn(16, 16, generator=g) for i in range(3) for n in ("attn", "mlp")}
save_file(base, str(out / "base.safetensors"))
for t in range(3):
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(out / f"t{t}.safetensors"))
EOF
}

expect_extra() {  # expect_extra EXTRA COMMAND...: exit 2 and one line that names the extra
  local extra=$1 out rc=0
  shift
  out=$("$@" 2>&1) || rc=$?
  [ "$rc" = 2 ] || fail "$* exited $rc, not 2: $out"
  [ "$(printf '%s\n' "$out" | wc -l)" = 1 ] || fail "$* printed more than one line: $out"
  printf '%s\n' "$out" | grep -qF "pip install 'flexmerge[$extra]'" || fail "$* does not name the '$extra' extra: $out"
  echo "ok: $* -> $out"
}

check_core() {
  say "core: pip install . (no extras)"
  fresh_venv core ""
  local bin="$WORK/core/bin" m="$WORK/models"
  "$bin/flexmerge" --help >/dev/null
  for c in plan merge inspect export methods sweep demo serve route pleas; do "$bin/flexmerge" "$c" --help >/dev/null; done
  tiny_models core "$m"
  local models=(--model "a=$m/t0.safetensors" --model "b=$m/t1.safetensors" --model "c=$m/t2.safetensors")
  "$bin/flexmerge" merge --base "$m/base.safetensors" "${models[@]}" --method ties --size 2 --out "$WORK/flex"
  "$bin/flexmerge" inspect "$WORK/flex" >/dev/null
  "$bin/flexmerge" export "$WORK/flex" --task b --out "$WORK/b.safetensors"
  "$bin/flexmerge" merge --base "$m/base.safetensors" "${models[@]}" --size max --out "$WORK/flex-max"
  "$bin/flexmerge" export "$WORK/flex-max" --task c --out "$WORK/c.safetensors"
  "$bin/python" - "$m/t2.safetensors" "$WORK/c.safetensors" <<'EOF'
import sys, torch
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "--size max is not the fine-tune"
EOF
  expect_extra suites "$bin/flexmerge" demo
  expect_extra suites "$bin/flexmerge" sweep --suite digits
  expect_extra serve "$bin/flexmerge" serve "$WORK/flex"
  expect_extra ray "$bin/flexmerge" merge --base "$m/base.safetensors" "${models[@]}" --size 2 --executor ray \
    --out "$WORK/flex-ray"
}

check_suites() {
  say "suites: pip install '.[suites]'"
  fresh_venv suites "[suites]"
  (cd "$WORK" && "$WORK/suites/bin/flexmerge" demo --suite digits --cache-dir "$WORK/cache" --out "$WORK/demo") \
    | tee "$WORK/demo.log" | tail -3
  grep -q "mean normalized accuracy" "$WORK/demo.log" || fail "flexmerge demo --suite digits printed no table"
  [ -f "$WORK/demo/normalized_accuracy.png" ] || fail "flexmerge demo --suite digits wrote no plot"
}

check_serve() {
  say "serve: pip install '.[serve]'"
  fresh_venv serve "[serve]"
  local bin="$WORK/serve/bin"
  "$bin/python" - "$WORK/hf" <<'EOF'
import sys, torch, transformers
from pathlib import Path
out = Path(sys.argv[1])
config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 vocab_size=30, max_position_embeddings=32, num_labels=2)
torch.manual_seed(0)
base = transformers.BertForSequenceClassification(config).eval()
base.save_pretrained(out / "base")
vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(25)]
(out / "vocab.txt").write_text("\n".join(vocab) + "\n")
tok = transformers.BertTokenizerFast(vocab_file=str(out / "vocab.txt"))
tok.save_pretrained(out / "base")
for name in ("a", "b"):
    ft = transformers.BertForSequenceClassification(config).eval()
    ft.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in base.state_dict().items()})
    ft.save_pretrained(out / name)
    tok.save_pretrained(out / name)
EOF
  "$bin/flexmerge" merge --base "$WORK/hf/base" --model "a=$WORK/hf/a" --model "b=$WORK/hf/b" --size 1.5 \
    --out "$WORK/flex-hf"
  local port
  port=$("$bin/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  "$bin/flexmerge" serve "$WORK/flex-hf" --port "$port" >"$WORK/serve.log" 2>&1 &
  local pid=$!
  "$bin/python" - "$port" <<'EOF' || { kill "$pid" 2>/dev/null; cat "$WORK/serve.log"; fail "flexmerge serve did not answer"; }
import json, sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(120):
    try:
        urllib.request.urlopen(url + "/health", timeout=2).read()
        break
    except OSError:
        time.sleep(0.5)
else:
    raise SystemExit("no /health after 60 s")
request = urllib.request.Request(url + "/v1/tasks/a/predict", data=json.dumps({"inputs": ["w1 w2 w3"]}).encode(),
                                 headers={"Content-Type": "application/json"})
answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
assert answer["task"] == "a" and len(answer["outputs"]) == 1 and "label" in answer["outputs"][0], answer
print("ok: flexmerge serve answered /health and a prediction:", answer["outputs"][0]["label"])
EOF
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

check_ray() {
  say "ray: pip install '.[ray]'"
  fresh_venv ray "[ray]"
  local m="$WORK/models-ray"
  tiny_models ray "$m"
  RAY_ADDRESS= "$WORK/ray/bin/flexmerge" merge --base "$m/base.safetensors" --model "a=$m/t0.safetensors" \
    --model "b=$m/t1.safetensors" --model "c=$m/t2.safetensors" --size 2 --executor ray --out "$WORK/flex-ray"
}

for what in "${@:-core suites serve ray}"; do
  for w in $what; do "check_$w"; done
done
say "all install checks passed"
