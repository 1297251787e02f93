"""Bad input: each case gives a clear error naming what was expected and what was found,
and the incoming model is left unchanged."""

import os

import pytest
import torch
from safetensors.torch import save_file

import tiny


def _node(comfyui, name):
    return comfyui.runtime.node_classes[name]()


def _fingerprint(model):
    """Everything a patch could touch on a ModelPatcher: object patches, weight patches, options, weights."""
    dm = model.model.diffusion_model
    return {
        "object_patches": dict(model.object_patches),
        "patches": {k: len(v) for k, v in model.patches.items()},
        "options": repr(sorted(model.model_options.keys())) + repr(model.model_options.get("dcgen")),
        "wrappers": repr(model.model_options.get("transformer_options", {}).get("wrappers")),
        "modules": {n: id(m) for n, m in dm.named_children()},
        "weights": {k: v.detach().clone() for k, v in dm.state_dict().items()},
        "latent_format": type(model.model.latent_format).__name__,
    }


def _assert_unchanged(model, before):
    after = _fingerprint(model)
    for key in ("object_patches", "patches", "options", "wrappers", "modules", "latent_format"):
        assert after[key] == before[key], key
    for k, v in before["weights"].items():
        assert torch.equal(after["weights"][k], v), k


@pytest.fixture(scope="module")
def loaded(comfyui, comfy_models):
    vae = _node(comfyui, "DCGenDCAELoader").load(comfy_models.vae, "auto")[0]
    base = _node(comfyui, "DCGenModelLoader").load(comfy_models.base, "default")[0]
    dcgen = _node(comfyui, "DCGenModelLoader").load(comfy_models.dcgen, "default", vae=vae)[0]
    return vae, base, dcgen


def _sd15_model():
    import comfy.model_patcher
    import comfy.supported_models

    cfg = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
           "channel_mult": [1, 2], "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
           "transformer_depth_middle": 1, "context_dim": 32, "num_heads": 2, "num_head_channels": -1,
           "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False,
           "use_spatial_transformer": True, "legacy": False}
    mc = comfy.supported_models.SD15(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def test_vae_that_is_not_a_dcae(comfyui, comfy_models, loaded):
    import comfy.sd

    _, base, _ = loaded
    kl = comfy.sd.VAE(sd={})  # a core VAE object (defaults: 4-ch latent at 1/8)
    err = comfyui.core.shared.errors.DCGenError
    with pytest.raises(err, match=r"expected a DC-AE VAE .* found"):
        _node(comfyui, "DCGenEmptyLatent").generate(kl, 1024, 1024, 1)
    before = _fingerprint(base)
    with pytest.raises(err, match=r"expected a DC-AE VAE"):
        _node(comfyui, "DCGenApplyAlignedEmbedding").apply(base, comfy_models.embedding, vae=kl)
    _assert_unchanged(base, before)


def test_kl_vae_file_into_the_dcae_loader(comfyui):
    g = torch.Generator().manual_seed(0)
    sd = {"encoder.conv_in.weight": torch.randn(8, 3, 3, 3, generator=g),
          "encoder.down.0.block.0.conv1.weight": torch.randn(8, 8, 3, 3, generator=g),
          "decoder.up.0.block.0.conv1.weight": torch.randn(8, 8, 3, 3, generator=g),
          "decoder.conv_out.weight": torch.randn(3, 8, 3, 3, generator=g)}
    path = os.path.join(comfyui.dirs["vae"], "ae.safetensors")
    save_file(sd, path)
    with pytest.raises(Exception, match=r"ae\.safetensors.*(not a DC-AE|expected)"):
        _node(comfyui, "DCGenDCAELoader").load("ae.safetensors", "auto")


def test_embedding_whose_channels_do_not_match(comfyui, loaded, tiny_dcgen):
    vae, base, _ = loaded
    g = torch.Generator().manual_seed(0)
    hidden = base.model.diffusion_model.hidden_size
    wrong = {"x_embedder.weight": torch.randn(hidden, 128, generator=g), "x_embedder.bias": torch.zeros(hidden),
             "proj_out.weight": torch.randn(128, hidden, generator=g), "proj_out.bias": torch.zeros(128)}
    save_file(wrong, os.path.join(comfyui.dirs["dcgen_embeddings"], "f64c128-embedding.safetensors"))
    before = _fingerprint(base)
    with pytest.raises(comfyui.core.shared.errors.DCGenError,
                       match=r"f64c128-embedding\.safetensors: expected 32 latent channels .* found 128"):
        _node(comfyui, "DCGenApplyAlignedEmbedding").apply(base, "f64c128-embedding.safetensors", vae=vae)
    _assert_unchanged(base, before)
    flux64 = {"img_in.weight": torch.randn(hidden, 64, generator=g), "final_layer.linear.weight": torch.randn(64, hidden)}
    save_file(flux64, os.path.join(comfyui.dirs["dcgen_embeddings"], "flux-embedder.safetensors"))
    with pytest.raises(comfyui.core.shared.errors.DCGenError, match=r"found 64\. 64 = 16 latent channels x 2x2 patches"):
        _node(comfyui, "DCGenApplyAlignedEmbedding").apply(base, "flux-embedder.safetensors")
    wide = {"x_embedder.weight": torch.randn(3072, 32, generator=g), "proj_out.weight": torch.randn(32, 3072)}
    save_file(wide, os.path.join(comfyui.dirs["dcgen_embeddings"], "for-flux-3072.safetensors"))
    with pytest.raises(comfyui.core.shared.errors.DCGenError, match=r"expected hidden size \d+ .* found 3072"):
        _node(comfyui, "DCGenApplyAlignedEmbedding").apply(base, "for-flux-3072.safetensors")
    _assert_unchanged(base, before)


def test_lora_for_another_architecture(comfyui, loaded):
    _, _, dcgen = loaded
    g = torch.Generator().manual_seed(0)
    sdxl = {"lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight": torch.randn(4, 640, generator=g),
            "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.randn(640, 4, generator=g),
            "lora_unet_down_blocks_1_attentions_0_proj_in.alpha": torch.tensor(4.0)}
    save_file(sdxl, os.path.join(comfyui.dirs["loras"], "sdxl-style.safetensors"))
    before = _fingerprint(dcgen)
    with pytest.raises(comfyui.core.shared.errors.DCGenError,
                       match=r"sdxl-style\.safetensors: expected a LoRA for this FLUX transformer .* found 1 entries"):
        _node(comfyui, "DCGenLoraLoader").apply(dcgen, "sdxl-style.safetensors", 1.0)
    _assert_unchanged(dcgen, before)
    wide = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 3072, generator=g),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(3072, 4, generator=g)}
    save_file(wide, os.path.join(comfyui.dirs["loras"], "flux-dev-3072.safetensors"))
    with pytest.raises(comfyui.core.shared.errors.DCGenError, match=r"expected a LoRA delta of \[32, 32\] .* found \[3072, 3072\]"):
        _node(comfyui, "DCGenLoraLoader").apply(dcgen, "flux-dev-3072.safetensors", 1.0)
    _assert_unchanged(dcgen, before)


