#!/usr/bin/env bash
# Run the GitHub Actions recipe of docs/deployment.md ("Recipe (GitHub Actions)") the way a runner would:
# its `run:` steps, read from the document itself, in order, in a fresh checkout-like directory holding a
# tiny sample model (model.onnx), its calibration arrays (calib.npz) and a recorded baseline
# (ci/latency-baseline.json, made by the documented "record the baseline" command).
#
# Only what a CPU-only machine cannot do is changed, and printed: the GPU backend becomes ort-cpu, the
# prompt 2048 tokens becomes 32 and 20 repeats become 3; `pip install` is skipped (the environment under
# test is the one already installed) and actions/* steps are not run (the upload's paths must exist).
#
# usage: bash docs/ci_recipe_check.sh [WORKDIR]      (needs the [cpu,torch] extras; about a minute)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d "${TMPDIR:-/tmp}/espace-ci-recipe.XXXXXX")}"
mkdir -p "$work"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
cli=(python -m espace_export)   # this checkout's CLI, whatever espace-export is on PATH

# The steps, exactly as the document has them, with the CPU substitutions above.
python - "$repo/docs/deployment.md" "$work/steps.sh" <<'PY'
import re, sys
import yaml

text = open(sys.argv[1], encoding="utf-8").read()
section = text.split("### Recipe (GitHub Actions)", 1)[1]
block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
steps = yaml.safe_load(block)["jobs"]["latency"]["steps"]
cpu = [("--backend ort-cuda", "--backend ort-cpu"), ("--seq 2048", "--seq 32"), ("--repeats 20", "--repeats 5")]
lines = ["set -euo pipefail"]
for step in steps:
    if "uses" in step:
        paths = (step.get("with") or {}).get("path")
        if paths:  # the artifact upload: what it names must exist
            lines.append(f"echo '--- {step['uses']}: checking its paths'; ls -1 {paths}")
        continue
    command = " ".join(step["run"].split())
    if command.startswith("pip install"):
        lines.append(f"echo '--- skipped: {command}'")
        continue
    for gpu, cpu_only in cpu:
        command = command.replace(gpu, cpu_only)
    name = step.get("name", command.split()[1])
    # check exits 1 when a metric regressed: a legitimate verdict on a noisy machine, not a broken recipe
    ok = "0 1" if command.split()[:2] == ["espace-export", "check"] else "0"
    lines.append(f"echo '--- {name}: {command}'")
    lines.append(f"set +e; {command}; code=$?; set -e")
    lines.append(f'case " {ok} " in *" $code "*) ;; *) echo "step {name} failed with exit $code"; exit 1;; esac')
open(sys.argv[2], "w", encoding="utf-8").write("\n".join(lines) + "\n")
PY

cd "$work"
echo "--- workdir $work: sample model, calibration arrays, baseline"
python "$repo/samples/make_models.py" --arch llama --exporter torchscript --hidden 64 --intermediate 128 \
    --vocab 256 --layers 2 -o model.onnx >/dev/null
python -c "import numpy as np; np.savez('calib.npz', input_ids=np.random.default_rng(0).integers(0, 256, (16, 32)))"  # 4 batches: calibration, validation, held out
"${cli[@]}" compress model.onnx --ratio 0.5 --calib-data calib.npz -o baseline/model.espace.onnx -q
"${cli[@]}" profile model.onnx baseline/model.espace.onnx --backend ort-cpu --seq 32 --warmup 3 --repeats 3 \
    -o baseline/latency.json -q >/dev/null
mkdir -p ci && cp baseline/latency.json ci/latency-baseline.json   # the document's "record the baseline"
cp baseline/model.espace.onnx ci/accepted.espace.onnx               # ... and the model it measured

export GITHUB_STEP_SUMMARY="$work/step-summary.md"
: > "$GITHUB_STEP_SUMMARY"
espace-export() { "${cli[@]}" "$@"; }   # in the steps too
source "$work/steps.sh"
test -s build/model.espace.onnx && test -s build/latency.json && test -s "$GITHUB_STEP_SUMMARY"
echo "--- the recipe ran: build/ holds $(ls build | tr '\n' ' ')"
