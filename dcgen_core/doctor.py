"""What a workflow needs, and whether this install has it.

    python -m dcgen_core.doctor [WORKFLOW ...] [--comfyui PATH] [--model-dir PATH]

Prints the ComfyUI version and path, the pack's version and whether it imported, the torch and
device facts that decide code paths, and for each workflow (default: the shipped ones) every
node type it uses that is not installed (with who provides it) and every model file it names:
found (where) or missing (the folder it belongs in, where it is published, and whether it sits
in another model folder). Exits 1 when anything is missing. The headless runner prints the same
summary when ComfyUI rejects a workflow.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import sys

from .headless import PACK_DIR, boot, comfyui_path, comfyui_version_at, model_dirs_under, workflow_to_prompt

#: widget -> model folder, for every loader the shipped workflows (and common core graphs) use
FILE_WIDGETS = {
    ("DCGenModelLoader", "unet_name"): "diffusion_models", ("UNETLoader", "unet_name"): "diffusion_models",
    ("DCGenNVFP4ModelLoader", "unet_name"): "diffusion_models", ("DCGenSanaModelLoader", "unet_name"): "diffusion_models",
    ("DCGenSanaTextEncoderLoader", "clip_name"): "text_encoders",
    ("DCGenDCAELoader", "vae_name"): "vae", ("VAELoader", "vae_name"): "vae",
    ("DCGenApplyAlignedEmbedding", "embedding_name"): "dcgen_embeddings",
    ("DCGenLoraLoader", "lora_name"): "loras", ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("LoraLoader", "lora_name"): "loras",
    ("DualCLIPLoader", "clip_name1"): "text_encoders", ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("CLIPLoader", "clip_name"): "text_encoders", ("ControlNetLoader", "control_net_name"): "controlnet",
    ("UpscaleModelLoader", "model_name"): "upscale_models", ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
}

MODEL_KINDS_FOR_SMOKE = sorted(set(FILE_WIDGETS.values()))

#: file name pattern -> where it is published (README, "Models")
PUBLISHED = [
    (r"nvfp4", "made once from the bf16 transformer: python -m dcgen_core.quantize IN OUT --format nvfp4 (README, "
     "4-bit models)"),
    (r"svdq-(int4|fp4)", "Hugging Face nunchaku-tech (e.g. nunchaku-flux.1-krea-dev: svdq-\\1_r32-flux.1-krea-dev"
     ".safetensors)"),
    (r"dcgen-.*(embedding|lora)", "made with the pack's post-training (no public file yet; see README, Models)"),
    (r"DC-Gen-FLUX\.1-Krea-Dev-v1\.0-Res(1|4)K", "Hugging Face nvidia/DC-Gen-FLUX.1-Krea-Dev, subfolder "
     "DC-Gen-FLUX.1-Krea-Dev-v1.0-Res\\1K (a diffusers pipeline folder: put it in models/diffusion_models and link "
     "it into models/vae)"),
    (r"^clip_l", "Hugging Face comfyanonymous/flux_text_encoders (clip_l.safetensors)"),
    (r"^t5xxl", "Hugging Face comfyanonymous/flux_text_encoders (t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn)"),
    (r"flux1?-krea", "Hugging Face black-forest-labs/FLUX.1-Krea-dev (flux1-krea-dev.safetensors)"),
    (r"flux1?-dev", "Hugging Face black-forest-labs/FLUX.1-dev (flux1-dev.safetensors)"),
    (r"^ae\.safetensors$", "Hugging Face black-forest-labs/FLUX.1-dev (ae.safetensors, the FLUX VAE)"),
    (r"controlnet", "a FLUX.1 ControlNet, e.g. Hugging Face InstantX/FLUX.1-dev-Controlnet-Canny"),
    (r"(?i)4x|upscal|esrgan", "any 4x upscale model ComfyUI reads (e.g. 4x-UltraSharp from OpenModelDB)"),
]

#: node type -> who provides it, for types a workflow may name that are not installed
PROVIDERS = {
    "EmptySD3LatentImage": "ComfyUI core (v0.2+)", "FluxGuidance": "ComfyUI core (v0.2+)",
    "UNETLoader": "ComfyUI core", "DualCLIPLoader": "ComfyUI core", "UpscaleModelLoader": "ComfyUI core",
    "ImageUpscaleWithModel": "ComfyUI core", "Canny": "ComfyUI core (comfy_extras/nodes_canny.py)",
    "ControlNetApplyAdvanced": "ComfyUI core", "ModelSamplingFlux": "ComfyUI core (v0.2+)",
    "SamplerCustomAdvanced": "ComfyUI core",
}


def _published(name: str) -> str:
    for pattern, source in PUBLISHED:
        m = re.search(pattern, name, re.IGNORECASE)
        if m:
            return m.expand(source)
    return "not known to this pack"


def _pack_version() -> str:
    try:
        with open(os.path.join(PACK_DIR, "pyproject.toml"), encoding="utf-8") as f:
            return re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M).group(1)
    except (OSError, AttributeError):
        return "unknown"


def device_facts() -> list[str]:
    """The torch/device facts that pick code paths (bf16, native NVFP4, nunchaku kernels)."""
    import torch

    lines = [f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else ", CPU build")]
    if not torch.cuda.is_available():
        lines.append("device: CPU (no CUDA device): fp32 compute; NVFP4 and SVDQuant files are dequantized per layer")
        return lines
    major, minor = torch.cuda.get_device_capability()
    sm = major * 10 + minor
    lines.append(f"device: {torch.cuda.get_device_name()} (sm {sm}), bf16 "
                 f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    from .nvfp4 import compute_path
    from .svdquant import nunchaku_supports

    kitchen = importlib.util.find_spec("comfy_kitchen") is not None
    lines.append(f"NVFP4 layers: {compute_path('cuda')}"
                 f"{'' if kitchen else ' (comfy-kitchen not installed: pip install comfy-kitchen)'}")
    nunchaku = importlib.util.find_spec("nunchaku") is not None
    kinds = (", ".join(k for k in ("int4", "fp4") if nunchaku_supports(k, sm))
             or "none on this GPU (int4: sm 75-89, fp4: sm 120/121)")
    lines.append(f"nunchaku SVDQuant kernels: {'installed' if nunchaku else 'not installed (optional)'}; "
                 f"formats this GPU runs: {kinds}")
    return lines


def _where_else(name: str, kind: str) -> list[str]:
    """Other model folders that hold ``name`` (a file or a diffusers folder)."""
    import folder_paths

    found = []
    for other in folder_paths.folder_names_and_paths:
        if other == kind:
            continue
        for base in folder_paths.get_folder_paths(other):
            path = os.path.join(base, name)
            if os.path.exists(path):
                found.append(f"models/{other} ({path})")
    return found


def check_workflow(workflow: dict, node_classes: dict) -> tuple[list[str], int]:
    """(report lines, number of problems) for one workflow (UI or API format)."""
    from . import comfy_paths

    lines, problems = [], 0
    nodes = workflow["nodes"] if "nodes" in workflow else [
        {"id": k, "type": v["class_type"]} for k, v in workflow.items()]
    missing_types = sorted({n["type"] for n in nodes if n["type"] not in node_classes
                            and n["type"] not in ("Note", "MarkdownNote")})
    for t in missing_types:
        problems += 1
        who = "ComfyUI-DC-Gen (this pack did not load; see above)" if t.startswith("DCGen") else \
            PROVIDERS.get(t, "a custom node pack (ComfyUI-Manager: Install Missing Custom Nodes)")
        lines.append(f"  MISSING node type {t}: provided by {who}")
    if "nodes" in workflow:
        known = {**workflow, "nodes": [n for n in workflow["nodes"] if n["type"] in node_classes
                                       or n["type"] in ("Note", "MarkdownNote")]}
        prompt = workflow_to_prompt(known, node_classes)
    else:
        prompt = {k: v for k, v in workflow.items() if v["class_type"] in node_classes}
    seen = set()
    for node_id, node in sorted(prompt.items(), key=lambda kv: str(kv[0])):
        for (cls, widget), kind in FILE_WIDGETS.items():
            name = node["inputs"].get(widget) if node["class_type"] == cls else None
            if not isinstance(name, str) or (kind, name) in seen:
                continue
            seen.add((kind, name))
            try:
                path = comfy_paths.full_path(kind, name)
                lines.append(f"  found   {kind}/{name}: {path}")
            except FileNotFoundError:
                problems += 1
                elsewhere = _where_else(name, kind)
                hint = f"; it is in {', '.join(elsewhere)}: move or link it to models/{kind}" if elsewhere else ""
                lines.append(f"  MISSING {kind}/{name} (node {node_id} {cls}): put it in models/{kind}; "
                             f"published: {_published(name)}{hint}")
    return lines, problems


def report(workflows: list[str], runtime=None) -> tuple[list[str], int]:
    lines = []
    path = runtime.path if runtime else comfyui_path()
    lines.append(f"ComfyUI {comfyui_version_at(path)} at {path}")
    pack = sys.modules.get("comfyui_dc_gen")
    status = f"imported, {len(pack.NODE_CLASS_MAPPINGS)} nodes" if pack else "NOT imported"
    lines.append(f"ComfyUI-DC-Gen {_pack_version()} at {PACK_DIR}: {status}")
    lines += device_facts()
    problems = 0 if pack else 1
    for wf_path in workflows:
        with open(wf_path, encoding="utf-8") as f:
            wf = json.load(f)
        wf_lines, n = check_workflow(wf, runtime.node_classes)
        problems += n
        lines.append(f"{os.path.basename(wf_path)}: {'OK' if n == 0 else f'{n} missing'}")
        lines += wf_lines
    return lines, problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workflows", nargs="*", help="workflow JSON files (default: the pack's workflows/)")
    ap.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH or ~/ComfyUI)")
    ap.add_argument("--model-dir", action="append", default=[], metavar="PATH",
                    help="extra model folder laid out like ComfyUI's models/")
    ap.add_argument("--smoke", action="store_true",
                    help="run every workflow on tiny random models in a temporary folder (nothing downloaded, "
                         "your model folders untouched): tells a broken install from missing weights")
    ap.add_argument("--gpu", action="store_true", help="with --smoke: run on the GPU (default: CPU)")
    a = ap.parse_args(argv)
    workflows = a.workflows or sorted(glob.glob(os.path.join(PACK_DIR, "workflows", "*.json")))
    try:
        runtime = boot(a.comfyui, cpu=not a.gpu, model_dirs=model_dirs_under(a.model_dir))
    except Exception as e:  # noqa: BLE001 (report what broke, not a traceback)
        print(f"ComfyUI at {a.comfyui or comfyui_path()}: could not start ({type(e).__name__}: {e})")
        return 1
    if a.smoke:
        from .smoke import run

        header, _ = report([], runtime)
        print("\n".join(header), flush=True)
        lines, failures = run(workflows, runtime)
        print("\n".join(lines))
        print(f"{failures} of {len(workflows)} workflow(s) failed" if failures else
              f"all {len(workflows)} workflows ran: this install works (real weights still needed: run without --smoke)")
        return 1 if failures else 0
    lines, problems = report(workflows, runtime)
    print("\n".join(lines))
    print(f"{problems} problem(s)" if problems else "everything the workflows name is here")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
