#!/usr/bin/env bash
# Engine benchmark: Tandem against llama.cpp (llama-cpp-python) on SmolLM2,
# CPU only, same machine, same run, same fixed prompt ids.
#
#   bench/run_engine_bench.sh [--runs N] [--threads N] [--out FILE] [--gguf PATH]
#
# Measures prefill tokens/s of a 512-token prompt and aggregate decode
# tokens/s at batch 1 and 16 (64 greedy tokens per sequence, EOS ignored).
# The two engines run alternately, --runs times each, and medians are kept.
# Writes bench/results/engine_smollm2.json (schema tandem-bench-engine/1) and
# prints the ratios Tandem / llama.cpp. If llama-cpp-python cannot be
# installed, the Tandem side still runs and the llama.cpp side records why.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

RUNS=3
THREADS=2
OUT="bench/results/engine_smollm2.json"
GGUF=""
PROMPT_TOKENS=512
DECODE_TOKENS=64
BATCHES=(1 16)
LLAMA_CPP_PYTHON="llama-cpp-python==0.3.36"
VENV="bench/.venv"

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
while (($# > 0)); do
    case "$1" in
        --runs) RUNS="$2"; shift 2 ;;
        --threads) THREADS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --gguf) GGUF="$2"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
[[ "$RUNS" =~ ^[1-9][0-9]?$ ]] || { echo "--runs must be 1..99" >&2; exit 2; }
[[ "$THREADS" =~ ^[1-9][0-9]{0,2}$ ]] || { echo "--threads must be 1..999" >&2; exit 2; }

