#!/bin/sh
# build_ort_aarch64.sh - build an onnxruntime-training 1.19.2 wheel for 64-bit ARM Linux.
#
# YOU PROBABLY DO NOT NEED THIS. Raspberry Pi, Jetson and other aarch64 profiles train with the
# portable engine on plain onnxruntime, whose aarch64 wheels are on PyPI and in every aarch64
# image. This recipe is only for the "ort-training" engine on ARM (--set training.engine=ort-training);
# flash copies it into an image only then.
#
# WHY: PyPI publishes onnxruntime-training 1.19.2 wheels for x86_64 Linux only. The ort-training
# engine on an aarch64 board needs a wheel built from source, once per OS/Python combination;
# install.sh then takes it with --ort-wheel FILE.
#
# STATUS: NOT TESTED ON HARDWARE OR IN AN ARM CONTAINER. The steps follow onnxruntime's build
# documentation and its tools/ci_build/build.py and setup.py; nobody has run this script to the
# end on a real board yet. Expect to adjust it; please report what you had to change.
#
# WHERE TO RUN IT (the wheel must match the device's OS, glibc and Python):
#   a) natively on the board (Raspberry Pi 4/5 with 4 GB+ RAM, Jetson Orin Nano 8 GB), or
#   b) in an arm64 container of the device's OS, e.g. on an x86_64 machine with qemu:
#        docker run --rm -it --platform linux/arm64 -v "$PWD:/out" debian:bookworm bash
#        # inside: apt-get update && apt-get install -y git ... (step 1 below), then run this script
#      Emulated builds are very slow (many hours); an arm64 cloud VM or a Pi 5 is faster.
#   Not on a Pi Zero 2 W (512 MB RAM): build on a bigger aarch64 machine with the same OS.
#
# STEP BY STEP (what this script does):
#   1. Prerequisites (Debian 12 / Raspberry Pi OS bookworm; Ubuntu 22.04 needs python3.11 from
#      elsewhere, e.g. the deadsnakes PPA):
#        sudo apt-get install -y build-essential git ca-certificates python3.11 python3.11-venv python3.11-dev
#      Python 3.11 matters: the wheel is built for the Python that runs the build, and the
#      device image's other wheels are for CPython 3.11. glibc: the wheel needs at least the
#      glibc of the machine it was built on, so build on the device's OS release, not a newer one.
#   2. A build venv with a recent CMake from PyPI (distribution CMake is often older than
#      onnxruntime 1.19 accepts), plus numpy, packaging, wheel and setuptools for the Python binding.
#   3. A shallow clone of tag v1.19.2 with submodules.
#   4. ./build.sh --config Release --build_wheel --parallel N --skip_tests --enable_training
#      (CPU only: no --use_cuda). About the training flag: onnxruntime's docs name
#      --enable_training_apis for on-device training, but its setup.py packages the Python
#      `onnxruntime.training.api` module only for --enable_training, and a maintainer noted that
#      --enable_training_apis "currently fails to build the python wheel"
#      (github.com/microsoft/onnxruntime/issues/16650). PyPI's onnxruntime-training wheels are
#      built with --enable_training, a superset. So this script uses --enable_training by
#      default; pass --apis-only to try --enable_training_apis (smaller, but see above).
#      N (parallel jobs) defaults to one per 2 GB of RAM: each C++ job can take 1-2 GB.
#   5. Checks that the wheel holds onnxruntime/training/api (what fleetlearn's trainer calls)
#      and copies it to OUT_DIR (default: the current directory). Expected name:
#      onnxruntime_training-1.19.2+cpu-cp311-cp311-linux_aarch64.whl
#   6. On the device: sudo ./install.sh --ort-wheel /path/to/that.whl
#
# JETSON AND CUDA: fleetlearn's trainer runs ORT on the CPU, so a CUDA build buys nothing today
# and costs hours. If you want one anyway (Jetson Orin with JetPack 6), add
#   --use_cuda --cuda_home /usr/local/cuda --cudnn_home /usr/lib/aarch64-linux-gnu
#   --cmake_extra_defines CMAKE_CUDA_ARCHITECTURES=87
# via EXTRA_BUILD_ARGS. Unverified: whether 1.19.2 builds against JetPack 6's cuDNN, and the
# wheel's name (build.py adds a "gpu" suffix for CUDA builds), which install.sh checks.
# The original Jetson Nano (Maxwell, CUDA 10.2 at most) cannot use ORT 1.19's CUDA provider.
#
# usage: ./build_ort_aarch64.sh [--out DIR] [--jobs N] [--workdir DIR] [--python PYTHON] [--apis-only]
#        EXTRA_BUILD_ARGS="..." ./build_ort_aarch64.sh      # more build.py flags
set -eu

