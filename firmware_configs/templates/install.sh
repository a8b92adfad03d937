#!/bin/sh
# install.sh - install the fleetlearn device agent from this image onto this machine.
#
# Rendered by `fleetlearn flash` for device '@@device_id@@' (profile @@profile@@); README.md beside
# this file says what it does and docs/flashing.md in the fleetlearn repository says why.
# POSIX sh on purpose: Raspberry Pi OS and Debian run /bin/sh as dash.
#
#   sudo ./install.sh [--prefix DIR] [--ort-wheel FILE] [--python PYTHON] [--no-systemd] [--no-trim]
set -eu

DEVICE_ID='@@device_id@@'
ARCH='@@arch@@'
PY_VERSION='@@python@@'
FLASHED_PREFIX='@@prefix@@'
ENGINE='@@engine@@'                   # portable | ort-training: what requirements.txt installs
NEEDS_ORT_WHEEL=@@needs_ort_wheel@@             # 1: ort-training where PyPI has no onnxruntime-training (--ort-wheel)
DEPS_IN_IMAGE=@@deps_in_image@@               # 1: wheels/ holds every dependency (offline install)
FLEETLEARN_WHEEL='@@fleetlearn_wheel@@'
SERVICE=fleetlearn-device.service
SERVICE_USER=fleetlearn

IMAGE_DIR=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
PREFIX=$FLASHED_PREFIX
ORT_WHEEL=''
SYSTEMD=1
TRIM=1
PYTHON=python3

# Files the service user must read (venv, config, bundle) must not inherit a caller's umask 077.
umask 022

die() { echo "install.sh: error: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

usage() {
    cat <<EOF
usage: ./install.sh [--prefix DIR] [--ort-wheel FILE] [--python PYTHON] [--no-systemd] [--no-trim]

Installs the fleetlearn device agent for device '$DEVICE_ID' into DIR (default $FLASHED_PREFIX):
a Python virtual environment in DIR/venv, the model bundle in DIR/bundle/current, the config
DIR/device.toml and the secrets in DIR/secrets; then, when run as root on a systemd machine
(and without --no-systemd), creates the user '$SERVICE_USER' and enables $SERVICE.

  --prefix DIR      install somewhere else (paths in device.toml and the unit are rewritten)
  --ort-wheel FILE  engine ort-training off x86_64 only: an onnxruntime-training 1.19.2 wheel
                    (build_ort_aarch64.sh is an untested recipe for one)
  --python PYTHON   the Python $PY_VERSION interpreter to build the venv with (default python3)
  --no-systemd      do not create the user or install the unit; print how to start by hand
  --no-trim         keep pip, setuptools and onnxruntime's C library in the venv (see step 5)
EOF
}

while [ $# -gt 0 ]; do
    case $1 in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --ort-wheel) [ $# -ge 2 ] || die "--ort-wheel needs a file"; ORT_WHEEL=$2; shift 2 ;;
        --ort-wheel=*) ORT_WHEEL=${1#*=}; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PYTHON=$2; shift 2 ;;
        --python=*) PYTHON=${1#*=}; shift ;;
        --no-systemd) SYSTEMD=0; shift ;;
        --no-trim) TRIM=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option '$1' (see ./install.sh --help)" ;;
    esac
done

