"""The shipped workflows: valid for the ComfyUI editor, and executed headless by ComfyUI with tiny weights.

The files each workflow names are written into ComfyUI's model folders under
exactly those names, so the JSON runs unchanged; only FLUX's text encoders are
replaced by a tiny deterministic encoder (the core DualCLIPLoader's widgets are
kept), and sizes/steps are reduced so that each runs in seconds on a CPU.
Core FLUX parts (Load Diffusion Model, ControlNet, VAE) are full width but one
block deep, since ComfyUI's detection assumes FLUX's real widths.
"""

import functools
import glob
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import tiny

WORKFLOWS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
ALL = sorted(glob.glob(os.path.join(WORKFLOWS, "*.json")))
# combo widgets that list model files: their values name files users download
FILE_WIDGETS = {"vae_name", "unet_name", "lora_name", "embedding_name", "clip_name", "clip_name1", "clip_name2",
                "control_net_name", "model_name"}


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("path", ALL, ids=os.path.basename)
def test_workflow_is_valid_for_the_editor(comfyui, path):
    """Node types exist, links connect matching types, widget values fit the node definitions."""
    from dcgen_core.tools.workflows import workflow_to_prompt

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


def _widgets(wf, type_, index):
    """The widget value at ``index`` of every ``type_`` node, in node order."""
    return [n["widgets_values"][index] for n in wf["nodes"] if n["type"] == type_]


def _widget(wf, type_, index):
    return _widgets(wf, type_, index)[0]


def _place(comfyui, kind, name, writer):
    """Write a model file or diffusers folder under a widget's name. An earlier test's copy is removed first, never
    rewritten in place: a model loaded from it may still memory-map it."""
    path = os.path.join(comfyui.dirs[kind], name)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    writer(path)


def _linked(src):
    return functools.partial(tiny.link_or_copy, src)


def _place_dcgen(comfyui, transformer_name, vae_name, dcgen, vae):
    """A tiny DC-Gen transformer (diffusers folder) and its tiny DC-AE under the names a workflow gives them."""
    _place(comfyui, "diffusion_models", transformer_name, dcgen.save_dcgen_diffusers_folder)
    _place(comfyui, "vae", vae_name, lambda p: tiny.save_dcae_folder(vae, p))


def _text_encoders(comfyui, wf, dims):
    """Placeholder files for the DualCLIPLoader's widgets; the tiny encoder replacing it gives (context, pooled) dims."""
    for i in (0, 1):
        _place(comfyui, "text_encoders", _widget(wf, "DualCLIPLoader", i),
               lambda p: save_file({"unused": torch.zeros(1)}, p))
    comfyui.test_nodes.TEXT_DIMS = dims


def _run(comfyui, wf, overrides):
    """Execute the workflow; ``overrides`` set inputs of every node of a class: {(class_type, input_name): value}."""
    from dcgen_core.tools.workflows import workflow_to_prompt

    tiny_encoders = {"DualCLIPLoader": comfyui.test_nodes.TinyDualCLIPLoader,
                     "DCGenSanaTextEncoderLoader": comfyui.test_nodes.tiny_sana_text_encoder_loader()}
    saved = {k: comfyui.runtime.node_classes[k] for k in tiny_encoders}
    comfyui.runtime.node_classes.update(tiny_encoders)
    # Tests write different weights under the same names; ComfyUI caches node outputs by inputs, not file contents.
    comfyui.runtime.executor.reset()
    try:
        prompt = workflow_to_prompt(wf, comfyui.runtime.node_classes)
        for node_id, node in prompt.items():
            for (target, name), value in overrides.items():  # target: a class type, or "#<node id>"
                if target in (node["class_type"], f"#{node_id}"):
                    node["inputs"][name] = value
        return comfyui.runtime.run(prompt)
    finally:
        comfyui.runtime.node_classes.update(saved)


def _assert_saved_image(comfyui, outputs, size):
    """The one image the workflow saved: its (width, height) is ``size`` and it is not a constant."""
    from PIL import Image

    images = [img for out in outputs.values() for img in out.get("images", [])]
    assert len(images) == 1, outputs
    (img,) = images
    with Image.open(os.path.join(comfyui.output, img.get("subfolder", ""), img["filename"])) as im:
        assert im.size == size
        low, high = im.convert("L").getextrema()
        assert high - low > 16, (low, high)  # an image, not a constant


