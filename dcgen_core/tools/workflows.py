"""What a workflow needs: the UI workflow as an API prompt, the model file each loader widget names (the folder it
belongs in, where it is published, whether it sits in another folder) and the node types that are not installed.
Shared by the doctor, the smoke run and the headless runner."""

from __future__ import annotations

import os
import re


#: widget -> model folder, for every loader the shipped workflows (and common core graphs) use
FILE_WIDGETS = {
    ("DCGenModelLoader", "unet_name"): "diffusion_models", ("UNETLoader", "unet_name"): "diffusion_models",
    ("DCGenNVFP4ModelLoader", "unet_name"): "diffusion_models", ("DCGenSanaModelLoader", "unet_name"): "diffusion_models",
    ("DCGenSanaTextEncoderLoader", "clip_name"): "text_encoders",
    ("DCGenQwenEditModelLoader", "unet_name"): "diffusion_models",
    ("DCGenWanModelLoader", "unet_name"): "diffusion_models", ("DCGenDCAEVLoader", "vae_name"): "vae",
    ("DCGenDCAELoader", "vae_name"): "vae", ("VAELoader", "vae_name"): "vae",
    ("DCGenApplyAlignedEmbedding", "embedding_name"): "dcgen_embeddings",
    ("DCGenLoraLoader", "lora_name"): "loras", ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("LoraLoader", "lora_name"): "loras",
    ("DualCLIPLoader", "clip_name1"): "text_encoders", ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("CLIPLoader", "clip_name"): "text_encoders", ("ControlNetLoader", "control_net_name"): "controlnet",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("UpscaleModelLoader", "model_name"): "upscale_models", ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
}

MODEL_KINDS_FOR_SMOKE = sorted(set(FILE_WIDGETS.values()))

