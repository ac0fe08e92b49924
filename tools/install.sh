#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv/ and install the pinned
# OpenMMLab stack plus mmdelta (editable). Idempotent: a second run only checks.
#
# Why mmcv is special
#   mmcv 2.1.0 (the newest release that mmdet 3.3 / mmseg 1.2 accept, `mmcv<2.2`) ships no
#   wheel for torch >= 2.2, so it is compiled from its sdist with its C++ ops
#   (MMCV_WITH_OPS=1): about 12 minutes on 2 cores. Two traps:
#   * torch 2.14's headers require C++20, mmcv's setup.py passes -std=c++17 (for cxx and
#     nvcc): we rewrite the flag to -std=c++20 before building.
#   * mmcv's setup.py (and mmengine 0.10.7) import pkg_resources: setuptools<81.
#   pip's own wheel cache does not key on the torch version, so a wheel built against
#   another torch would be silently reused and crash (or worse) at import. We therefore keep
#   the built wheel in our own cache, outside the repo, under
#     ${MMDELTA_CACHE:-${XDG_CACHE_HOME:-~/.cache}/mmdelta}/mmcv/<key>/
#   keyed on the torch version, the Python ABI tag and whether CUDA ops were compiled.
#   A fresh clone on the same machine (what CI does) then installs in about a minute.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
MMCV_VERSION=2.1.0
STAMP="$VENV/.mmdelta-installed"
REQ_HASH="$(cat "$ROOT/requirements.txt" "$ROOT/setup.py" "$ROOT/pyproject.toml" "$0" | sha256sum | cut -c1-16)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$REQ_HASH" ]] && "$PY" -c "import mmcv.ops, mmdet, mmseg, mmpretrain, mmdelta" 2>/dev/null; then
  exit 0  # already installed and up to date
fi

log() { echo "[install +${SECONDS}s] $*" >&2; }

if [[ ! -x "$PY" ]]; then
  log "creating $VENV"
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
# --no-compile: byte-compiling torch's thousands of modules at install time doubles the
# install (Python compiles what is imported, once, on first use instead).
PIP=("$PY" -m pip --disable-pip-version-check)
INSTALL=("${PIP[@]}" install -q --no-compile)

log "installing torch, torchvision and the pinned stack"
"${INSTALL[@]}" "setuptools<81" wheel ninja -r "$ROOT/requirements.txt"

# ---- mmcv with compiled ops, from our torch-keyed wheel cache -------------------------
# one interpreter start (importing torch the first time is slow): torch version, ABI, CUDA
read -r TORCH_VER ABI HAS_CUDA < <("$PY" -c 'import sys, torch
print(torch.__version__.replace("+", "_"), f"cp{sys.version_info[0]}{sys.version_info[1]}",
      int(torch.cuda.is_available()))')
[[ -n "${HAS_CUDA:-}" ]] || { log "torch failed to import in $VENV"; exit 1; }
if [[ "$HAS_CUDA" == 1 ]] && command -v nvcc >/dev/null 2>&1; then
  FORCE_CUDA="${FORCE_CUDA:-1}"
else
  FORCE_CUDA="${FORCE_CUDA:-0}"
fi
OPS=$([[ "$FORCE_CUDA" == 1 ]] && echo cuda || echo cpu)
KEY="mmcv-$MMCV_VERSION-torch$TORCH_VER-$ABI-$OPS"
CACHE_ROOT="${MMDELTA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mmdelta}"
WHEEL_DIR="$CACHE_ROOT/mmcv/$KEY"
MMCV_MARK="$VENV/.mmcv-key"  # which cached build this venv holds

if [[ "$(cat "$MMCV_MARK" 2>/dev/null)" != "$KEY" ]]; then
  if ! ls "$WHEEL_DIR"/mmcv-*.whl >/dev/null 2>&1; then
    log "building mmcv $MMCV_VERSION with $OPS ops against torch $TORCH_VER ($ABI); 12-30 min on 2 cores"
    BUILD="$(mktemp -d)"
    trap 'rm -rf "$BUILD"' EXIT
    "${PIP[@]}" download -q --no-deps --no-build-isolation --no-binary :all: "mmcv==$MMCV_VERSION" -d "$BUILD"
    tar -xzf "$BUILD"/mmcv-"$MMCV_VERSION".tar.gz -C "$BUILD"
    SRC="$BUILD/mmcv-$MMCV_VERSION"
    sed -i 's/-std=c++17/-std=c++20/g' "$SRC/setup.py"  # cxx and nvcc flags alike
    grep -q -- '-std=c++20' "$SRC/setup.py" || { log "could not patch mmcv setup.py for C++20"; exit 1; }
    mkdir -p "$BUILD/out"
    (cd "$SRC" && MMCV_WITH_OPS=1 FORCE_CUDA="$FORCE_CUDA" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "$PY" -m pip wheel -q --no-deps --no-build-isolation . -w "$BUILD/out")
    mkdir -p "$WHEEL_DIR"
    # publish atomically: copy then rename, so an interrupted build never leaves a partial wheel
    whl="$(ls "$BUILD"/out/mmcv-*.whl)"
    cp "$whl" "$WHEEL_DIR/.tmp-$(basename "$whl")"
    mv "$WHEEL_DIR/.tmp-$(basename "$whl")" "$WHEEL_DIR/$(basename "$whl")"
  fi
  log "installing mmcv from $WHEEL_DIR"
  # the wheel goes in without deps (they would re-resolve torch); its runtime deps explicitly
  "${INSTALL[@]}" --no-deps --force-reinstall "$WHEEL_DIR"/mmcv-*.whl
  "${INSTALL[@]}" addict numpy packaging Pillow pyyaml yapf opencv-python
  echo "$KEY" > "$MMCV_MARK"
fi

log "installing mmdelta (editable)"
"${INSTALL[@]}" --no-deps --no-build-isolation -e "$ROOT"
log "checking the stack"
# the check that matters: mmcv's compiled ops run against this torch, everything imports
"$PY" -c "import torch, mmcv.ops, mmdet, mmseg, mmpretrain, mmdelta
mmcv.ops.nms(torch.tensor([[0., 0., 1., 1.]]), torch.tensor([1.]), 0.5)" \
  || { log "mmcv ops or the stack failed to import; remove $MMCV_MARK (and $WHEEL_DIR if the build is bad) and rerun"; exit 1; }
echo "$REQ_HASH" > "$STAMP"
log "done in ${SECONDS} s"