ORT_VERSION=1.19.2
OUT_DIR=$(pwd)
WORKDIR=${TMPDIR:-/tmp}/ort-build
PYTHON=python3.11
JOBS=''
TRAINING_FLAG=--enable_training

die() { echo "build_ort_aarch64.sh: error: $*" >&2; exit 1; }
say() { echo "build_ort_aarch64.sh: $*"; }

while [ $# -gt 0 ]; do
    case $1 in
        --out) OUT_DIR=$2; shift 2 ;;
        --jobs) JOBS=$2; shift 2 ;;
        --workdir) WORKDIR=$2; shift 2 ;;
        --python) PYTHON=$2; shift 2 ;;
        --apis-only) TRAINING_FLAG=--enable_training_apis; shift ;;
        -h|--help) sed -n '2,60p' "$0"; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

[ "$(uname -m)" = aarch64 ] || die "run this on aarch64 (natively or in an arm64 container); this machine is $(uname -m)"
command -v git >/dev/null 2>&1 || die "git not found: apt-get install -y git"
command -v c++ >/dev/null 2>&1 || die "no C++ compiler: apt-get install -y build-essential"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install Python 3.11 (apt-get install -y python3.11 python3.11-venv python3.11-dev)"
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
    || say "warning: $PYTHON is not Python 3.11; the wheel will not match the image's cp311 wheels"
mkdir -p "$OUT_DIR" "$WORKDIR"
OUT_DIR=$(CDPATH='' cd -- "$OUT_DIR" && pwd)

if [ -z "$JOBS" ]; then
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    JOBS=$(( mem_kb / 2097152 ))
    cpus=$(nproc)
    [ "$JOBS" -ge 1 ] || JOBS=1
    [ "$JOBS" -le "$cpus" ] || JOBS=$cpus
fi
free_gb=$(df -Pk "$WORKDIR" | awk 'NR==2 {print int($4 / 1048576)}')
[ "$free_gb" -ge 15 ] || say "warning: only ${free_gb} GB free in $WORKDIR; a build needs roughly 15 GB (estimate)"
say "building onnxruntime $ORT_VERSION ($TRAINING_FLAG) with $JOBS parallel jobs in $WORKDIR"

# 2. build venv
"$PYTHON" -m venv "$WORKDIR/venv"
. "$WORKDIR/venv/bin/activate"
pip install --upgrade pip
pip install cmake numpy packaging wheel setuptools

# 3. source
if [ ! -d "$WORKDIR/onnxruntime/.git" ]; then
    git clone --depth 1 --branch "v$ORT_VERSION" --recursive --shallow-submodules \
        https://github.com/microsoft/onnxruntime.git "$WORKDIR/onnxruntime"
fi
cd "$WORKDIR/onnxruntime"

# 4. build (python3 here is the venv's Python 3.11, which build.sh uses for the wheel)
# shellcheck disable=SC2086  # EXTRA_BUILD_ARGS is a list of flags on purpose
./build.sh \
    --config Release \
    --build_wheel \
    --parallel "$JOBS" \
    --skip_tests \
    "$TRAINING_FLAG" \
    --allow_running_as_root \
    --compile_no_warning_as_error \
    --skip_submodule_sync \
    --cmake_extra_defines onnxruntime_BUILD_UNIT_TESTS=OFF \
    ${EXTRA_BUILD_ARGS:-}

# 5. check and copy
wheel=$(ls build/Linux/Release/dist/onnxruntime_training-*.whl 2>/dev/null | head -n 1 || true)
[ -n "$wheel" ] || die "no onnxruntime_training wheel in build/Linux/Release/dist (look at the build output above: $(ls build/Linux/Release/dist 2>/dev/null))"
python3 -c "import sys, zipfile; names = zipfile.ZipFile(sys.argv[1]).namelist(); sys.exit(not any(n.startswith('onnxruntime/training/api/') for n in names))" "$wheel" \
    || die "$wheel lacks onnxruntime/training/api, which fleetlearn needs (built with $TRAINING_FLAG; use --enable_training)"
cp "$wheel" "$OUT_DIR/"
say "wrote $OUT_DIR/$(basename "$wheel")"
say "on the device: sudo ./install.sh --ort-wheel $(basename "$wheel")"