def test_full_checkpoint_workflow_runs_headless(comfyui, tiny_dcgen, tiny_vae):
    """Route 1 (1K): the DC-Gen diffusers folder + DC-AE through core KSampler/VAEDecode, at the shipped 1024x1024."""
    wf = _load(os.path.join(WORKFLOWS, "dcgen-flux-1k-t2i.json"))
    _place_dcgen(comfyui, _widget(wf, "DCGenModelLoader", 0), _widget(wf, "DCGenDCAELoader", 0), tiny_dcgen, tiny_vae)
    _text_encoders(comfyui, wf, (tiny.TEXT_DIM, tiny.POOLED_DIM))
    outputs = _run(comfyui, wf, {("KSampler", "steps"): 4})  # 1024x1024 as shipped
    _assert_saved_image(comfyui, outputs, (1024, 1024))


def test_base_lora_workflow_runs_headless_with_core_unet_loader(comfyui, flux_full_width_file):
    """Route 2 as users run it: core Load Diffusion Model (full-width FLUX) + embedding + LoRA."""
    wf = _load(os.path.join(WORKFLOWS, "dcgen-flux-1k-from-base-lora.json"))
    vae = tiny.tiny_dcae(seed=5)
    _place(comfyui, "vae", _widget(wf, "DCGenDCAELoader", 0), lambda p: tiny.save_dcae_folder(vae, p))
    _place(comfyui, "diffusion_models", _widget(wf, "UNETLoader", 0), _linked(flux_full_width_file))
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
    _text_encoders(comfyui, wf, tiny.FULL_TEXT_DIMS)
    outputs = _run(comfyui, wf, {("KSampler", "steps"): 2, ("DCGenEmptyLatent", "width"): 256,
                                 ("DCGenEmptyLatent", "height"): 192})
    _assert_saved_image(comfyui, outputs, (256, 192))


@pytest.fixture(scope="module")
def dcgen_4k():
    """A tiny DC-Gen f64c128 transformer and its tiny DC-AE-1.5 f64c128 (the Res4K pair)."""
    return tiny.TinyDCGen(seed=3, latent_channels=128), tiny.tiny_dcae15()


def test_4k_workflow_runs_headless(comfyui, dcgen_4k):
    """4K text-to-image: Res4K transformer folder + DC-AE-1.5 through the DC-Gen Sampler 4K, decoded by it."""
    wf = _load(os.path.join(WORKFLOWS, "dcgen-flux-4k-t2i.json"))
    _place_dcgen(comfyui, _widget(wf, "DCGenModelLoader", 0), _widget(wf, "DCGenDCAELoader", 0), *dcgen_4k)
    _text_encoders(comfyui, wf, (tiny.TEXT_DIM, tiny.POOLED_DIM))
    outputs = _run(comfyui, wf, {("DCGenSampler", "width"): 256,
                                 ("DCGenSampler", "height"): 192, ("DCGenSampler", "steps"): 2})
    _assert_saved_image(comfyui, outputs, (256, 192))


def test_4k_nvfp4_workflow_runs_headless(comfyui, dcgen_4k, tmp_path):
    """4K in 4-bit: the Res4K transformer quantized by `python -m dcgen_core.quantize` into the file the workflow
    names, loaded by DC-Gen Load 4-bit, sampled and decoded by the DC-Gen Sampler 4K."""
    from dcgen_core.flux.quantize import quantize_flux

    wf = _load(os.path.join(WORKFLOWS, "dcgen-flux-4k-nvfp4.json"))
    dcgen, vae = dcgen_4k
    folder = dcgen.save_dcgen_diffusers_folder(str(tmp_path / "Res4K"))
    _place(comfyui, "diffusion_models", _widget(wf, "DCGenNVFP4ModelLoader", 0),
           lambda p: quantize_flux(folder, p, progress=False))
    _place(comfyui, "vae", _widget(wf, "DCGenDCAELoader", 0), lambda p: tiny.save_dcae_folder(vae, p))
    _text_encoders(comfyui, wf, (tiny.TEXT_DIM, tiny.POOLED_DIM))
    outputs = _run(comfyui, wf, {("DCGenSampler", "width"): 256,
                                 ("DCGenSampler", "height"): 192, ("DCGenSampler", "steps"): 2})
    _assert_saved_image(comfyui, outputs, (256, 192))


