"""workflows/dcgen-qwen-image-edit.json: executed headless by ComfyUI on tiny models (the release in the Hub's nested
layout under the name the workflow gives it, a tiny DC-AE, a tiny stand-in for Qwen2.5-VL 7B behind core Load CLIP),
run by ``doctor --smoke``, and known to the doctor (its files, where to get them)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
import tiny_qwen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOW = os.path.join(REPO, "workflows", "dcgen-qwen-image-edit.json")


def _load():
    with open(WORKFLOW, encoding="utf-8") as f:
        return json.load(f)


def _widget(wf, type_, index):
    return [n["widgets_values"][index] for n in wf["nodes"] if n["type"] == type_][0]


@pytest.fixture
def input_dir(tmp_path):
    import folder_paths

    before = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path))
    yield str(tmp_path)
    folder_paths.set_input_directory(before)


def test_workflow_runs_headless(comfyui, input_dir):
    """Load Image (320x224) -> DC-Gen Qwen-Image-Edit Encode (authors' resize: 1216x832) -> KSampler (2 steps, cfg
    3.5) -> VAE Decode -> Save Image: the saved image has the reference's size floored to multiples of 64."""
    from dcgen_core.tools.smoke_qwen import tiny_qwen_clip_loader
    from dcgen_core.tools.workflows import workflow_to_prompt

    wf = _load()
    d = comfyui.dirs
    transformer, vae = tiny_qwen.tiny_qwen_transformer(seed=8), tiny.tiny_dcae()
    tiny_qwen.save_release(transformer, vae, os.path.join(d["diffusion_models"],
                                                          _widget(wf, "DCGenQwenEditModelLoader", 0)))
    tiny.save_dcae_folder(vae, os.path.join(d["vae"], _widget(wf, "DCGenDCAELoader", 0)))
    from safetensors.torch import save_file

    save_file({"unused": torch.zeros(1)}, os.path.join(d["text_encoders"], _widget(wf, "CLIPLoader", 0)))
    Image.fromarray(tiny_qwen.test_image(320, 224)).save(os.path.join(input_dir, _widget(wf, "LoadImage", 0)))
    comfyui.runtime.register({"DCGenTestQwenCLIPLoader": tiny_qwen_clip_loader()})
    prompt = workflow_to_prompt(wf, comfyui.runtime.node_classes)
    for node in prompt.values():
        if node["class_type"] == "CLIPLoader":
            node["class_type"] = "DCGenTestQwenCLIPLoader"
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
    comfyui.runtime.executor.reset()
    outputs = comfyui.runtime.run(prompt)
    saved = [img for out in outputs.values() for img in out.get("images", [])]
    assert len(saved) == 1
    path = os.path.join(comfyui.output, saved[0].get("subfolder", ""), saved[0]["filename"])
    img = np.asarray(Image.open(path))
    assert img.shape == (832, 1216, 3)  # calculate_dimensions(1024^2, 320/224) = 1216x864, floored to 64
    assert img.std() > 1.0  # an image, not a flat fill


def test_doctor_knows_the_workflow_files(comfyui):
    """Every file the workflow names is a file the doctor checks, and it can say where each is published."""
    from dcgen_core.tools.workflows import _published, workflow_needs

    lines, files = workflow_needs(_load(), comfyui.runtime.node_classes)
    assert not lines, lines  # every node type is installed
    named = {(kind, name) for kind, name, _, _ in files}
    assert named == {("vae", "DC-Qwen-Image-Edit-vae"), ("diffusion_models", "DC-Qwen-Image-Edit"),
                     ("text_encoders", "qwen_2.5_vl_7b_fp8_scaled.safetensors")}
    where = {name: _published(name, kind) for kind, name in named}
    assert "nvidia/DC-Qwen-Image-Edit --local-dir" in where["DC-Qwen-Image-Edit"], where
    assert "DC-Gen-Qwen-Image-Edit/vae" in where["DC-Qwen-Image-Edit-vae"], where
    assert "Comfy-Org/Qwen-Image_ComfyUI" in where["qwen_2.5_vl_7b_fp8_scaled.safetensors"], where


def test_doctor_smoke_runs_the_workflow(comfyui):
    out = subprocess.run([sys.executable, "-m", "dcgen_core.doctor", "--smoke", WORKFLOW], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "OK   dcgen-qwen-image-edit.json:" in out.stdout, out.stdout + out.stderr[-3000:]
