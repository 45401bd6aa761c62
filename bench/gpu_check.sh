#!/usr/bin/env bash
# The GPU acceptance run: on a fresh H100 / H200 machine with only its own python3 (torch with CUDA, no DALI, no
# DeepSpeed, no network), one command installs what bench/gpu_wheels.sh downloaded, runs the GPU tests and the
# benchmarks, and writes every figure to $OUT/gpu_check.json (and each step's log beside it). About 8 minutes.
#
#   bash bench/gpu_wheels.sh                      # here, once: .whl/c1 .. .whl/cN (see that script for the calls)
#   bash bench/gpu_check.sh                       # there, in the last call, with OUT set by the device tool
#   bash bench/gpu_check.sh --dry-run             # here: .venv's python, no install; what needs CUDA skips or is
#                                                 #   shrunk to a CPU smoke run; the same JSON layout in out/gpu_check
# Goals (issue 13, one H100/H200): CAN ViT-L >= 50% MFU (~1,150 images/s), data wait < 3% with the real loader,
# SimCLR/CAN step time >= 1.6 at ViT-L, DALI >= 2,500 two-view images/s; gpu_check.json's "goals" says which hold.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
start=$(date +%s)
step() {  # step NAME TIMEOUT_S COMMAND...: run it, log to $OUT/NAME.log, record its status and duration
  local name=$1 limit=$2 t0
  shift 2
  t0=$(date +%s)
  echo "== $name ($(($(date +%s) - start)) s in)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "{\"step\": \"$name\", \"rc\": $?, \"seconds\": $(($(date +%s) - t0))}" >>"$OUT/steps.jsonl"
  tail -n 3 "$OUT/$name.log"
}
rm -f "$OUT/steps.jsonl"

if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-.venv/bin/python}
  export PYTHONPATH=$PWD
  TRAIN=(--preset vit_tiny --img-size 32 --patch-size 4 --batch 4 --decoder-dim 64 --decoder-depth 1
         --decoder-heads 2 --steps 1 --warmup 1 --loader)
  PIPE=(--images 64 --batch 16 --passes 1 --local)
else
  PY=python3
  install() {
    rm -rf /tmp/wheels /tmp/site && mkdir -p /tmp/wheels
    cp .whl/c*/* /tmp/wheels/
    for first in /tmp/wheels/*.part-00; do  # the files bench/gpu_wheels.sh split to fit a call's carry
      [ -e "$first" ] || continue
      cat "${first%.part-00}".part-* >"${first%.part-00}" && rm "${first%.part-00}".part-*
    done
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/wheels/*.whl &&
      PYTHONPATH=/tmp/site DS_BUILD_OPS=0 DS_ACCELERATOR=cuda $PY -m pip install -q --no-index --no-deps \
        --no-build-isolation --no-cache-dir --target /tmp/site /tmp/wheels/deepspeed-*.tar.gz
  }
  step install 300 install
  export PYTHONPATH=/tmp/site:$PWD
  TRAIN=(--loader)
  PIPE=(--images 2048 --batch 256 --passes 3 --local)
fi
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=$(nproc)

step environment 60 $PY -c "
import json, torch, platform
info = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,
        'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}
for name in ('deepspeed', 'nvidia.dali'):
    try:
        info[name] = __import__(name, fromlist=['x']).__version__
    except Exception as e:
        info[name] = f'missing: {e!r}'
json.dump(info, open('$OUT/environment.json', 'w'))
print(info)"
# The GPU tests (they skip, saying why, without CUDA) and the CPU tests of the same production paths.
step tests 240 $PY -m pytest -q -p no:cacheprovider --junitxml "$OUT/tests.xml" tests/pipeline/test_gpu.py \
  tests/jobs/test_gpu_step.py tests/model/test_vit.py tests/model/test_precision.py \
  tests/jobs/test_launch.py
# CAN and SimCLR, ViT-B and ViT-L, bf16 (DeepSpeed), ZeRO 2, compiled blocks, synthetic and the real loader.
step train 360 $PY -m bench.train "${TRAIN[@]}" --out "$OUT/train.json"
# DALI on the GPU vs Pillow + DataLoader, the whole loader on local shards, DALI's own webdataset reader.
step pipeline 180 $PY -m bench.pipeline "${PIPE[@]}" --json "$OUT/pipeline.json"

$PY - "$OUT" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET

out = sys.argv[1]
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None

report = {"environment": load("environment.json"),
          "steps": [json.loads(line) for line in open(os.path.join(out, "steps.jsonl"))],
          "train": load("train.json"), "pipeline": load("pipeline.json")}
if os.path.exists(os.path.join(out, "tests.xml")):
    suite = ET.parse(os.path.join(out, "tests.xml")).getroot().find("testsuite")
    cases = suite.findall("testcase")
    report["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {
        "failed": [c.get("classname") + "::" + c.get("name") for c in cases if c.find("failure") is not None
                   or c.find("error") is not None]}
goals = {}
train = report["train"] or {}
rows = [r for r in train.get("results", []) if "step_s" in r]
can_large = [r for r in rows if r["recipe"] == "can" and r["preset"] == "vit_large"]
for r in can_large:
    if r["source"] == "synthetic" and r["mfu"] is not None:
        goals["can_vit_large_mfu>=0.5"] = {"value": r["mfu"], "images_per_s": r["images_per_s_per_device"],
                                            "met": r["mfu"] >= 0.5}
    if r["source"] == "loader":
        goals["data_wait<0.03"] = {"value": r["data_wait_share"], "met": r["data_wait_share"] < 0.03}
for ratio in train.get("ratios", []):
    if ratio["preset"] == "vit_large" and ratio["source"] == "synthetic":
        goals["simclr_over_can_step_time>=1.6"] = {"value": ratio["simclr_over_can_step_time"],
                                                   "met": ratio["simclr_over_can_step_time"] >= 1.6}
pipe = report["pipeline"] or {}
if "two_view_images_per_s" in pipe and pipe.get("device") == "cuda":
    dali = pipe["two_view_images_per_s"]["dali"]
    goals["dali_two_view>=2500"] = {"value": dali, "met": dali >= 2500}
report["goals"] = goals
json.dump(report, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
print(json.dumps({"tests": report.get("tests"), "goals": goals, "steps": report["steps"]}, indent=1))
EOF
echo "== done in $(($(date +%s) - start)) s: $OUT/gpu_check.json"
