#!/usr/bin/env bash
# Best effort: the real LLM clients for tests/end_to_end/test_llm_clients.py, each in its own venv under DIR (they pin other
# transformers versions than the project), and tiny llama/qwen2/phi3/gpt2 exports made with them (also read by
# tests/end_to_end/test_llm_graphs.py; mistral, llama's graph with a sliding window, is left to local runs). Prints the
# variables the tests read (KEY=VALUE lines on stdout) for what worked; says on stderr what did not. Never fails:
# a missing client makes its tests skip with the reason.
#   optimum-onnx 0.1.0 needs transformers < 4.58: installed into its venv, shadowing the project's (>= 5).
#   onnxruntime-genai 0.18.0's builder needs transformers >= 5: its venv sees the project's.
# Both venvs use --system-site-packages, so torch, onnx and onnxruntime come from the project's environment.
# Measured on 2 shared cores: ~45 s + ~20 s of pip, ~90 s of export; the tests it enables ~90-170 s (clients)
# and ~40 s (the six optimum exports in tests/end_to_end/test_llm_graphs.py). phi3 (fused qkv_proj/gate_up_proj) adds
# ~37 s of export (optimum 21 s, genai 16 s) and ~50 s of tests (measured at load 7 on 2 cores).
set -uo pipefail
dir="${1:?usage: llm_clients.sh DIR}"
cd "$(dirname "$0")/.."
mkdir -p "$dir"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=60 PYTHONPATH=
say() { echo "llm clients: $*" >&2; }

venv() {  # venv NAME PACKAGES...: create DIR/NAME once and install PACKAGES into it (10 minutes at most)
    local name="$1"
    shift
    { [ -x "$dir/$name/bin/python" ] || python -m venv --system-site-packages "$dir/$name"; } &&
        timeout 600 "$dir/$name/bin/pip" install -q "$@" >&2
}

fixtures="$dir/fixtures"
if venv optimum "optimum-onnx==0.1.0" "transformers<4.58"; then
    if { [ -d "$fixtures/gpt2-merged" ] && [ -d "$fixtures/phi3-merged" ]; } ||
        timeout 600 python samples/export_llm_fixtures.py --venv "$dir/optimum" -o "$fixtures" \
            --family llama --family qwen2 --family phi3 --family gpt2 >&2 2>&1; then
        echo "ESPACE_LLM_FIXTURES=$fixtures"
        echo "ESPACE_OPTIMUM_PYTHON=$dir/optimum/bin/python"
    else
        say "optimum export failed: client tests skip"
        exit 0
    fi
else
    say "pip could not install optimum-onnx 0.1.0: client tests skip"
    exit 0
fi
genai_export() {  # genai_export FAMILY: the builder's fp32 folder of FAMILY, once
    [ -d "$fixtures/$1-genai-fp32" ] ||
        timeout 600 "$dir/genai/bin/python" -m onnxruntime_genai.models.builder -i "$fixtures/$1-hf" \
            -o "$fixtures/$1-genai-fp32" -p fp32 -e cpu -c "$dir/genai-cache" >/dev/null 2>&1
}
if venv genai "onnxruntime-genai==0.18.0"; then
    if genai_export llama; then
        echo "ESPACE_GENAI_PYTHON=$dir/genai/bin/python"
        genai_export phi3 || say "onnxruntime-genai builder failed on phi3: its test skips"
    else
        say "onnxruntime-genai builder failed (it needs transformers >= 5 in the project's environment): its test skips"
    fi
else
    say "pip could not install onnxruntime-genai 0.18.0: its test skips"
fi
