"""Qwen-Image LoRAs on DC-Gen-Qwen-Image-Edit: diffusers/PEFT, kohya and ComfyUI key layouts, through the pack's
DC-Gen Load LoRA and core LoraLoaderModelOnly. Check: every targeted weight of the patched model equals
W + (alpha / r) * up @ down (fp32, 1e-6), the others are untouched, the incoming MODEL is unchanged, and the
model output with the LoRA equals diffusers' QwenImageTransformer2DModel with the merged weights (1e-5)."""

import os

import pytest
import torch
from safetensors.torch import save_file

import tiny_qwen

RANK, ALPHA = 4, 8.0
MODULES = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj",
           "transformer_blocks.1.img_mlp.net.2", "transformer_blocks.1.txt_mod.1", "img_in", "proj_out")


def _lora(transformer, seed=3):
    g = torch.Generator().manual_seed(seed)
    sd = transformer.state_dict()
    out = {}
    for m in MODULES:
        w = sd[f"{m}.weight"]
        out[m] = (0.1 * torch.randn(RANK, w.shape[1], generator=g), 0.1 * torch.randn(w.shape[0], RANK, generator=g))
    return out


def _write(lora, layout, path):
    t = {}
    for m, (down, up) in lora.items():
        if layout == "diffusers":
            a, b, al = f"transformer.{m}.lora_A.weight", f"transformer.{m}.lora_B.weight", f"transformer.{m}.alpha"
        elif layout == "kohya":
            n = "lora_unet_" + m.replace(".", "_")
            a, b, al = f"{n}.lora_down.weight", f"{n}.lora_up.weight", f"{n}.alpha"
        else:  # ComfyUI's own (a LoRA saved from a ComfyUI model)
            a, b, al = f"diffusion_model.{m}.lora_down.weight", f"diffusion_model.{m}.lora_up.weight", \
                f"diffusion_model.{m}.alpha"
        t[a], t[b], t[al] = down.contiguous(), up.contiguous(), torch.tensor(ALPHA)
    save_file(t, path)


@pytest.fixture(scope="module")
def qwen(comfyui):
    transformer = tiny_qwen.install_models(comfyui)[0]
    nodes = comfyui.runtime.node_classes
    vae = nodes["DCGenDCAELoader"]().load("dc-ae-f32c32-qwen-edit-tiny", "auto")[0]
    model = nodes["DCGenQwenEditModelLoader"]().load("DC-Qwen-Image-Edit-tiny", "default", vae=vae)[0]
    return transformer, model


@pytest.mark.parametrize("layout", ["diffusers", "kohya", "comfyui"])
@pytest.mark.parametrize("loader", ["DCGenLoraLoader", "LoraLoaderModelOnly"])
def test_lora_layouts_merge_exactly(comfyui, qwen, layout, loader):
    transformer, model = qwen
    lora = _lora(transformer)
    name = f"qwen-edit-tiny-lora-{layout}.safetensors"
    _write(lora, layout, os.path.join(comfyui.dirs["loras"], name))
    before = (dict(model.patches), dict(model.object_patches))
    node = comfyui.runtime.node_classes[loader]()
    patched = (node.apply(model, name, 1.0) if loader == "DCGenLoraLoader"
               else node.load_lora_model_only(model, name, 1.0))[0]
    assert (dict(model.patches), dict(model.object_patches)) == before  # the incoming MODEL is unchanged
    targets = {f"diffusion_model.{m}.weight" for m in MODULES}
    assert targets <= set(patched.patches), sorted(targets - set(patched.patches))
    ref = transformer.state_dict()
    patched.patch_model()
    try:
        got = patched.model.diffusion_model.state_dict()
        for m, (down, up) in lora.items():
            expected = ref[f"{m}.weight"] + (ALPHA / RANK) * up @ down
            assert (got[f"{m}.weight"] - expected).abs().max().item() <= 1e-6, m
        untouched = "transformer_blocks.0.attn.to_k.weight"
        assert torch.equal(got[untouched], ref[untouched])
    finally:
        patched.unpatch_model()


def test_lora_model_output_equals_diffusers_on_merged_weights(comfyui, qwen):
    """One denoising call of the LoRA'd MODEL (the pack's token view and positions) against diffusers'
    QwenImageTransformer2DModel with the LoRA merged into its weights, with a reference image of another size."""
    import comfy.model_management as mm

    transformer, model = qwen
    lora = _lora(transformer, seed=4)
    _write(lora, "diffusers", os.path.join(comfyui.dirs["loras"], "qwen-edit-tiny-lora-out.safetensors"))
    patched = comfyui.runtime.node_classes["DCGenLoraLoader"]().apply(model, "qwen-edit-tiny-lora-out.safetensors",
                                                                     1.0)[0]
    merged = tiny_qwen.tiny_qwen_transformer()
    with torch.no_grad():
        for m, (down, up) in lora.items():
            merged.get_submodule(m).weight += (ALPHA / RANK) * up @ down
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(1, 32, 4, 6, generator=g), torch.randn(1, 32, 5, 7, generator=g)
    cond = torch.randn(1, 5, tiny_qwen.TEXT_DIM, generator=g)
    sigma = torch.tensor([0.7])
    import comfy.patcher_extension

    mm.load_models_gpu([patched])
    options = dict(patched.model_options["transformer_options"])  # the wrappers, as core's sampler merges them
    comfy.patcher_extension.merge_nested_dicts(options.setdefault("wrappers", {}), patched.wrappers, copy_dict1=False)
    out = patched.model.apply_model(x, sigma, c_crossattn=cond, ref_latents=[ref], transformer_options=options)
    # apply_model returns denoised = x - sigma * v (flow): recover v
    v_ours = (x - out) / sigma
    packed = torch.cat([t.permute(0, 2, 3, 1).reshape(1, -1, 32) for t in (x, ref)], 1)
    with torch.no_grad():
        v = merged(hidden_states=packed, timestep=sigma, encoder_hidden_states=cond,
                   encoder_hidden_states_mask=torch.ones(1, 5), img_shapes=[[(1, 4, 6), (1, 5, 7)]],
                   return_dict=False)[0][:, :24]
    v_ref = v.reshape(1, 4, 6, 32).permute(0, 3, 1, 2)
    assert (v_ours - v_ref).abs().max().item() <= 1e-5
