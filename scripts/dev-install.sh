#!/usr/bin/env bash
# One-command development set-up: torch (CPU-capable build), the pack with its test and CLI
# extras, and the Python requirements of the ComfyUI checkout at $COMFYUI_PATH (default ~/ComfyUI).
# ComfyUI itself is not installed here: clone it (or `comfy install`) to $COMFYUI_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --no-input --disable-pip-version-check"
COMFYUI_PATH="${COMFYUI_PATH:-$HOME/ComfyUI}"

$PIP install "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
$PIP install -e ".[test,cli]"
if [ -f "$COMFYUI_PATH/requirements.txt" ]; then
    # torch/torchvision are pinned above; torchaudio only serves ComfyUI's audio nodes
    grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=~!].*)?$' "$COMFYUI_PATH/requirements.txt" > /tmp/comfyui-requirements.txt
    $PIP install -r /tmp/comfyui-requirements.txt
else
    echo "note: no ComfyUI at $COMFYUI_PATH; the ComfyUI tests will be skipped (set COMFYUI_PATH)." >&2
fi