def test_upscale_refine_workflow_runs_headless(comfyui, tiny_dcgen, tiny_vae, dcgen_4k):
    """1K draft -> core 4x model upscaler (spandrel) -> ImageScale -> DC-AE-1.5 encode -> 4K img2img refine.

    The final size is the ImageScale size, not the draft's or the sampler's size widgets: the 4K refine sampled the
    latent of the upscaled, rescaled and encoded draft."""
    wf = _load(os.path.join(WORKFLOWS, "dcgen-flux-1k-upscale-4k-refine.json"))
    (transformer_1k, transformer_4k), (vae_1k, vae_4k) = (_widgets(wf, "DCGenModelLoader", 0),
                                                          _widgets(wf, "DCGenDCAELoader", 0))
    _place_dcgen(comfyui, transformer_1k, vae_1k, tiny_dcgen, tiny_vae)
    _place_dcgen(comfyui, transformer_4k, vae_4k, *dcgen_4k)
    upscaler = _widget(wf, "UpscaleModelLoader", 0)
    _place(comfyui, "upscale_models", upscaler, lambda p: save_file(tiny.tiny_upscaler(scale=4), p))
    assert comfyui.runtime.node_classes["UpscaleModelLoader"]().load_model(upscaler)[0].scale == 4
    _text_encoders(comfyui, wf, (tiny.TEXT_DIM, tiny.POOLED_DIM))
    # draft 128x64 -> upscaled 512x256 -> scaled 384x256 (a multiple of the 4K DC-AE's 64) -> refined 384x256
    draft = next(f"#{n['id']}" for n in wf["nodes"] if n["type"] == "DCGenSampler" and
                 not any(i["name"] == "latent" and i.get("link") is not None for i in n["inputs"]))
    outputs = _run(comfyui, wf, {(draft, "width"): 128, (draft, "height"): 64, ("DCGenSampler", "steps"): 2,
                                 ("ImageScale", "width"): 384, ("ImageScale", "height"): 256})
    _assert_saved_image(comfyui, outputs, (384, 256))


def test_controlnet_chain_workflow_runs_headless(comfyui, tiny_vae, flux_full_width_file, flux_controlnet_file,
                                                 flux_vae_file):
    """A DC-Gen 1K draft -> Canny -> FLUX ControlNet (core loader, hint encoded by the core FLUX VAE) on a core
    Load Diffusion Model FLUX -> KSampler -> VAE Decode: both latent spaces in one graph, one shared text encoder."""
    wf = _load(os.path.join(WORKFLOWS, "dcgen-flux-controlnet-chain.json"))
    dcgen = tiny.TinyDCGen(seed=4, text_dims=tiny.FULL_TEXT_DIMS)  # reads the same conditioning as FLUX
    _place_dcgen(comfyui, _widget(wf, "DCGenModelLoader", 0), _widget(wf, "DCGenDCAELoader", 0), dcgen, tiny_vae)
    _place(comfyui, "diffusion_models", _widget(wf, "UNETLoader", 0), _linked(flux_full_width_file))
    _place(comfyui, "controlnet", _widget(wf, "ControlNetLoader", 0), _linked(flux_controlnet_file))
    _place(comfyui, "vae", _widget(wf, "VAELoader", 0), _linked(flux_vae_file))
    _text_encoders(comfyui, wf, tiny.FULL_TEXT_DIMS)
    outputs = _run(comfyui, wf, {("DCGenSampler", "width"): 96,
                                 ("DCGenSampler", "height"): 64, ("DCGenSampler", "steps"): 2,
                                 ("EmptySD3LatentImage", "width"): 96, ("EmptySD3LatentImage", "height"): 64,
                                 ("KSampler", "steps"): 2})
    _assert_saved_image(comfyui, outputs, (96, 64))