def test_size_not_a_multiple_of_the_latent_grid(comfyui, loaded):
    vae, _, dcgen = loaded
    with pytest.raises(comfyui.core.shared.errors.DCGenError,
                       match=r"expected width and height that are multiples of 32 .* found 1000x1024\. Nearest: 992x1024"):
        _node(comfyui, "DCGenEmptyLatent").generate(vae, 1000, 1024, 1)
    before = _fingerprint(dcgen)
    with pytest.raises(comfyui.core.shared.errors.DCGenError, match=r"multiples of 32 .* found 1024x1010"):
        _node(comfyui, "DCGenTimeShift").patch(dcgen, "model default", 1024, 1010)
    _assert_unchanged(dcgen, before)


def test_truncated_safetensors(comfyui, comfy_models):
    src = os.path.join(comfyui.dirs["diffusion_models"], comfy_models.base)
    with open(src, "rb") as f:
        data = f.read()
    dst = os.path.join(comfyui.dirs["diffusion_models"], "truncated.safetensors")
    with open(dst, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(comfyui.core.shared.errors.DCGenError, match=r"truncated\.safetensors.*(truncated|expected)"):
        _node(comfyui, "DCGenModelLoader").load("truncated.safetensors", "default")
    with open(os.path.join(comfyui.dirs["loras"], "truncated-lora.safetensors"), "wb") as f:
        f.write(data[:100])
    with pytest.raises(comfyui.core.shared.errors.DCGenError, match=r"truncated-lora\.safetensors"):
        _node(comfyui, "DCGenLoraLoader").apply(_node(comfyui, "DCGenModelLoader").load(comfy_models.base, "default")[0],
                                              "truncated-lora.safetensors", 1.0)


def test_non_flux_model_into_the_patchers(comfyui, comfy_models, loaded):
    sd15 = _sd15_model()
    before = _fingerprint(sd15)
    with pytest.raises(comfyui.core.shared.errors.DCGenError, match=r"expected a FLUX model .* found BaseModel with a UNetModel"):
        _node(comfyui, "DCGenApplyAlignedEmbedding").apply(sd15, comfy_models.embedding)
    with pytest.raises(comfyui.core.shared.errors.DCGenError, match=r"expected a FLUX model"):
        _node(comfyui, "DCGenLoraLoader").apply(sd15, comfy_models.lora, 1.0)
    with pytest.raises(comfyui.core.shared.errors.DCGenError, match=r"expected a DC-Gen model"):
        _node(comfyui, "DCGenTimeShift").patch(sd15, "model default", 1024, 1024)
    _assert_unchanged(sd15, before)


def test_latent_from_another_model(comfyui, comfy_models):
    """A 16-channel FLUX latent sampled with a DC-Gen model: stopped before the transformer runs."""
    prompt = {
        "vae": {"class_type": "DCGenDCAELoader", "inputs": {"vae_name": comfy_models.vae, "variant": "auto"}},
        "model": {"class_type": "DCGenModelLoader", "inputs": {"unet_name": comfy_models.dcgen,
                                                               "weight_dtype": "default"}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "text": {"class_type": "TestPromptEmbeds", "inputs": {"key": "bad-latent"}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "guider": {"class_type": "BasicGuider", "inputs": {"model": ["model", 0], "conditioning": ["text", 0]}},
        "select": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["model", 0], "scheduler": "simple",
                                                              "steps": 2, "denoise": 1.0}},
        "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["select", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}},
        "capture": {"class_type": "TestCapture", "inputs": {"key": "bad-latent", "latent": ["sample", 0]}},
    }
    comfyui.test_nodes.EMBEDDINGS["bad-latent"] = tiny.prompt_embeddings()
    # an all-zero latent is resized to the model's channels by ComfyUI, so use a non-empty one
    prompt["latent"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}}
    prompt["latent2"] = {"class_type": "TestLatentFromMask", "inputs": {"mask": ["latent", 0], "channels": 16}}
    prompt["sample"]["inputs"]["latent_image"] = ["latent2", 0]
    with pytest.raises(RuntimeError, match=r"expected a DC-AE latent with 32 channels .* found 16 channels"):
        comfyui.runtime.run(prompt)
