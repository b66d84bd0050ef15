#!/usr/bin/env bash
# The test command: builds the CLI, makes sure the SmolLM2 weights are in the
# model cache (the model tests load them from there), then runs every test.
# Tests use the release profile so the workspace is compiled only once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release -p tandem-conductor --bin tandem
target/release/tandem model fetch smollm2
cargo test --workspace --release
