"""MODEL and VAE objects as current ComfyUI's model management expects them (issue: dynamic VRAM, low-VRAM
offloading, MultiGPU), on CPU. What needs CUDA (ModelPatcherDynamic itself) is checked by
scripts/check_dynamic_vram.py on a GPU.
"""

import pytest
import torch
import torch.nn.functional as F

import tiny


def _forward(model, seed: int = 5) -> torch.Tensor:
    """The patched diffusion model on a DC-AE latent, as the sampler calls it (pixel-shuffled 2x2 view)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(1, tiny.LATENT_CHANNELS, 3, 4, generator=g)
    ctx, pooled = tiny.prompt_embeddings()
    dm = model.model.diffusion_model
    with torch.no_grad():
        out = dm(F.pixel_shuffle(z, 2), torch.full((1,), 0.6), ctx, y=pooled, guidance=torch.full((1,), 3.5))
    return F.pixel_unshuffle(out, 2).float()


def _loaded_forward(model, lowvram_model_memory: int = 0) -> torch.Tensor:
    model.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=lowvram_model_memory)
    try:
        return _forward(model)
    finally:
        model.unpatch_model(device_to=torch.device("cpu"))


@pytest.fixture
def spy_core_patcher(comfyui, monkeypatch):
    """ComfyUI's main.py enables dynamic VRAM by rebinding ``comfy.model_patcher.CoreModelPatcher`` (to
    ModelPatcherDynamic, which on CPU hands back a plain ModelPatcher). Rebind it to a recognisable subclass."""
    import comfy.model_patcher as mp

    class CorePatcherSpy(mp.ModelPatcher):
        pass

    monkeypatch.setattr(mp, "CoreModelPatcher", CorePatcherSpy, raising=False)
    return CorePatcherSpy


def test_loaders_build_patchers_as_core_loaders_do(comfyui, comfy_models, spy_core_patcher):
    nodes = comfyui.runtime.node_classes
    model = nodes["DCGenModelLoader"]().load(comfy_models.dcgen, "default")[0]
    vae = nodes["DCGenDCAELoader"]().load(comfy_models.vae, "auto")[0]
    assert type(model) is spy_core_patcher
    assert type(vae.patcher) is spy_core_patcher
    # the pack's patches keep the class of whatever patcher came in (clones)
    base = nodes["DCGenModelLoader"]().load(comfy_models.base, "default")[0]
    patched = nodes["DCGenLoraLoader"]().apply(base, comfy_models.lora_with_embedding, 1.0)[0]
    assert type(base) is spy_core_patcher and type(patched) is spy_core_patcher


def test_cached_patcher_init_rebuilds_a_pristine_model(comfyui, comfy_models):
    """Core rebuilds models from ``cached_patcher_init`` (MultiGPU deep clones, the non-dynamic delegate for
    hooks); the factory must give the same DC-Gen model, as a plain ModelPatcher when asked to."""
    import comfy.model_patcher as mp

    nodes = comfyui.runtime.node_classes
    vae = nodes["DCGenDCAELoader"]().load(comfy_models.vae, "auto")[0]
    model = nodes["DCGenModelLoader"]().load(comfy_models.dcgen, "default", vae)[0]
    factory, args = model.cached_patcher_init[:2]
    fresh = factory(*args, disable_dynamic=True)
    assert type(fresh) is mp.ModelPatcher
    assert fresh.model is not model.model
    assert fresh.model_options["dcgen"] == model.model_options["dcgen"]
    assert fresh.model.latent_format.latent_channels == tiny.LATENT_CHANNELS
    ours, theirs = model.model_state_dict(), fresh.model_state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    vae_factory, vae_args = vae.patcher.cached_patcher_init[:2]
    vae_patcher = vae_factory(*vae_args, disable_dynamic=True)
    assert type(vae_patcher) is mp.ModelPatcher and vae_patcher.model is not vae.patcher.model
    a, b = vae.patcher.model.state_dict(), vae_patcher.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_multigpu_deep_clone(comfyui, comfy_models):
    """v0.33's MultiGPU makes per-device deep clones through ``deepclone_multigpu`` (it refuses patchers without
    ``cached_patcher_init``). The clone of a DC-Gen model (own loader, and core FLUX + embedding + LoRA) must carry
    the DC-Gen latent space and give the same output."""
    import comfy.model_patcher as mp

    if not hasattr(mp.ModelPatcher, "deepclone_multigpu"):
        from dcgen_core.shared.comfy_compat import comfyui_version

        assert comfyui_version().startswith("0.3."), "a ComfyUI after v0.3.x without MultiGPU deep clones"
        return  # v0.3.64 has no MultiGPU: nothing to accept
    nodes = comfyui.runtime.node_classes
    base = nodes["DCGenModelLoader"]().load(comfy_models.base, "default")[0]
    routes = {
        "own loader": nodes["DCGenModelLoader"]().load(comfy_models.dcgen, "default")[0],
        "base + embedding + LoRA": nodes["DCGenLoraLoader"]().apply(base, comfy_models.lora_with_embedding, 1.0)[0],
    }
    for name, model in routes.items():
        expected = _loaded_forward(model)
        clone = model.deepclone_multigpu(new_load_device=torch.device("cpu"))
        assert clone.model is not model.model, name
        assert clone.model_options["dcgen"] == model.model_options["dcgen"], name
        assert (_loaded_forward(clone) - expected).abs().max().item() <= 1e-6, name


def test_low_vram_loading_gives_the_same_output(comfyui, comfy_models):
    """Low-VRAM mode leaves weights off the device and applies LoRA patches per layer at run time; the
    embedder/head object patches and LoRA patches must survive that path."""
    nodes = comfyui.runtime.node_classes
    base = nodes["DCGenModelLoader"]().load(comfy_models.base, "default")[0]
    patched = nodes["DCGenLoraLoader"]().apply(base, comfy_models.lora_with_embedding, 1.0)[0]
    full = _loaded_forward(patched)
    low = _loaded_forward(patched, lowvram_model_memory=1)
    assert full.abs().max() > 1e-3
    assert (low - full).abs().max().item() <= 1e-5
    # and the reference: the merged DC-Gen checkpoint
    merged = nodes["DCGenModelLoader"]().load(comfy_models.dcgen, "default")[0]
    assert (_loaded_forward(merged) - full).abs().max().item() <= 1e-4
