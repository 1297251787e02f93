"""python -m dcgen_core.doctor: what a workflow needs, found or missing, and where it belongs."""

import json
import os
import subprocess
import sys

import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _workflow(unet, vae, extra_type=None):
    nodes = [
        {"id": 1, "type": "DCGenDCAELoader", "inputs": [], "outputs": [], "widgets_values": [vae, "auto"]},
        {"id": 2, "type": "DCGenModelLoader", "inputs": [], "outputs": [], "widgets_values": [unet, "default"]},
    ]
    if extra_type:
        nodes.append({"id": 3, "type": extra_type, "inputs": [], "outputs": [], "widgets_values": []})
    return {"nodes": nodes, "links": []}


def test_found_missing_and_wrong_folder(comfyui, comfy_models, tiny_vae):
    from dcgen_core.tools import doctor

    # a DC-AE put into diffusion_models by mistake
    tiny.save_dcae_folder(tiny_vae, os.path.join(comfyui.dirs["diffusion_models"], "dc-ae-misplaced"))
    wf = _workflow(comfy_models.dcgen, "dc-ae-misplaced", extra_type="SomePackNode")
    lines, problems = doctor.check_workflow(wf, comfyui.runtime.node_classes)
    text = "\n".join(lines)
    assert problems == 2
    assert f"found   diffusion_models/{comfy_models.dcgen}" in text
    assert "MISSING vae/dc-ae-misplaced" in text and "it is in models/diffusion_models" in text
    assert "move or link it to models/vae" in text
    assert "MISSING node type SomePackNode: provided by a custom node pack" in text
    # a core node this ComfyUI lacks: say which core version brings it
    wf = _workflow(comfy_models.dcgen, comfy_models.vae, "FluxGuidance")
    lines, problems = doctor.check_workflow(wf, {k: v for k, v in comfyui.runtime.node_classes.items()
                                                 if k != "FluxGuidance"})
    assert problems == 1 and "MISSING node type FluxGuidance: provided by ComfyUI core (v0.2+)" in "\n".join(lines)


def test_cli_reports_and_exits_nonzero_when_missing(comfyui, comfy_models, tmp_path):
    models_root = os.path.dirname(comfyui.dirs["vae"])
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps(_workflow(comfy_models.dcgen, comfy_models.vae)))
    missing = tmp_path / "missing.json"
    # a name no other test writes into the shared model folders (the workflow tests place the shipped names)
    missing.write_text(json.dumps(_workflow("DC-Gen-FLUX.1-Krea-Dev-v1.0-Res1K-not-downloaded/transformer",
                                            comfy_models.vae)))
    run = [sys.executable, "-m", "dcgen_core.doctor", "--model-dir", models_root]
    good = subprocess.run(run + [str(ok)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stdout + good.stderr[-2000:]
    assert "ComfyUI-DC-Gen" in good.stdout and "imported" in good.stdout and "torch" in good.stdout
    assert "ok.json: OK" in good.stdout
    bad = subprocess.run(run + [str(missing)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert "MISSING diffusion_models/DC-Gen-FLUX.1-Krea-Dev-v1.0-Res1K-not-downloaded/transformer" in bad.stdout
    assert "nvidia/DC-Gen-FLUX.1-Krea-Dev" in bad.stdout


def test_headless_runner_prints_the_summary_on_validation_failure(comfyui, comfy_models, tmp_path):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(_workflow("nothing-here.safetensors", comfy_models.vae)))
    out = subprocess.run([sys.executable, "-m", "dcgen_core.headless", str(wf), "--model-dir",
                          os.path.dirname(comfyui.dirs["vae"])], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert "ComfyUI cannot run this workflow here" in out.stderr
    assert "MISSING diffusion_models/nothing-here.safetensors" in out.stderr
    assert "not in []" not in out.stderr and '"node_errors"' not in out.stderr


def test_smoke_runs_workflows_on_tiny_models_and_reports_failures(comfyui, tmp_path):
    """--smoke: tiny random models in a temporary folder (removed afterwards), each workflow through ComfyUI's
    executor, one OK/FAIL line per workflow with its time; a workflow that cannot run fails the exit code.
    (All shipped workflows: tests/test_workflows.py runs them on tiny models with more checks.)"""
    import tempfile

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"nodes": [{"id": 1, "type": "NodeFromAnotherPack", "inputs": [], "outputs": [],
                                             "widgets_values": []}], "links": []}))
    shipped = [os.path.join(REPO, "workflows", n) for n in ("dcgen-flux-1k-t2i.json", "dcgen-flux-4k-t2i.json")]
    before = set(os.listdir(tempfile.gettempdir()))
    out = subprocess.run([sys.executable, "-m", "dcgen_core.doctor", "--smoke", *shipped], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "OK   dcgen-flux-1k-t2i.json:" in out.stdout and "OK   dcgen-flux-4k-t2i.json:" in out.stdout
    assert "this install works" in out.stdout
    assert not [d for d in set(os.listdir(tempfile.gettempdir())) - before if d.startswith("dcgen-smoke-")]
    bad = subprocess.run([sys.executable, "-m", "dcgen_core.doctor", "--smoke", str(broken)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and "FAIL broken.json" in bad.stdout and "NodeFromAnotherPack" in bad.stdout
