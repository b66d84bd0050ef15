#!/usr/bin/env bash
# Starts the whole loopback cluster with `tandem up` — conductor, store
# master, storage node, prefill and decode workers, each its own process —
# asks it one chat question through the OpenAI-compatible API (streamed:
# conductor -> prefill -> store -> decode), asks again to show the prompt's
# blocks coming from the store, then stops the cluster (or, with --serve,
# keeps serving until Ctrl-C).
#
#   ./scripts/cluster.sh "What is the capital of France?"
#   ./scripts/cluster.sh --serve            # then use http://127.0.0.1:8000/v1
#
# TANDEM_HTTP_PORT picks the API port (default 8000).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

serve=0
if [[ ${1:-} == --serve ]]; then
    serve=1
    shift
fi
question=${1:-What is the capital of France?}
port=${TANDEM_HTTP_PORT:-8000}

cargo build --release -p tandem-conductor --bin tandem
tandem=target/release/tandem
if ((serve)); then
    exec "$tandem" up --http-port "$port"
fi

logs=$(mktemp -d)
"$tandem" up --http-port "$port" --logs "$logs" >"$logs/up.out" 2>"$logs/up.err" &
up=$!
trap 'kill -TERM $up 2>/dev/null; wait $up 2>/dev/null || true' EXIT
for _ in $(seq 1 3000); do
    grep -q "Tandem is up" "$logs/up.out" 2>/dev/null && break
    if ! kill -0 "$up" 2>/dev/null; then
        cat "$logs/up.err" >&2
        exit 1
    fi
    sleep 0.1
done
cat "$logs/up.err" "$logs/up.out" >&2

# ask: one streamed chat completion, printed as it arrives.
ask() {
    local body
    body=$(python3 -c 'import json,sys; print(json.dumps({"model": "smollm2", "stream": True, "temperature": 0,
        "max_tokens": 128, "messages": [{"role": "user", "content": sys.argv[1]}]}))' "$question")
    local start
    start=$(date +%s.%N)
    curl -sN "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' -d "$body" |
        python3 -c '
import json, sys, time
start = float(sys.argv[1]); first = None
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("data: ") or line == "data: [DONE]":
        continue
    chunk = json.loads(line[6:])
    if "error" in chunk:
        sys.exit("error: " + chunk["error"]["message"])
    text = chunk["choices"][0]["delta"].get("content") or ""
    if text and first is None:
        first = time.time() - start
    print(text, end="", flush=True)
print(f"\n(time to first token {first or 0:.3f} s, total {time.time() - start:.3f} s)", file=sys.stderr)' "$start"
}

echo "> $question" >&2
ask
echo "--- the same question again: its prompt blocks now come from the store ---" >&2
ask
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^tandem_(prompt_tokens|cached_prompt_tokens)_total' >&2
