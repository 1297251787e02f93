"""The shipped workflows: valid for the ComfyUI editor, and executed headless by ComfyUI with tiny weights.

The files each workflow names are written into ComfyUI's model folders under
exactly those names, so the JSON runs unchanged; only FLUX's text encoders are
replaced by a tiny deterministic encoder (the core DualCLIPLoader's widgets are
kept), and sizes/steps are reduced where a full-width FLUX would be slow on CPU.
"""

import glob
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import tiny

WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
ALL = sorted(glob.glob(os.path.join(WORKFLOWS, "*.json")))
# combo widgets that list model files: their values name files users download
FILE_WIDGETS = {"vae_name", "unet_name", "lora_name", "embedding_name", "clip_name1", "clip_name2",
                "control_net_name", "model_name"}


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("path", ALL, ids=os.path.basename)
def test_workflow_is_valid_for_the_editor(comfyui, path):
    """Node types exist, links connect matching types, widget values fit the node definitions."""
    from dcgen_core.headless import workflow_to_prompt

    wf = _load(path)
    classes = comfyui.runtime.node_classes
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] >= max(nodes) and wf["last_link_id"] >= max(l[0] for l in wf["links"])
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert out["type"] == kind == inp["type"], (link_id, out, inp)
        assert link_id in out["links"] and inp["link"] == link_id
        cls = classes[nodes[src]["type"]]
        assert cls.RETURN_TYPES[src_slot] == kind
    for n in wf["nodes"]:
        if n["type"] in ("Note", "MarkdownNote"):
            continue
        cls = classes[n["type"]]
        spec = {**cls.INPUT_TYPES()["required"], **cls.INPUT_TYPES().get("optional", {})}
        for inp in n["inputs"]:
            assert inp["name"] in spec and spec[inp["name"]][0] == inp["type"], (n["type"], inp)
    prompt = workflow_to_prompt(wf, classes)
    for node_id, node in prompt.items():
        cls = classes[node["class_type"]]
        required = cls.INPUT_TYPES()["required"]
        missing = [k for k in required if k not in node["inputs"]]
        assert not missing, (node["class_type"], missing)
        for name, value in node["inputs"].items():
            kind = {**required, **cls.INPUT_TYPES().get("optional", {})}[name][0]
            if kind in ("INT", "FLOAT"):
                assert isinstance(value, (int, float)), (node["class_type"], name, value)
            elif isinstance(kind, list) and not isinstance(value, list) and name not in FILE_WIDGETS:
                assert value in kind, (node["class_type"], name, value)


def _widget(wf, type_, index):
    return next(n for n in wf["nodes"] if n["type"] == type_)["widgets_values"][index]