def _sana_files(comfyui, wf, sana, vae_name=None, vae=None):
    _place(comfyui, "diffusion_models", _widget(wf, "DCGenSanaModelLoader", 0),
           lambda p: sana.save_pretrained(p, safe_serialization=True))
    if vae_name is not None:
        _place(comfyui, "vae", vae_name, lambda p: tiny.save_dcae_folder(vae, p))
    _place(comfyui, "text_encoders", _widget(wf, "DCGenSanaTextEncoderLoader", 0),
           lambda p: save_file({"unused": torch.zeros(1)}, p))


def test_sana_workflow_runs_headless(comfyui, tiny_vae):
    """SANA 1K: SANA + its DC-AE f32c32 + Gemma-2 (tiny stand-in) -> CFGGuider (cfg 4.5) + DC-Gen DPM-Solver++
    Flow (midpoint) + DC-Gen Flow Sigmas (DPM-Solver++ flow) -> SamplerCustomAdvanced -> VAE Decode."""
    wf = _load(os.path.join(WORKFLOWS, "sana-1k-t2i.json"))
    _sana_files(comfyui, wf, tiny.tiny_sana(), _widget(wf, "DCGenDCAELoader", 0), tiny_vae)
    outputs = _run(comfyui, wf, {("DCGenEmptyLatent", "width"): 256, ("DCGenEmptyLatent", "height"): 192,
                                 ("DCGenFlowSigmas", "steps"): 3})
    _assert_saved_image(comfyui, outputs, (256, 192))


def test_dcgen_sana_4k_workflow_runs_headless(comfyui, dcgen_4k):
    """DC-Gen-SANA 4K: SANA + 128-channel aligned embedding + DC-Gen LoRA -> DC-Gen Sampler 4K with the negative
    (cfg 4.5) -> decoded by its DC-AE-1.5 f64c128."""
    wf = _load(os.path.join(WORKFLOWS, "dcgen-sana-4k-t2i.json"))
    sana = tiny.tiny_sana()
    _sana_files(comfyui, wf, sana, _widget(wf, "DCGenDCAELoader", 0), dcgen_4k[1])
    emb = os.path.join(comfyui.dirs["dcgen_embeddings"], _widget(wf, "DCGenApplyAlignedEmbedding", 0))
    lora = os.path.join(comfyui.dirs["loras"], _widget(wf, "DCGenLoraLoader", 0))
    for path in (emb, lora):
        if os.path.lexists(path):
            os.remove(path)
    tiny.write_dcgen_sana(sana, emb, lora)
    outputs = _run(comfyui, wf, {("DCGenSampler", "width"): 256, ("DCGenSampler", "height"): 192,
                                 ("DCGenSampler", "steps"): 2})
    _assert_saved_image(comfyui, outputs, (256, 192))


def _assert_saved_video(comfyui, outputs, size, frames):
    """The one video the workflow saved (Save WEBM): ``frames`` frames of (width, height) ``size``, not a constant."""
    import av
    import numpy as np

    videos = [v for out in outputs.values() for v in out.get("images", []) if v["filename"].endswith(".webm")]
    assert len(videos) == 1, outputs
    path = os.path.join(comfyui.output, videos[0].get("subfolder", ""), videos[0]["filename"])
    with av.open(path) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == frames
    assert decoded[0].shape == (size[1], size[0], 3)
    clip = np.stack(decoded).astype(np.float32)
    assert clip.max() - clip.min() > 16  # a video, not a constant


def _wan_files(comfyui, wf, i2v: bool):
    """The tiny files the Wan workflow names: a diffusers WanTransformer3DModel with DC-Gen's channel layout (and
    scheduler/ beside it) and a tiny DC-AE-V of the authors' own modules in their .pt form."""
    import tiny_video
    from authors_dc_gen import dc_videogen

    from dcgen_core.tools.smoke_video import TINY_WAN

    assert tiny_video.tiny_wan(False).config.text_dim == TINY_WAN["text_dim"]  # the stand-in encoder's width
    _place(comfyui, "diffusion_models", _widget(wf, "DCGenWanModelLoader", 0),
           lambda p: tiny_video.save_wan_folder(tiny_video.tiny_wan(i2v, seed=11), p))
    vae = tiny_video.authors_model(dc_videogen("dc_ae_v"), seed=12)
    _place(comfyui, "vae", _widget(wf, "DCGenDCAEVLoader", 0), lambda p: tiny_video.save_pt(vae, p))


