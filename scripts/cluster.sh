#!/usr/bin/env bash
# Runs the loopback cluster of etc/cluster.toml — a store master, two storage
# nodes, a prefill node and a decode node, each its own `tandem` process —
# sends one request through it (prefill -> store -> decode), asks again to
# show the prefix cache hit, then stops the cluster. Arguments go to
# `tandem generate --cluster` (e.g. --chat --prompt "Hi" --max-tokens 64).
#
#   ./scripts/cluster.sh --chat --prompt "What is the capital of France?"
#
# TANDEM_CLUSTER=FILE uses another cluster file with the same node names.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

config=${TANDEM_CLUSTER:-etc/cluster.toml}
cargo build --release -p tandem-conductor --bin tandem
tandem=target/release/tandem
"$tandem" model fetch smollm2 >/dev/null

logs=$(mktemp -d)
pids=()
cleanup() {
    if ((${#pids[@]})); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# start NAME READY-TEXT ARGS...: runs `tandem ARGS` and waits for READY-TEXT
# in its log (up to 2 minutes).
start() {
    local name=$1 ready=$2
    shift 2
    "$tandem" "$@" >"$logs/$name.log" 2>&1 &
    local pid=$!
    pids+=("$pid")
    for _ in $(seq 1 1200); do
        grep -q "$ready" "$logs/$name.log" && return 0
        if ! kill -0 "$pid" 2>/dev/null; then break; fi
        sleep 0.1
    done
    echo "$name did not start; its log:" >&2
    cat "$logs/$name.log" >&2
    exit 1
}

start master "listening on" kvstore master --config "$config"
start store-a "listening: control" kvstore storage --config "$config" --node store-a
start store-b "listening: control" kvstore storage --config "$config" --node store-b
start prefill-0 "listening on" prefill --config "$config" --node prefill-0
start decode-0 "listening on" decode --config "$config" --node decode-0
echo "cluster up: master, store-a, store-b, prefill-0, decode-0 (logs in $logs)" >&2

"$tandem" generate --cluster "$config" "$@"
echo "--- the same request again: its prompt blocks now come from the store ---" >&2
"$tandem" generate --cluster "$config" "$@"
