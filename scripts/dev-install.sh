#!/usr/bin/env bash
# One-command development set-up: torch (pinned; see below), the pack with its test and CLI extras, and the
# Python requirements of every ComfyUI checkout the tests run against ($COMFYUI_PATHS, ':'-separated, else
# $COMFYUI_PATH (default ~/ComfyUI) and the ~/ComfyUI-* checkouts beside it, e.g. ~/ComfyUI-0.33).
# ComfyUI itself is not installed here: clone it (or `comfy install`) to those folders.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --no-input --disable-pip-version-check"

# torch/torchvision pinned so that pip never resolves a bare "torch" to another multi-GB build; torchaudio
# because ComfyUI v0.33's comfy/sd.py imports it (2.11 is the newest on PyPI and imports with torch 2.14).
$PIP install "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
$PIP install "torch==${TORCH_VERSION:-2.14.1}" "torchaudio==${TORCHAUDIO_VERSION:-2.11.1}"
$PIP install -e ".[test,cli,train]"

# oldest version first, so that where two versions pin a package differently the newest pin is kept
mapfile -t CHECKOUTS < <(python - <<'PY'
from dcgen_core.tools.headless import comfyui_paths, comfyui_version_at
def key(path):
    return tuple(int(p) if p.isdigit() else 0 for p in comfyui_version_at(path).split("."))
print("\n".join(sorted(comfyui_paths(), key=key)))
PY
)
if [ "${#CHECKOUTS[@]}" -eq 0 ]; then
    echo "note: no ComfyUI found (\$COMFYUI_PATHS / \$COMFYUI_PATH / ~/ComfyUI*); the ComfyUI tests will be skipped." >&2
fi
for checkout in "${CHECKOUTS[@]}"; do
    echo "ComfyUI requirements: $checkout"
    grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=~!].*)?$' "$checkout/requirements.txt" > /tmp/dcgen-comfyui-requirements.txt
    $PIP install -r /tmp/dcgen-comfyui-requirements.txt
done
