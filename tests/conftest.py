"""Shared fixtures. ComfyUI-dependent fixtures skip, with the reason printed, when ComfyUI is absent."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from dcgen_core.tools.headless import comfyui_available, comfyui_path, comfyui_version_at  # noqa: E402

COMFY_MISSING = (f"ComfyUI not found at {comfyui_path()} (set COMFYUI_PATH to a ComfyUI checkout); "
                 "the tests that run nodes and workflows inside ComfyUI are skipped")
MODEL_KINDS = ("vae", "diffusion_models", "loras", "dcgen_embeddings", "text_encoders", "upscale_models",
               "controlnet")


# scripts/run_tests.py sets this for each ComfyUI it found: there, a ComfyUI test must run, never skip
REQUIRE_COMFYUI = os.environ.get("DCGEN_REQUIRE_COMFYUI") == "1"


def pytest_report_header(config):
    if comfyui_available():
        return f"ComfyUI {comfyui_version_at(comfyui_path())} at {comfyui_path()}"
    return f"ComfyUI: none at {comfyui_path()} (ComfyUI tests skip)"


def pytest_collection_modifyitems(config, items):
    if not comfyui_available():
        print(f"\nSKIP REASON: {COMFY_MISSING}")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not stall when other work shares the CPUs); for a module:
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory):
    """ComfyUI booted in-process on CPU with this pack loaded and temporary model folders."""
    if not comfyui_available():
        if REQUIRE_COMFYUI:
            pytest.fail(f"DCGEN_REQUIRE_COMFYUI=1 but {COMFY_MISSING}")
        pytest.skip(COMFY_MISSING)
    from dcgen_core.tools.headless import boot

    root = tmp_path_factory.mktemp("comfyui")
    dirs = {k: str(root / "models" / k) for k in MODEL_KINDS}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    runtime = boot(cpu=True, output_dir=str(root / "output"), model_dirs={k: [v] for k, v in dirs.items()})
    import comfy_test_nodes

    runtime.register(comfy_test_nodes.NODE_CLASS_MAPPINGS)
    pack = sys.modules["comfyui_dc_gen"]
    return SimpleNamespace(runtime=runtime, dirs=dirs, output=str(root / "output"), pack=pack,
                           core=pack.dcgen_core, test_nodes=comfy_test_nodes)


@pytest.fixture(scope="session")
def tiny_dcgen():
    import tiny

    return tiny.TinyDCGen()


@pytest.fixture(scope="session")
def tiny_vae():
    import tiny

    return tiny.tiny_dcae()


@pytest.fixture(scope="session")
def comfy_models(comfyui, tiny_dcgen, tiny_vae):
    """The tiny DC-Gen files in ComfyUI's model folders; returns their widget names."""
    import tiny

    d = comfyui.dirs
    tiny.save_dcae_folder(tiny_vae, os.path.join(d["vae"], "dc-ae-f32c32-sana-1.1-tiny"))
    tiny_dcgen.save_dcgen_diffusers_folder(os.path.join(d["diffusion_models"], "DC-Gen-FLUX-tiny-Res1K"))
    tiny_dcgen.save_base_single_file(os.path.join(d["diffusion_models"], "flux-base-tiny.safetensors"))
    tiny_dcgen.save_embedding(os.path.join(d["dcgen_embeddings"], "dcgen-flux-tiny-embedding.safetensors"))
    tiny_dcgen.save_lora(os.path.join(d["loras"], "dcgen-flux-tiny-lora.safetensors"))
    tiny_dcgen.save_lora(os.path.join(d["loras"], "dcgen-flux-tiny-lora+embedding.safetensors"), with_embedding=True)
    return SimpleNamespace(
        vae="dc-ae-f32c32-sana-1.1-tiny",
        dcgen="DC-Gen-FLUX-tiny-Res1K",
        base="flux-base-tiny.safetensors",
        embedding="dcgen-flux-tiny-embedding.safetensors",
        lora="dcgen-flux-tiny-lora.safetensors",
        lora_with_embedding="dcgen-flux-tiny-lora+embedding.safetensors",
    )


# Full-width FLUX files for the core loaders (see tiny.py), written once per session; tests link them into the
# model folders under the names they need (tiny.link_or_copy).
def _saved_once(tmp_path_factory, name, build):
    from safetensors.torch import save_file

    path = str(tmp_path_factory.mktemp("full-width") / name)
    save_file(build(), path)
    return path


@pytest.fixture(scope="session")
def flux_full_width_file(tmp_path_factory):
    """FLUX.1 transformer, real width, 1 double + 1 single block, BFL keys, bf16 (~1.1 GB)."""
    import tiny

    return _saved_once(tmp_path_factory, "flux1-full-width.safetensors", tiny.full_width_flux_bfl)


@pytest.fixture(scope="session")
def flux_controlnet_file(tmp_path_factory):
    """diffusers FluxControlNetModel, real width, 1 double block, bf16 (~0.8 GB)."""
    import tiny

    return _saved_once(tmp_path_factory, "flux-controlnet-full-width.safetensors", tiny.full_width_flux_controlnet)


@pytest.fixture(scope="session")
def flux_vae_file(tmp_path_factory):
    """FLUX VAE (diffusers AutoencoderKL keys, 16 channels), bf16 (~170 MB)."""
    import tiny

    return _saved_once(tmp_path_factory, "flux-vae.safetensors", tiny.flux_vae)


@pytest.fixture(scope="session")
def models_4k(comfyui):
    """A tiny DC-Gen f64c128 (4K model) and DC-AE-1.5 in the model folders, and as loaded (model, VAE)."""
    import tiny

    dcgen = tiny.TinyDCGen(seed=3, latent_channels=128)
    vae = tiny.tiny_dcae15()
    tiny.save_dcae_folder(vae, os.path.join(comfyui.dirs["vae"], "dc-ae-1.5-f64c128-tiny"))
    dcgen.save_dcgen_diffusers_folder(os.path.join(comfyui.dirs["diffusion_models"], "DC-Gen-FLUX-tiny-Res4K"))
    nodes = comfyui.runtime.node_classes
    comfy_vae = nodes["DCGenDCAELoader"]().load("dc-ae-1.5-f64c128-tiny", "auto")[0]
    model = nodes["DCGenModelLoader"]().load("DC-Gen-FLUX-tiny-Res4K", "default", vae=comfy_vae)[0]
    base = os.path.join(comfyui.dirs["diffusion_models"], "flux-tiny-base-for-4k.safetensors")
    dcgen.save_base_single_file(base)
    dcgen.save_embedding(os.path.join(comfyui.dirs["dcgen_embeddings"], "dcgen-tiny-4k-embedding.safetensors"))
    dcgen.save_lora(os.path.join(comfyui.dirs["loras"], "dcgen-tiny-4k-lora.safetensors"))
    return dcgen, vae, comfy_vae, model