case $PREFIX in
    /*) ;;
    *) PREFIX=$(pwd)/$PREFIX ;;
esac
PREFIX=${PREFIX%/}
# The prefix is written into device.toml and the systemd unit: keep it free of quotes and spaces.
case $PREFIX in
    ''|*[!A-Za-z0-9._/-]*) die "--prefix '$PREFIX': use an absolute path of letters, digits, '.', '_', '-' and '/'" ;;
esac

# 1. The image arrived intact (an SD card or a flaky copy can truncate a 100 MB wheel).
if command -v sha256sum >/dev/null 2>&1; then
    (cd "$IMAGE_DIR" && sha256sum --check --quiet --strict SHA256SUMS) \
        || die "image files fail their SHA256SUMS check: copy the image to the device again"
else
    say "warning: sha256sum not found, not checking the image's SHA256SUMS"
fi

# 2. This machine fits the image.
machine=$(uname -m)
[ "$machine" = "$ARCH" ] || die "this image is for $ARCH but this machine is $machine: flash again with a profile for this board"
command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found: install Python $PY_VERSION (README.md says how) or pass --python"
pyv=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$pyv" = "$PY_VERSION" ] || die "'$PYTHON' is Python $pyv but this image's wheels are for Python $PY_VERSION: pass --python python$PY_VERSION"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
    || die "'$PYTHON' cannot create virtual environments: install its venv module (Debian/Ubuntu: apt-get install python$PY_VERSION-venv)"

# 3. The training engine's runtime. portable: plain onnxruntime from wheels/ (or the index).
#    ort-training: onnxruntime-training from wheels/, PyPI (x86_64) or --ort-wheel (elsewhere).
if [ -n "$ORT_WHEEL" ]; then
    [ "$ENGINE" = ort-training ] \
        || die "--ort-wheel: this image uses the $ENGINE engine (plain onnxruntime), which needs no onnxruntime-training wheel"
    [ -f "$ORT_WHEEL" ] || die "--ort-wheel '$ORT_WHEEL': no such file"
    case $(basename -- "$ORT_WHEEL") in
        onnxruntime_training-1.19.2-*.whl|onnxruntime_training-1.19.2+*.whl) ;;
        *) die "--ort-wheel '$ORT_WHEEL': expected onnxruntime_training-1.19.2[+cpu]-cp311-...whl (what build_ort_aarch64.sh writes)" ;;
    esac
    ORT_WHEEL=$(CDPATH='' cd -- "$(dirname -- "$ORT_WHEEL")" && pwd)/$(basename -- "$ORT_WHEEL")
elif [ "$NEEDS_ORT_WHEEL" = 1 ]; then
    die "onnxruntime-training 1.19.2 is not on PyPI for $ARCH: flash again with the portable engine (--set training.engine=portable), or build a wheel with ./build_ort_aarch64.sh (untested; takes hours) and run ./install.sh --ort-wheel FILE"
fi

# 4. Decide about systemd before touching anything, and stop a running agent before its venv is replaced.
USE_SYSTEMD=0
if [ "$SYSTEMD" = 0 ]; then
    why="--no-systemd"
elif [ "$(id -u)" != 0 ]; then
    why="not running as root"
elif ! command -v systemctl >/dev/null 2>&1; then
    why="no systemctl on this machine"
elif [ ! -d /run/systemd/system ]; then
    why="systemd is not running here (no /run/systemd/system)"
else
    USE_SYSTEMD=1
    systemctl stop "$SERVICE" 2>/dev/null || true
fi

# 5. A fresh virtual environment with the agent and the edge extra only (no torch, no onnx export).
say "creating $PREFIX/venv with $PYTHON (Python $pyv)"
mkdir -p "$PREFIX" 2>/dev/null || die "cannot create $PREFIX: run as root (sudo ./install.sh) or pass --prefix DIR"
"$PYTHON" -m venv --clear "$PREFIX/venv"
VPY=$PREFIX/venv/bin/python
set -- install --disable-pip-version-check --no-input
if [ "$DEPS_IN_IMAGE" = 1 ]; then
    set -- "$@" --no-index --find-links "$IMAGE_DIR/wheels"
else
    say "this image holds no dependency wheels: installing them from the package index"
    set -- "$@" --find-links "$IMAGE_DIR/wheels"
fi
if [ -n "$ORT_WHEEL" ]; then
    set -- "$@" --find-links "$(dirname -- "$ORT_WHEEL")" "$ORT_WHEEL"
fi
# requirements.txt was resolved by `fleetlearn flash` for this board's architecture and engine.
"$VPY" -m pip "$@" "$IMAGE_DIR/wheels/$FLEETLEARN_WHEEL" -r "$IMAGE_DIR/requirements.txt" \
    || die "pip could not install the agent into $PREFIX/venv (see pip's message above)"
# The engine opens the image's bundle on this machine: the whole runtime loads, not just imports.
check_engine() {
    "$VPY" - "$IMAGE_DIR/bundle" "$ENGINE" <<'PY'
import sys
import numpy, paho.mqtt.client  # noqa: F401
from fleetlearn.edge_runtime.core.bundle import load_bundle
from fleetlearn.edge_runtime.engines.select import open_engine
engine = open_engine(sys.argv[1], load_bundle(sys.argv[1]), sys.argv[2], threads=1)
import onnxruntime  # after open_engine: for ort-training it first keeps onnxruntime from probing for torch
print(engine.name, onnxruntime.__version__)
PY
}
checked=$(check_engine) || die "the agent's engine does not load on this machine (see the error above)"
say "installed the agent with the ${checked% *} engine (onnxruntime ${checked#* })"

# 5b. Trim what the agent never uses, so a small board keeps its SD card for data (--no-trim
#     keeps everything): pip and setuptools (this script recreates the venv on every run;
#     `venv/bin/python -m ensurepip` brings pip back), and onnxruntime's C-API library
#     libonnxruntime.so (about 27 MB on aarch64; it is for C/C++ programs, the Python binding has
#     the runtime built in), and numpy's own test suites (numpy/**/tests, never imported at run
#     time). The library is moved aside first and kept if the engine then fails.
if [ "$TRIM" = 1 ]; then
    "$VPY" -m pip uninstall --disable-pip-version-check -y -q pip setuptools >/dev/null 2>&1 \
        || say "note: could not remove pip and setuptools from the venv (harmless)"
    numpy_dir=$("$VPY" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("numpy").origin))')
    find "$numpy_dir" -depth -type d -name tests -exec rm -rf {} + 2>/dev/null || true
    capi=$("$VPY" -c 'import importlib.util, os; s = importlib.util.find_spec("onnxruntime"); print(os.path.join(os.path.dirname(s.origin), "capi"))')
    aside=$PREFIX/.trim-aside
    rm -rf "$aside" && mkdir -p "$aside"
    for lib in "$capi"/libonnxruntime.so*; do
        [ -f "$lib" ] && mv "$lib" "$aside/"
    done
    if [ -z "$(ls -A "$aside")" ]; then
        trimmed="pip, setuptools, numpy's tests"
    elif check_engine >/dev/null 2>&1; then
        trimmed="pip, setuptools, numpy's tests, onnxruntime's C library"
    else
        mv "$aside"/* "$capi/"
        trimmed="pip, setuptools, numpy's tests (onnxruntime's engine needs its C library here: kept)"
    fi
    rm -rf "$aside"
    say "trimmed from the venv: $trimmed (--no-trim keeps them)"
fi

# 6. Rewrite paths if installing somewhere other than the flashed prefix, then check the config.
rewrite() {
    "$VPY" - "$FLASHED_PREFIX" "$PREFIX" "$1" "$2" <<'PY'
import re, sys
old, new, src, dst = sys.argv[1:]
text = open(src, encoding="utf-8").read()
if old != new:
    # Only whole path prefixes: "/opt/fleetlearn/x" and "/opt/fleetlearn", never "/opt/fleetlearn2".
    text = re.sub(r"(?<![A-Za-z0-9._/-])" + re.escape(old) + r"(?=[/\"'\s]|$)", new, text, flags=re.M)
open(dst, "w", encoding="utf-8").write(text)
PY
}
rewrite "$IMAGE_DIR/device.toml" "$PREFIX/device.toml"
rewrite "$IMAGE_DIR/$SERVICE" "$PREFIX/$SERVICE"
cp "$IMAGE_DIR/README.md" "$PREFIX/README.md"
paths=$("$VPY" -c 'import sys
from fleetlearn.edge_runtime.device.config import load_device_config
c = load_device_config(sys.argv[1])
print(c.state_dir); print(c.data)' "$PREFIX/device.toml") || die "$PREFIX/device.toml does not load (see above)"
STATE_DIR=$(echo "$paths" | sed -n 1p)
DATA=$(echo "$paths" | sed -n 2p)

# 7. The bundle, swapped in whole: the agent replaces PREFIX/bundle/current the same way over the air.
mkdir -p "$PREFIX/bundle"
rm -rf "$PREFIX/bundle/.current.install" "$PREFIX/bundle/.current.old"
cp -R "$IMAGE_DIR/bundle" "$PREFIX/bundle/.current.install"
if [ -e "$PREFIX/bundle/current" ]; then
    mv "$PREFIX/bundle/current" "$PREFIX/bundle/.current.old"
fi
mv "$PREFIX/bundle/.current.install" "$PREFIX/bundle/current"
rm -rf "$PREFIX/bundle/.current.old"

# 8. Secrets: readable by the service user only.
if [ -d "$IMAGE_DIR/secrets" ]; then
    old_umask=$(umask)
    umask 077
    mkdir -p "$PREFIX/secrets"
    chmod 700 "$PREFIX/secrets"
    for f in "$IMAGE_DIR"/secrets/*; do
        [ -f "$f" ] || continue
        cp "$f" "$PREFIX/secrets/"
        chmod 600 "$PREFIX/secrets/$(basename -- "$f")"
    done
    umask "$old_umask"
fi

# 9. State directory (outside the prefix by default: it survives a reinstall).
mkdir -p "$STATE_DIR" 2>/dev/null \
    || die "cannot create state_dir $STATE_DIR: run as root, or flash again with --set state_dir=DIR"
case $DATA in
    "$PREFIX"/*) mkdir -p "$(dirname -- "$DATA")" ;;  # a place to put the data; elsewhere it is the owner's
esac
[ -e "$DATA" ] || say "note: no training data at $DATA yet; put this device's data there (NPZ with x and y, or CSV)"

# 10. systemd: a system user, ownership of what the agent writes, the unit, enabled and started.
if [ "$USE_SYSTEMD" = 1 ]; then
    if ! getent passwd "$SERVICE_USER" >/dev/null 2>&1; then
        command -v useradd >/dev/null 2>&1 || die "useradd not found: create a system user '$SERVICE_USER' by hand and run again"
        nologin=$(command -v nologin || echo /usr/sbin/nologin)
        useradd --system --user-group --home-dir /nonexistent --no-create-home --shell "$nologin" "$SERVICE_USER"
        say "created system user $SERVICE_USER"
    fi
    chown -R "$SERVICE_USER:$SERVICE_USER" "$STATE_DIR" "$PREFIX/bundle"
    [ -d "$PREFIX/secrets" ] && chown -R "$SERVICE_USER:$SERVICE_USER" "$PREFIX/secrets"
    install -m 644 "$PREFIX/$SERVICE" "/etc/systemd/system/$SERVICE"
    systemctl daemon-reload
    systemctl enable "$SERVICE"
    systemctl restart "$SERVICE"
    say "installed and started $SERVICE; follow it with: journalctl -u $SERVICE -f"
else
    # Containers and chroots have no systemd: everything else is installed, only the unit is not.
    say "skipped the systemd unit ($why); it is in $PREFIX/$SERVICE for a machine that has systemd"
    say "start the agent with: $PREFIX/venv/bin/fleetlearn device --config $PREFIX/device.toml"
fi
say "done: device $DEVICE_ID installed in $PREFIX"
