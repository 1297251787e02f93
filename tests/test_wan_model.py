"""DC-Gen-Wan2.1 transformers as ComfyUI MODELs on core's WanModel: the diffusers -> Wan key map, the config from
the files (patch size, 32 / 68 channels), one model evaluation against diffusers' WanTransformer3DModel (1e-4,
float32 on CPU), weight dtypes, the registry, and bad files."""

import os

import pytest
import torch

import tiny_video

TOL = 1e-4


def _save(comfyui, i2v: bool, name: str, **kw):
    model = tiny_video.tiny_wan(i2v, **kw)
    folder = os.path.join(comfyui.dirs["diffusion_models"], name, "transformer_i2v" if i2v else "transformer_t2v")
    if not os.path.isdir(folder):
        tiny_video.save_wan_folder(model, folder, flow_shift=3.0)
    return model, f"{name}/{os.path.basename(folder)}"


def test_key_map_round_trip():
    from dcgen_core.wan.keys import comfy_to_diffusers_key, diffusers_to_comfy_key

    for i2v in (False, True):
        for k in tiny_video.tiny_wan(i2v).state_dict():
            assert comfy_to_diffusers_key(diffusers_to_comfy_key(k)) == k


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_one_evaluation_matches_diffusers(comfyui, i2v):
    ref, name = _save(comfyui, i2v, "dcgen-wan-tiny")
    patcher = comfyui.runtime.node_classes["DCGenWanModelLoader"]().load(name, "fp32")[0]
    dm = patcher.model.diffusion_model
    assert patcher.model.model_config.unet_config["patch_size"] == (1, 1, 1)
    assert dm.patch_embedding.weight.shape[1] == (68 if i2v else 32)
    assert patcher.model.latent_format.latent_channels == 32 and patcher.model.latent_format.scale_factor == 0.7241
    assert patcher.model.model_sampling.shift == 3.0  # from ../scheduler/scheduler_config.json
    assert patcher.model_options["dcgen"]["image_to_video"] is i2v
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 68 if i2v else 32, 3, 4, 6, generator=g)
    context = torch.randn(1, 512, 24, generator=g)  # diffusers' Wan i2v attention assumes 512 text tokens
    clip = torch.randn(1, 257, 1280, generator=g) if i2v else None
    t = torch.tensor([637.0])
    with torch.no_grad():
        want = ref(hidden_states=x, timestep=t, encoder_hidden_states=context, encoder_hidden_states_image=clip,
                   return_dict=False)[0]
        got = dm(x, t, context, clip_fea=clip)
    assert got.shape == want.shape == (1, 32, 3, 4, 6)
    assert (got - want).abs().max().item() <= TOL


def test_patch_size_from_the_files(comfyui):
    ref, name = _save(comfyui, False, "dcgen-wan-patch2", patch=(1, 2, 2))
    patcher = comfyui.runtime.node_classes["DCGenWanModelLoader"]().load(name, "default")[0]
    assert patcher.model.model_config.unet_config["patch_size"] == (1, 2, 2)
    x = torch.randn(1, 32, 2, 4, 6)
    with torch.no_grad():
        want = ref(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=torch.ones(1, 3, 24),
                   return_dict=False)[0]
        got = patcher.model.diffusion_model(x, torch.tensor([500.0]), torch.ones(1, 3, 24))
    assert (got - want).abs().max().item() <= TOL


def test_fp8_weights_and_registry(comfyui):
    _, name = _save(comfyui, False, "dcgen-wan-tiny")
    patcher = comfyui.runtime.node_classes["DCGenWanModelLoader"]().load(name, "fp8_e4m3fn")[0]
    assert patcher.model.diffusion_model.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    arch = comfyui.core.architectures.architecture_of(patcher)
    assert arch.name == "Wan2.1"
    keys = arch.lora_key_map(patcher, set(f"diffusion_model.{k}" for k in patcher.model.diffusion_model.state_dict()))
    assert keys["transformer.blocks.0.attn1.to_q"] == "diffusion_model.blocks.0.self_attn.q.weight"
    assert keys["transformer.blocks.1.norm2"] == "diffusion_model.blocks.1.norm3.weight"


def test_base_wan_and_wrong_files_are_refused(comfyui, tmp_path):
    from diffusers import WanTransformer3DModel

    base = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                                 out_channels=16, text_dim=24, freq_dim=32, ffn_dim=48, num_layers=1)
    folder = os.path.join(comfyui.dirs["diffusion_models"], "wan21-base-tiny")
    base.save_pretrained(folder, safe_serialization=True)
    loader = comfyui.runtime.node_classes["DCGenWanModelLoader"]()
    with pytest.raises(ValueError, match="base Wan2.1 transformer .16 channels.*Load Diffusion Model"):
        loader.load("wan21-base-tiny", "default")