def _place(comfyui, kind, name, writer):
    path = os.path.join(comfyui.dirs[kind], name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    writer(path)


def _text_encoder_files(comfyui, wf):
    for i in (0, 1):
        _place(comfyui, "text_encoders", _widget(wf, "DualCLIPLoader", i),
               lambda p: save_file({"unused": torch.zeros(1)}, p))


def _run(comfyui, wf, overrides):
    from dcgen_core.headless import workflow_to_prompt

    classes = dict(comfyui.runtime.node_classes)
    classes["DualCLIPLoader"] = comfyui.test_nodes.TinyDualCLIPLoader
    saved = comfyui.runtime.node_classes["DualCLIPLoader"]
    comfyui.runtime.node_classes["DualCLIPLoader"] = comfyui.test_nodes.TinyDualCLIPLoader
    try:
        prompt = workflow_to_prompt(wf, classes)
        for node_id, node in prompt.items():
            for (type_, name), value in overrides.items():
                if node["class_type"] == type_:
                    node["inputs"][name] = value
        return comfyui.runtime.run(prompt)
    finally:
        comfyui.runtime.node_classes["DualCLIPLoader"] = saved


def _saved_images(outputs):
    images = [img for out in outputs.values() for img in out.get("images", [])]
    assert images, outputs
    return images


def test_full_checkpoint_workflow_runs_headless(comfyui, tiny_dcgen, tiny_vae):
    from PIL import Image

    wf = _load(os.path.join(WORKFLOWS, "dcgen-flux-1k-t2i.json"))
    _place(comfyui, "vae", _widget(wf, "DCGenDCAELoader", 0), lambda p: tiny.save_dcae_folder(tiny_vae, p))
    _place(comfyui, "diffusion_models", _widget(wf, "DCGenModelLoader", 0), tiny_dcgen.save_dcgen_diffusers_folder)
    _text_encoder_files(comfyui, wf)
    comfyui.test_nodes.TEXT_DIMS = (tiny.TEXT_DIM, tiny.POOLED_DIM)
    outputs = _run(comfyui, wf, {("KSampler", "steps"): 4})  # 1024x1024 as shipped
    (img,) = _saved_images(outputs)
    with Image.open(os.path.join(comfyui.output, img.get("subfolder", ""), img["filename"])) as im:
        assert im.size == (1024, 1024)
        low, high = im.convert("L").getextrema()
        assert high - low > 16  # an image, not a constant


def _full_width_base_flux(seed=0):
    """A FLUX.1 with the real width (3072, context 4096, pooled 768) but 1 double + 1 single block (diffusers)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, out_channels=64, num_layers=1, num_single_layers=1,
                                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                   pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    return model.eval()


def test_base_lora_workflow_runs_headless_with_core_unet_loader(comfyui, tmp_path):
    """Route 2 as users run it: core Load Diffusion Model (full-width FLUX) + embedding + LoRA."""
    from dcgen_core.flux_keys import diffusers_to_bfl

    wf = _load(os.path.join(WORKFLOWS, "dcgen-flux-1k-from-base-lora.json"))
    vae = tiny.tiny_dcae(seed=5)
    _place(comfyui, "vae", _widget(wf, "DCGenDCAELoader", 0), lambda p: tiny.save_dcae_folder(vae, p))
    base = _full_width_base_flux()
    sd = diffusers_to_bfl({k: v.to(torch.bfloat16) for k, v in base.state_dict().items()})
    _place(comfyui, "diffusion_models", _widget(wf, "UNETLoader", 0), lambda p: save_file(sd, p))
    g = torch.Generator().manual_seed(1)
    emb = {"x_embedder.weight": 0.05 * torch.randn(3072, 32, generator=g), "x_embedder.bias": torch.zeros(3072),
           "proj_out.weight": 0.05 * torch.randn(32, 3072, generator=g), "proj_out.bias": torch.zeros(32)}
    _place(comfyui, "dcgen_embeddings", _widget(wf, "DCGenApplyAlignedEmbedding", 0), lambda p: save_file(emb, p))
    lora = {}
    for m, (rows, cols) in {"transformer_blocks.0.attn.to_q": (3072, 3072),
                            "single_transformer_blocks.0.proj_mlp": (12288, 3072)}.items():
        lora[f"transformer.{m}.lora_A.weight"] = 0.01 * torch.randn(8, cols, generator=g)
        lora[f"transformer.{m}.lora_B.weight"] = 0.01 * torch.randn(rows, 8, generator=g)
    _place(comfyui, "loras", _widget(wf, "DCGenLoraLoader", 0), lambda p: save_file(lora, p))
    _text_encoder_files(comfyui, wf)
    comfyui.test_nodes.TEXT_DIMS = (4096, 768)
    outputs = _run(comfyui, wf, {("KSampler", "steps"): 2, ("DCGenEmptyLatent", "width"): 256,
                               ("DCGenEmptyLatent", "height"): 192})
    (img,) = _saved_images(outputs)
    from PIL import Image

    with Image.open(os.path.join(comfyui.output, img.get("subfolder", ""), img["filename"])) as im:
        assert im.size == (256, 192)
