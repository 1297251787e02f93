"""The headless runner (python -m dcgen_core.headless): Cancel / Ctrl-C stops a run between steps, as the
server's Cancel does, and progress is printed per step."""

import json
import os
import signal
import subprocess
import sys

import pytest

import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prompt(models, key, steps):
    return {
        "vae": {"class_type": "DCGenDCAELoader", "inputs": {"vae_name": models.vae, "variant": "auto"}},
        "model": {"class_type": "DCGenModelLoader", "inputs": {"unet_name": models.dcgen, "weight_dtype": "default"}},
        "latent": {"class_type": "DCGenEmptyLatent",
                   "inputs": {"vae": ["vae", 0], "width": 128, "height": 128, "batch_size": 1}},
        "text": {"class_type": "TestPromptEmbeds", "inputs": {"key": key}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "seed": 1, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["text", 0], "negative": ["text", 0], "latent_image": ["latent", 0],
            "denoise": 1.0}},
        "capture": {"class_type": "TestCapture", "inputs": {"key": key, "latent": ["sampler", 0]}},
    }


def test_interrupt_stops_between_steps(comfyui, comfy_models):
    headless = sys.modules["dcgen_core.tools.headless"]
    comfyui.test_nodes.EMBEDDINGS["cancel"] = tiny.prompt_embeddings()
    seen = []

    def cancel_after_first(node_id, step, total):
        seen.append((node_id, step, total))
        if len(seen) == 1:
            comfyui.runtime.interrupt()

    headless.progress_listeners.append(cancel_after_first)
    try:
        with pytest.raises(headless.Interrupted, match=r"interrupted in node sampler \(KSampler\)"):
            comfyui.runtime.run(_prompt(comfy_models, "cancel", 8))
    finally:
        headless.progress_listeners.remove(cancel_after_first)
    assert seen and seen[-1][2] == 8 and len(seen) < 8
    # the next run is not interrupted
    comfyui.runtime.run(_prompt(comfy_models, "cancel", 2))
    assert comfyui.test_nodes.CAPTURED["cancel"]["latent"]["samples"].shape == (1, 32, 4, 4)


_CLI = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from dcgen_core.tools import headless
runtime = headless.boot(cpu=True)
import comfy_test_nodes, tiny
runtime.register(comfy_test_nodes.NODE_CLASS_MAPPINGS)
comfy_test_nodes.EMBEDDINGS["cli"] = tiny.prompt_embeddings()
sys.exit(headless.main({argv!r}))
"""


def test_cli_prints_progress_and_ctrl_c_cancels(comfyui, comfy_models, tmp_path):
    """The runner's main(): per-step progress on stderr; SIGINT after the first step cancels at the next one and
    exits 130 with 'cancelled', like Cancel in the editor."""
    prompt = _prompt(comfy_models, "cli", 400)
    path = tmp_path / "prompt.json"
    path.write_text(json.dumps(prompt))
    argv = [str(path), "--model-dir", os.path.dirname(comfyui.dirs["vae"]), "--output-dir", str(tmp_path / "out")]
    script = _CLI.format(repo=REPO, tests=os.path.join(REPO, "tests"), argv=argv)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "KSampler #sampler: 1/400" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=300)[1]
    assert any("KSampler #sampler: 1/400" in line for line in lines), "".join(lines)[-2000:]
    assert proc.returncode == 130, rest[-2000:]
    assert "cancelled: interrupted in node sampler (KSampler)" in rest


def test_a_pack_inside_custom_nodes_finds_its_comfyui(tmp_path):
    from dcgen_core.tools.headless import enclosing_comfyui

    comfy = tmp_path / "ComfyUI"
    (comfy / "comfy").mkdir(parents=True)
    (comfy / "nodes.py").write_text("")
    pack = comfy / "custom_nodes" / "ComfyUI-DC-Gen"
    pack.mkdir(parents=True)
    assert enclosing_comfyui(str(pack)) == str(comfy)
    assert enclosing_comfyui(str(tmp_path / "elsewhere" / "ComfyUI-DC-Gen")) is None
