#!/usr/bin/env bash
# The test command: builds the CLI, makes sure the SmolLM2 weights are in the
# model cache (the model tests load them from there), then runs every test.
# Tests use the release profile so the workspace is compiled only once.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release -p tandem-conductor --bin tandem
target/release/tandem model fetch smollm2
cargo test --workspace --release
# The CUDA backend (feature `cuda`): its launch/probe unit tests, the NVRTC
# compile check of every kernel (libnvrtc from scripts/setup.sh) and the
# parity tests, whose GPU half skips, saying why, without a GPU. ~1 min extra.
cargo test --release -p tandem-kernels --features cuda
