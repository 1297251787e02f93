"""DC-Gen-Qwen-Image-Edit bad input: each case a clear error naming what was expected and what was found; the
incoming model left unchanged by the nodes that patch it."""

import os
from types import SimpleNamespace

import pytest
import torch

import tiny
import tiny_qwen


def _node(comfyui, name):
    return comfyui.runtime.node_classes[name]()


@pytest.fixture(scope="module")
def qwen(comfyui):
    transformer, vae, image, pos, neg = tiny_qwen.install_models(comfyui)
    comfy_vae = _node(comfyui, "DCGenDCAELoader").load("dc-ae-f32c32-qwen-edit-tiny", "auto")[0]
    model = _node(comfyui, "DCGenQwenEditModelLoader").load("DC-Qwen-Image-Edit-tiny", "default", vae=comfy_vae)[0]
    return SimpleNamespace(transformer=transformer, vae=comfy_vae, model=model,
                           image=comfyui.test_nodes.IMAGES["qwen-edit"])


def _error(fn, *parts):
    with pytest.raises(Exception) as e:
        fn()
    msg = str(e.value)
    for p in parts:
        assert p in msg, msg
    return msg


def test_flux_file_in_qwen_loader(comfyui, comfy_models):
    _error(lambda: _node(comfyui, "DCGenQwenEditModelLoader").load(comfy_models.dcgen, "default"),
           comfy_models.dcgen, "expected a Qwen-Image transformer", "found a FLUX transformer")


def test_qwen_file_in_flux_loader(comfyui, qwen):
    path = os.path.join(comfyui.dirs["diffusion_models"], "qwen-edit-tiny-single.safetensors")
    tiny_qwen.save_single_file(qwen.transformer, path)
    _error(lambda: _node(comfyui, "DCGenModelLoader").load("qwen-edit-tiny-single.safetensors", "default"),
           "expected a FLUX transformer", "a Qwen-Image transformer", "DC-Gen Load Qwen")


def test_single_file_loads_like_the_folder(comfyui, qwen):
    """A single file (ComfyUI prefix) with its config in the header gives the nested folder's model; without a
    config, the default RoPE axes (16, 56, 56) do not fit the tiny model's head width and the loader says so."""
    path = os.path.join(comfyui.dirs["diffusion_models"], "qwen-edit-tiny-prefixed.safetensors")
    tiny_qwen.save_single_file(qwen.transformer, path, prefix="model.diffusion_model.", with_config=True)
    single = _node(comfyui, "DCGenQwenEditModelLoader").load("qwen-edit-tiny-prefixed.safetensors", "default")[0]
    a, b = single.model.diffusion_model.state_dict(), qwen.model.model.diffusion_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert single.model_options["dcgen"]["family"] == "DC-Gen-Qwen-Image-Edit"
    path = os.path.join(comfyui.dirs["diffusion_models"], "qwen-edit-tiny-no-config.safetensors")
    tiny_qwen.save_single_file(qwen.transformer, path)
    _error(lambda: _node(comfyui, "DCGenQwenEditModelLoader").load("qwen-edit-tiny-no-config.safetensors", "default"),
           "expected RoPE axes summing to the attention head width 16", "config.json")


def test_other_channel_counts_in_dcgen_loader(comfyui):
    odd = tiny_qwen.tiny_qwen_transformer(in_channels=128, out_channels=128)
    folder = os.path.join(comfyui.dirs["diffusion_models"], "qwen-image-128ch-tiny")
    odd.save_pretrained(folder, safe_serialization=True)
    _error(lambda: _node(comfyui, "DCGenQwenEditModelLoader").load("qwen-image-128ch-tiny", "default"),
           "expected DC-Gen-Qwen-Image-Edit (patch size 1, 32 DC-AE channels", "found patch size 1, 128 in / 128 out")


def test_reference_off_the_dcae_grid(comfyui, qwen):
    cond = [[torch.zeros(1, 3, tiny_qwen.TEXT_DIM), {}]]
    _error(lambda: _node(comfyui, "DCGenQwenEditReference").attach(
        cond, qwen.vae, qwen.image, "none (multiples of 32 already)", 0, 0),
        "reference image for DC-Gen-Qwen-Image-Edit", "multiples of 32", "found 200x150")


def test_wrong_vae_for_reference(comfyui, qwen):
    cond = [[torch.zeros(1, 3, tiny_qwen.TEXT_DIM), {}]]
    _error(lambda: _node(comfyui, "DCGenQwenEditReference").attach(cond, object(), qwen.image,
                                                                   "authors (~1 MP, multiples of 32)", 0, 0),
           "vae (DC-Gen-Qwen-Image-Edit): expected a DC-AE VAE")


def test_wrong_text_encoder_in_encode_node(comfyui, qwen):
    clip = SimpleNamespace(tokenizer=object())
    _error(lambda: _node(comfyui, "DCGenQwenEditEncode").encode(clip, qwen.vae, qwen.image, "x", " ",
                                                                "authors (~1 MP, multiples of 32)", 0, 0),
           "expected the Qwen2.5-VL 7B text encoder", "found a object tokenizer")


def _sample(model, positive, negative, latent):
    import comfy.sample

    noise = torch.randn(latent.shape, generator=torch.manual_seed(0))
    return comfy.sample.sample(model, noise, 2, 3.5, "euler", "simple", positive, negative, latent)


def _conds(qwen, width=tiny_qwen.TEXT_DIM, ref=None):
    ref = torch.zeros(1, 32, 4, 4) if ref is None else ref
    return [[torch.randn(1, 3, width), {"reference_latents": [ref]}]]


def test_wan_vae_latent_into_the_dc_model(qwen):
    _error(lambda: _sample(qwen.model, _conds(qwen), _conds(qwen), torch.zeros(1, 16, 16, 16)),
           "expected a DC-AE latent with 32 channels", "found 16 channels")
    wan_ref = torch.zeros(1, 16, 1, 8, 8)  # a Wan VAE latent as the reference (core TextEncodeQwenImageEdit + Wan VAE)
    _error(lambda: _sample(qwen.model, _conds(qwen, ref=wan_ref), _conds(qwen, ref=wan_ref), torch.zeros(1, 32, 4, 4)),
           "reference latent: expected a DC-AE f32c32 latent", "a Wan VAE latent of base Qwen-Image")


def test_wrong_text_encoder_conditioning(qwen):
    _error(lambda: _sample(qwen.model, _conds(qwen, width=4096), _conds(qwen, width=4096), torch.zeros(1, 32, 4, 4)),
           "expected text embeddings of width 24", "found 4096")


def test_embedding_patch_leaves_the_incoming_model_alone(comfyui, qwen):
    """DC-Gen Add Embedding on a Qwen-Image model patches a clone only."""
    from comfyui_dc_gen.dcgen_core.architectures import apply_aligned_embedding
    from comfyui_dc_gen.dcgen_core.shared.embedding import AlignedEmbedding

    model = qwen.model
    before = (dict(model.object_patches), repr(model.model_options.get("dcgen")))
    sd = qwen.transformer.state_dict()
    emb = AlignedEmbedding(sd["img_in.weight"] * 2, sd["img_in.bias"], sd["proj_out.weight"], sd["proj_out.bias"],
                           source="tiny-embedding")
    patched = apply_aligned_embedding(model, emb, vae=qwen.vae)
    assert patched is not model
    assert torch.equal(patched.get_model_object("diffusion_model.img_in").weight, emb.img_in_weight)
    assert (dict(model.object_patches), repr(model.model_options.get("dcgen"))) == before
    assert tiny.SCALING == patched.model_options["dcgen"]["scaling_factor"]
