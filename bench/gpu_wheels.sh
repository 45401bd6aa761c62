#!/usr/bin/env bash
# Downloads, on this (networked) machine, what bench/gpu_check.sh installs on a bare GPU machine that has only its own
# python3 (torch with CUDA 13, triton, numpy, pillow, pyyaml, safetensors, fsspec, pyarrow, scikit-image, pytest...)
# and no network: DeepSpeed's sdist (built there, against that torch: a wheel built here would record the CPU as its
# accelerator), DALI's CUDA 13 wheel and their missing needs, for CPython 3.12 on x86-64.
#
#   bash bench/gpu_wheels.sh            # -> .whl/c1 .. .whl/cN, each under 50 MB (a call carries 64 MiB with the working tree)
#
# Files over 48 MB (DALI, nvImageCodec, nvCOMP) are split into parts that gpu_check.sh joins again. The folders go to
# the GPU machine one per call while it stays warm (each call's carry is kept for the next), the last with the check:
#   run("true", carry=[".whl/c1"]) ... run("true", carry=[".whl/cN-1"]),
#   run("bash bench/gpu_check.sh", carry=[".whl/cN"], timeout_s=600)
# .whl/ is ignored by git (.gitignore).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DL=.whl/download
rm -rf .whl && mkdir -p "$DL"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
wheels() {  # binary wheels for the GPU machine's CPython 3.12, no dependency resolution (the list is complete)
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DL" "$@"
}
# DALI 2.4 for CUDA 13 and what its METADATA requires that the image lacks.
wheels nvidia-dali-cuda130==2.4.0 "nvidia-nvimgcodec-cu13[all]>=0.9,<0.10" nvidia-libnvcomp-cu13==5.3.0.16 \
  astunparse==1.6.3 gast==0.6.0 optree makefun "libcst~=1.8" nvtx
# nvImageCodec's [all] extra: its JPEG (CUDA 13's nvJPEG), JPEG 2000 and TIFF libraries.
wheels nvidia-nvjpeg nvidia-nvjpeg2k-cu13 "nvidia-nvtiff-cu13>=0.8"
# DeepSpeed's needs the image lacks (it has ninja, py-cpuinfo, msgpack, einops, nvidia-ml-py, psutil, packaging, tqdm).
# pydantic with its own dependencies: pydantic-core's version is pinned by pydantic's.
wheels hjson
"$PY" -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d "$DL" "pydantic>=2,<3"
rm -f "$DL"/typing_extensions-*  # the image's own is used: one version of each package
"$PY" -m pip download --quiet --no-deps --no-binary=:all: -d "$DL" deepspeed==0.19.8

# Pack into folders of at most 50 MB; split the large files first.
cd .whl
for f in download/*; do
  if [ "$(stat -c %s "$f")" -gt $((48 << 20)) ]; then
    split -b 48M -d "$f" "$f.part-" && rm "$f"
  fi
done
n=1 size=0
mkdir -p "c$n"
for f in $(ls -S download); do
  s=$(stat -c %s "download/$f")
  if [ $((size + s)) -gt $((50 << 20)) ]; then n=$((n + 1)) size=0; mkdir -p "c$n"; fi
  mv "download/$f" "c$n/" && size=$((size + s))
done
rmdir download
du -sh c* | sed 's/^/carry /'
echo "$n folders: carry .whl/c1 .. .whl/c$n in that many calls, the last with bash bench/gpu_check.sh"