say() { printf '== %s\n' "$*" >&2; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# The fixed prompt: ordinary vocabulary ids, the same on both sides.
ids=()
for ((i = 0; i < PROMPT_TOKENS; i++)); do
    ids+=($((1000 + (i * 7919) % 40000)))
done
PROMPT_IDS="$(IFS=,; echo "${ids[*]}")"

# --- Tandem --------------------------------------------------------------
TANDEM=target/release/tandem
TANDEM_ERROR=""
say "building tandem (release)"
if ! cargo build --release -p tandem-conductor --bin tandem >"$WORK/build.log" 2>&1; then
    TANDEM_ERROR="cargo build failed: $(tail -n 5 "$WORK/build.log" | tr '\n' ' ')"
elif ! "$TANDEM" model fetch smollm2 >"$WORK/fetch.log" 2>&1; then
    TANDEM_ERROR="tandem model fetch smollm2 failed: $(tail -n 5 "$WORK/fetch.log" | tr '\n' ' ')"
fi
[[ -z "$TANDEM_ERROR" ]] || say "Tandem side unavailable: $TANDEM_ERROR"

# Where `tandem model fetch` caches the GGUF (mirrors model/src/fetch.rs).
cache_dir() {
    if [[ -n "${TANDEM_HOME:-}" ]]; then
        echo "$TANDEM_HOME/models"
    elif [[ "${XDG_CACHE_HOME:-}" == /* ]]; then
        echo "$XDG_CACHE_HOME/tandem/models"
    else
        echo "${HOME:?}/.cache/tandem/models"
    fi
}
if [[ -z "$GGUF" ]]; then
    GGUF="$(cache_dir)/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
fi

# --- llama.cpp -----------------------------------------------------------
LLAMA_ERROR=""
PY="$VENV/bin/python"
if ! [[ -f "$GGUF" ]]; then
    LLAMA_ERROR="no GGUF at the model cache path; run tandem model fetch smollm2 or pass --gguf"
elif ! { [[ -x "$PY" ]] && "$PY" -c 'import llama_cpp' 2>/dev/null; }; then
    say "installing $LLAMA_CPP_PYTHON into $VENV (builds llama.cpp from source: about 10 minutes)"
    log="$VENV/llama_cpp_install.log"
    if ! { [[ -x "$PY" ]] || python3 -m venv "$VENV"; } ||
        ! "$PY" -m pip install --disable-pip-version-check "$LLAMA_CPP_PYTHON" >"$WORK/pip.log" 2>&1; then
        if [[ -d "$VENV" ]]; then cp "$WORK/pip.log" "$log" 2>/dev/null || true; fi
        LLAMA_ERROR="could not install $LLAMA_CPP_PYTHON (needs python3-venv, cmake and a C++ compiler; log in $VENV/llama_cpp_install.log): $(tail -n 3 "$WORK/pip.log" 2>/dev/null | tr '\n' ' ')"
    fi
fi
[[ -z "$LLAMA_ERROR" ]] || say "llama.cpp baseline unavailable, continuing with Tandem alone: $LLAMA_ERROR"

# --- Runs, alternating -----------------------------------------------------
batch_csv="$(IFS=,; echo "${BATCHES[*]}")"
LLAMA_CMD="$PY bench/llama_cpp_baseline.py --model <smollm2 gguf> --threads $THREADS --prompt-tokens $PROMPT_TOKENS --decode-tokens $DECODE_TOKENS --batch $batch_csv --runs 1 --json OUT"
TANDEM_CMD="$TANDEM generate --model smollm2 --prompt-ids <prompt ids> --max-tokens $DECODE_TOKENS --ignore-eos --temperature 0 --threads $THREADS --batch B --json"

# Other work on the machine skews both engines (llama.cpp's OpenMP threads
# spin and suffer most); the load averages around the runs are recorded.
LOADAVG_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || true)"
for ((r = 1; r <= RUNS; r++)); do
    if [[ -z "$LLAMA_ERROR" ]]; then
        say "run $r/$RUNS: llama.cpp"
        if ! "$PY" bench/llama_cpp_baseline.py --model "$GGUF" --threads "$THREADS" \
            --prompt-tokens "$PROMPT_TOKENS" --decode-tokens "$DECODE_TOKENS" \
            --batch "$batch_csv" --runs 1 --json "$WORK/llama_$r.json" >&2 2>"$WORK/llama_$r.log"; then
            LLAMA_ERROR="llama_cpp_baseline.py failed: $(tail -n 3 "$WORK/llama_$r.log" | tr '\n' ' ')"
            say "$LLAMA_ERROR"
        fi
    fi
    if [[ -z "$TANDEM_ERROR" ]]; then
        for b in "${BATCHES[@]}"; do
            say "run $r/$RUNS: tandem batch $b"
            if ! "$TANDEM" generate --model smollm2 --prompt-ids "$PROMPT_IDS" \
                --max-tokens "$DECODE_TOKENS" --ignore-eos --temperature 0 \
                --threads "$THREADS" --batch "$b" --json \
                >"$WORK/tandem_b${b}_$r.json" 2>"$WORK/tandem_b${b}_$r.log"; then
                TANDEM_ERROR="tandem generate --batch $b failed: $(tail -n 3 "$WORK/tandem_b${b}_$r.log" | tr '\n' ' ')"
                say "$TANDEM_ERROR"
                break
            fi
        done
    fi
done

# --- Combine -----------------------------------------------------------------
mkdir -p "$(dirname "$OUT")"
export WORK RUNS THREADS OUT PROMPT_TOKENS DECODE_TOKENS TANDEM_ERROR LLAMA_ERROR LLAMA_CMD TANDEM_CMD
LOADAVG_AFTER="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || true)"
BATCHES_CSV="$batch_csv"
GGUF_NAME="$(basename "$GGUF")"
CPU_MODEL="$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)"
NPROC="$(nproc)"
KERNEL="$(uname -sr)"
DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
# GIT_OPTIONAL_LOCKS=0: a read-only status that never refreshes the index.
DIRTY="$(GIT_OPTIONAL_LOCKS=0 git status --porcelain --untracked-files=no 2>/dev/null || true)"
export BATCHES_CSV GGUF_NAME CPU_MODEL NPROC KERNEL DATE COMMIT DIRTY LOADAVG_BEFORE LOADAVG_AFTER
python3 - <<'PY'
import glob, json, os, statistics

env = os.environ
work, runs = env["WORK"], int(env["RUNS"])
batches = [int(b) for b in env["BATCHES_CSV"].split(",")]


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def median(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def agree_prefix(a, b):
    n = 0
    for x, y in zip(a or [], b or []):
        if x != y:
            break
        n += 1
    return n


# Tandem
tandem = None
if not env["TANDEM_ERROR"]:
    per_batch = {b: [load(f"{work}/tandem_b{b}_{r}.json") for r in range(1, runs + 1)] for b in batches}
    t = lambda o, k: (o or {}).get("timings", {}).get(k)
    tandem = {
        "command": env["TANDEM_CMD"],
        "prefill_tokens_per_second": median(t(o, "prefill_tokens_per_second") for o in per_batch[1]),
        "prefill_runs": [t(o, "prefill_tokens_per_second") for o in per_batch[1]],
    }
    for b in batches:
        tandem[f"decode_b{b}_tokens_per_second"] = median(t(o, "decode_tokens_per_second") for o in per_batch[b])
        tandem[f"decode_b{b}_runs"] = [t(o, "decode_tokens_per_second") for o in per_batch[b]]
    last_b1 = next((o for o in reversed(per_batch[1]) if o), {})
    tandem["generated_ids_b1"] = last_b1.get("generated_ids")
    tandem["text_b1"] = last_b1.get("text")
else:
    tandem = {"command": env["TANDEM_CMD"], "error": env["TANDEM_ERROR"]}

# llama.cpp
llama = None
runs_l = [o for o in (load(p) for p in sorted(glob.glob(f"{work}/llama_*.json"))) if o]
if runs_l and not env["LLAMA_ERROR"]:
    first = runs_l[0]
    llama = {
        "command": env["LLAMA_CMD"],
        "llama_cpp_python_version": first.get("llama_cpp_python_version"),
        "system_info": first.get("system_info"),
        "method": first.get("method"),
        "prefill_tokens_per_second": median(o["prefill_tokens_per_second"] for o in runs_l),
        "prefill_runs": [o["prefill_tokens_per_second"] for o in runs_l],
    }
    for b in batches:
        xs = [o["decode_tokens_per_second"].get(str(b)) for o in runs_l]
        llama[f"decode_b{b}_tokens_per_second"] = median(xs)
        llama[f"decode_b{b}_runs"] = xs
    llama["generated_ids_b1"] = runs_l[-1].get("generated_ids")
else:
    llama = {"command": env["LLAMA_CMD"], "error": env["LLAMA_ERROR"] or "no llama.cpp results"}

tok = lambda side, k: (side or {}).get(k)
ratios = {
    "prefill": ratio(tok(tandem, "prefill_tokens_per_second"), tok(llama, "prefill_tokens_per_second")),
    "decode_b1": ratio(tok(tandem, "decode_b1_tokens_per_second"), tok(llama, "decode_b1_tokens_per_second")),
    "decode_b16": ratio(tok(tandem, "decode_b16_tokens_per_second"), tok(llama, "decode_b16_tokens_per_second")),
    "b16_over_b1": ratio(tok(tandem, "decode_b16_tokens_per_second"), tok(tandem, "decode_b1_tokens_per_second")),
    "llama_cpp_b16_over_b1": ratio(tok(llama, "decode_b16_tokens_per_second"), tok(llama, "decode_b1_tokens_per_second")),
}
result = {
    "schema": "tandem-bench-engine/1",
    "model": f"smollm2 ({env['GGUF_NAME']})",
    "threads": int(env["THREADS"]),
    "runs": runs,
    "prompt_tokens": int(env["PROMPT_TOKENS"]),
    "decode_tokens": int(env["DECODE_TOKENS"]),
    "prompt_ids": "1000 + (i * 7919) % 40000 for i in 0..prompt_tokens",
    "machine": {
        "cpu": env["CPU_MODEL"], "nproc": int(env["NPROC"]), "kernel": env["KERNEL"],
        "date": env["DATE"], "commit": env["COMMIT"] + ("-dirty" if env["DIRTY"] else ""),
        "loadavg_before": env["LOADAVG_BEFORE"], "loadavg_after": env["LOADAVG_AFTER"],
    },
    "notes": "ratios are Tandem / llama.cpp tokens per second (above 1: Tandem is faster); "
    "b16_over_b1 is Tandem's batching gain; medians over runs, engines alternating",
    "greedy_agreement_b1": agree_prefix(tok(tandem, "generated_ids_b1"), tok(llama, "generated_ids_b1")),
    "tandem": tandem,
    "llama_cpp": llama,
    "ratios": ratios,
}
tmp = env["OUT"] + ".tmp"
with open(tmp, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
os.replace(tmp, env["OUT"])

fmt = lambda x: "n/a" if x is None else f"{x:10.1f}"
print(f"{'':24}{'tandem':>12}{'llama.cpp':>12}{'ratio':>9}")
for name, key, rk in [
    ("prefill 512 tok/s", "prefill_tokens_per_second", "prefill"),
    ("decode b1 tok/s", "decode_b1_tokens_per_second", "decode_b1"),
    ("decode b16 tok/s", "decode_b16_tokens_per_second", "decode_b16"),
]:
    r = ratios[rk]
    print(f"{name:24}{fmt(tok(tandem, key)):>12}{fmt(tok(llama, key)):>12}{'n/a' if r is None else f'{r:8.2f}x':>9}")
b = ratios["b16_over_b1"]
print(f"tandem b16/b1: {'n/a' if b is None else f'{b:.2f}x'}   results: {env['OUT']}")
PY