def _run_wan(comfyui, wf, overrides):
    """Run with tiny stand-ins for UMT5-XXL (Load CLIP type wan) and CLIP ViT-H/14 (Load CLIP Vision), the ones
    `doctor --smoke` uses: ComfyUI builds both at their full size from fixed configs."""
    from dcgen_core.tools.smoke_video import tiny_clip_vision_loader, tiny_wan_clip_loader

    saved = {k: comfyui.runtime.node_classes.get(k) for k in ("CLIPLoader", "CLIPVisionLoader")}
    comfyui.runtime.node_classes.update({"CLIPLoader": tiny_wan_clip_loader(),
                                         "CLIPVisionLoader": tiny_clip_vision_loader()})
    try:
        return _run(comfyui, wf, overrides)
    finally:
        comfyui.runtime.node_classes.update(saved)


def test_wan_t2v_workflow_runs_headless(comfyui):
    """DC-Gen-Wan t2v as shipped (DC-Gen Load DC-AE-V from the authors' .pt, DC-Gen Load Wan from a diffusers folder,
    CFG 5 with the authors' negative, DC-Gen UniPC Flow + Sigmas, VAE Decode, Save WEBM) at 96x64 and 9 frames:
    the WEBM has 8 frames (floored to a multiple of 4) of 96x64."""
    wf = _load(os.path.join(WORKFLOWS, "dcgen-wan-t2v.json"))
    assert _widget(wf, "CFGGuider", 0) == 5.0 and _widget(wf, "DCGenUniPCFlowSigmas", 0) == 20
    assert (_widget(wf, "DCGenEmptyDCAEVLatentVideo", 0), _widget(wf, "DCGenEmptyDCAEVLatentVideo", 1),
            _widget(wf, "DCGenEmptyDCAEVLatentVideo", 2)) == (1280, 720, 81)
    assert "walking backwards" in _widgets(wf, "CLIPTextEncode", 0)[1]  # the authors' negative prompt
    _wan_files(comfyui, wf, i2v=False)
    outputs = _run_wan(comfyui, wf, {("DCGenEmptyDCAEVLatentVideo", "width"): 96,
                                     ("DCGenEmptyDCAEVLatentVideo", "height"): 64,
                                     ("DCGenEmptyDCAEVLatentVideo", "length"): 9, ("DCGenUniPCFlowSigmas", "steps"): 3})
    _assert_saved_video(comfyui, outputs, (96, 64), 8)


def test_wan_i2v_workflow_runs_headless(comfyui, tmp_path):
    """DC-Gen-Wan i2v as shipped: Load Image -> CLIP Vision Encode + DC-Gen Wan I2V (the DC-AE-V condition and mask)
    -> CFG 5, UniPC -> VAE Decode -> Save WEBM, at 64x96 and 8 frames."""
    import folder_paths
    from PIL import Image

    import tiny_video

    wf = _load(os.path.join(WORKFLOWS, "dcgen-wan-i2v.json"))
    assert _widget(wf, "CFGGuider", 0) == 5.0 and _widget(wf, "DCGenUniPCFlowSigmas", 0) == 20
    assert _widget(wf, "DCGenWanImageToVideo", 2) == 81
    _wan_files(comfyui, wf, i2v=True)
    before = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path))
    try:
        frame = (tiny_video.smooth_video(1, 80, 120, seed=3)[0].numpy() * 255).round().astype("uint8")
        Image.fromarray(frame).save(os.path.join(str(tmp_path), _widget(wf, "LoadImage", 0)))
        outputs = _run_wan(comfyui, wf, {("DCGenWanImageToVideo", "width"): 64,
                                         ("DCGenWanImageToVideo", "height"): 96,
                                         ("DCGenWanImageToVideo", "length"): 8, ("DCGenUniPCFlowSigmas", "steps"): 3})
    finally:
        folder_paths.set_input_directory(before)
    _assert_saved_video(comfyui, outputs, (64, 96), 8)
