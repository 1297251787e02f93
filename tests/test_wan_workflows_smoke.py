"""`python -m dcgen_core.doctor --smoke` knows the DC-Gen-Wan video workflows: it writes tiny random DC-Gen-Wan
transformer folders (diffusers keys, scheduler/ beside), a tiny DC-AE-V in the authors' .pt form, and stands in for
UMT5-XXL and CLIP ViT-H/14; each workflow runs through ComfyUI's executor and saves one WEBM."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAN = ("dcgen-wan-t2v.json", "dcgen-wan-i2v.json")


def test_smoke_runs_the_wan_workflows(comfyui):
    from dcgen_core.tools.headless import comfyui_path

    paths = [os.path.join(REPO, "workflows", n) for n in WAN]
    out = subprocess.run([sys.executable, "-m", "dcgen_core.doctor", "--smoke", "--comfyui", comfyui_path(), *paths],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    for name in WAN:
        assert f"OK   {name}:" in out.stdout and "1 video(s) saved" in out.stdout.split(f"OK   {name}:")[1].split(
            "\n")[0], out.stdout


def test_doctor_names_where_each_wan_file_is_published(comfyui):
    """The doctor's file check lists every file the Wan workflows name, each with a published source."""
    import json

    from dcgen_core.tools.models import lookup
    from dcgen_core.tools.workflows import _published, workflow_needs

    named = set()
    for name in WAN:
        with open(os.path.join(REPO, "workflows", name), encoding="utf-8") as f:
            lines, files = workflow_needs(json.load(f), comfyui.runtime.node_classes)
        assert not lines, lines  # every node type is installed on this ComfyUI
        named.update((kind, file) for kind, file, _, _ in files)
        for kind, file, _, _ in files:
            source = _published(file, kind)
            assert lookup(kind, file) is not None and any(
                repo in source for repo in ("nvidia/DC-VideoGen-Wan2.1-14B", "Comfy-Org/Wan_2.1_ComfyUI_repackaged")), \
                (kind, file, source)
    assert named == {("vae", "dc-ae-v-f32t4c32-1.0-bf16.pt"),
                     ("diffusion_models", "DC-VideoGen-Wan2.1-14B/transformer_t2v"),
                     ("diffusion_models", "DC-VideoGen-Wan2.1-14B/transformer_i2v"),
                     ("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
                     ("clip_vision", "clip_vision_h.safetensors")}