#: file name pattern -> where it is published, for names the model table (tools/models.py) does not list
PUBLISHED = [
    (r"nvfp4", "made once from the bf16 transformer: python -m dcgen_core.quantize IN OUT --format nvfp4 (docs/4bit.md)"),
    (r"svdq-(int4|fp4)", "Hugging Face nunchaku-tech (e.g. nunchaku-flux.1-krea-dev: svdq-\\1_r32-flux.1-krea-dev"
     ".safetensors)"),
    (r"dcgen-.*(embedding|lora)", "made with the pack's extract or post-training (no public file yet; see docs/training.md)"),
    (r"DC-Gen-FLUX\.1-Krea-Dev-v1\.0-Res(1|4)K", "Hugging Face nvidia/DC-Gen-FLUX.1-Krea-Dev, subfolder "
     "DC-Gen-FLUX.1-Krea-Dev-v1.0-Res\\1K (a diffusers pipeline folder: put it in models/diffusion_models and link "
     "it into models/vae)"),
    (r"^clip_l", "Hugging Face comfyanonymous/flux_text_encoders (clip_l.safetensors)"),
    (r"^t5xxl", "Hugging Face comfyanonymous/flux_text_encoders (t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn)"),
    (r"flux1?-krea", "Hugging Face black-forest-labs/FLUX.1-Krea-dev (flux1-krea-dev.safetensors)"),
    (r"flux1?-dev", "Hugging Face black-forest-labs/FLUX.1-dev (flux1-dev.safetensors)"),
    (r"^ae\.safetensors$", "Hugging Face black-forest-labs/FLUX.1-dev (ae.safetensors, the FLUX VAE)"),
    (r"controlnet", "a FLUX.1 ControlNet, e.g. Hugging Face InstantX/FLUX.1-dev-Controlnet-Canny"),
    (r"dc-ae-v-f32t4c32", "Hugging Face nvidia/DC-VideoGen-Wan2.1-14B (dc-ae-v-f32t4c32-1.0-bf16.pt; "
     "python -m dcgen_core.convert writes the safetensors copy)"),
    (r"DC-VideoGen-Wan2\.1-14B|transformer_(t2v|i2v)", "Hugging Face nvidia/DC-VideoGen-Wan2.1-14B (transformer_t2v/, "
     "transformer_i2v/ and scheduler/: hf download nvidia/DC-VideoGen-Wan2.1-14B --local-dir "
     "models/diffusion_models/DC-VideoGen-Wan2.1-14B)"),
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


def _published(name: str, kind: str = "") -> str:
    """Where to get a file: the pack's model table (tools/models.py) first, then the name patterns above."""
    from .models import lookup

    entry = lookup(kind, name)
    if entry is not None:
        return entry.source
    for pattern, source in PUBLISHED:
        m = re.search(pattern, name, re.IGNORECASE)
        if m:
            return m.expand(source)
    return "not known to this pack"


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
    lines, files = workflow_needs(workflow, node_classes)
    problems = len(lines)
    for kind, name, node_id, cls in files:
        line, missing = file_status(kind, name, f"node {node_id} {cls}")
        problems += missing
        lines.append(line)
    return lines, problems


def workflow_needs(workflow: dict, node_classes: dict) -> tuple[list[str], list[tuple[str, str, str, str]]]:
    """(a line per node type that is not installed, the model files the workflow names: prompt_files)."""
    lines = []
    nodes = workflow["nodes"] if "nodes" in workflow else [
        {"id": k, "type": v["class_type"]} for k, v in workflow.items()]
    missing_types = sorted({n["type"] for n in nodes if n["type"] not in node_classes
                            and n["type"] not in ("Note", "MarkdownNote")})
    for t in missing_types:
        who = "ComfyUI-DC-Gen (this pack did not load; see above)" if t.startswith("DCGen") else \
            PROVIDERS.get(t, "a custom node pack (ComfyUI-Manager: Install Missing Custom Nodes)")
        lines.append(f"  MISSING node type {t}: provided by {who}")
    if "nodes" in workflow:
        known = {**workflow, "nodes": [n for n in workflow["nodes"] if n["type"] in node_classes
                                       or n["type"] in ("Note", "MarkdownNote")]}
        prompt = workflow_to_prompt(known, node_classes)
    else:
        prompt = {k: v for k, v in workflow.items() if v["class_type"] in node_classes}
    return lines, prompt_files(prompt)


def prompt_files(prompt: dict) -> list[tuple[str, str, str, str]]:
    """(model folder, name, node id, node type) of every model file an API prompt names, each file once."""
    out, seen = [], set()
    for node_id, node in sorted(prompt.items(), key=lambda kv: str(kv[0])):
        for (cls, widget), kind in FILE_WIDGETS.items():
            name = node["inputs"].get(widget) if node["class_type"] == cls else None
            if isinstance(name, str) and (kind, name) not in seen:
                seen.add((kind, name))
                out.append((kind, name, str(node_id), cls))
    return out


def file_status(kind: str, name: str, needed_by: str) -> tuple[str, int]:
    """One report line for a model file (found where, or missing: where it belongs and where to get it), and 1 if
    it is missing."""
    from ..shared import comfy_paths

    try:
        return f"  found   {kind}/{name}: {comfy_paths.full_path(kind, name)}", 0
    except FileNotFoundError:
        elsewhere = _where_else(name, kind)
        hint = f"; it is in {', '.join(elsewhere)}: move or link it to models/{kind}" if elsewhere else ""
        return (f"  MISSING {kind}/{name} ({needed_by}): put it in models/{kind}; "
                f"get it: {_published(name, kind)}{hint}"), 1


_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, (list, tuple)) or kind in _WIDGET_TYPES


def _has_control_widget(name: str, spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(opts.get("control_after_generate")) or (spec[0] == "INT" and name in ("seed", "noise_seed"))


def workflow_to_prompt(workflow: dict, node_classes: dict) -> dict:
    """Convert a UI-format workflow (what the editor saves) to an API prompt."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in ("Note", "MarkdownNote"):
            continue
        cls = node_classes.get(node["type"])
        if cls is None:
            raise KeyError(f"workflow node {node['id']}: unknown node type '{node['type']}'")
        types = cls.INPUT_TYPES()
        specs = {**types.get("required", {}), **types.get("optional", {})}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, spec in specs.items():
            if not _is_widget(spec):
                continue
            if not values:
                break
            inputs[name] = values.pop(0)
            if _has_control_widget(name, spec) and values:
                values.pop(0)
        for inp in node.get("inputs", []):
            link_id = inp.get("link")
            if link_id is not None:
                link = links[link_id]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
