"""Check the pack under ComfyUI's dynamic VRAM (ModelPatcherDynamic, v0.12+ on NVIDIA) on a CUDA GPU.

    python scripts/check_dynamic_vram.py [--comfyui ~/ComfyUI-0.33]

Boots ComfyUI headless on the GPU the way its main.py does (comfy-aimdo, CoreModelPatcher =
ModelPatcherDynamic) and, for each route, samples 4 steps and decodes once with dynamic VRAM and
once with the legacy ModelPatcher, on the same weights, noise and conditioning:

- the pack's own loader (tiny DC-Gen-FLUX, fp32) + DC-AE VAE;
- the pack's loader for a base FLUX + a DC-Gen LoRA that carries the aligned embedding;
- core Load Diffusion Model (UNETLoader) on a full-width FLUX file (1 double + 1 single block, bf16)
  + DC-Gen Add Embedding + DC-Gen Load LoRA, i.e. patching a core model that lives on a
  dynamic patcher.

Prints the patcher classes, max |dynamic - legacy| of latents and images, and peak VRAM; exits 0 when
every route matches (latents within 2e-2, bf16 route 5e-2), 1 on a mismatch or a patcher that is
not dynamic, 2 without CUDA or without dynamic VRAM support in this ComfyUI. Needs the test extras
(diffusers) for the tiny models.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

STEPS, SEED = 4, 7


def _write_models(dirs: dict) -> dict:
    import torch
    from safetensors.torch import save_file

    import tiny

    t = tiny.TinyDCGen()
    vae = tiny.tiny_dcae()
    tiny.save_dcae_folder(vae, os.path.join(dirs["vae"], "dcae-tiny"))
    t.save_dcgen_diffusers_folder(os.path.join(dirs["diffusion_models"], "dcgen-tiny"))
    t.save_base_single_file(os.path.join(dirs["diffusion_models"], "flux-base-tiny.safetensors"))
    t.save_lora(os.path.join(dirs["loras"], "dcgen-tiny-lora+embedding.safetensors"), with_embedding=True)

    # full-width FLUX for the core loader, with a full-width embedding and LoRA
    save_file(tiny.full_width_flux_bfl(), os.path.join(dirs["diffusion_models"], "flux1-full-width.safetensors"))
    g = torch.Generator().manual_seed(1)
    hidden, c, r = 3072, tiny.LATENT_CHANNELS, 4
    save_file({"x_embedder.weight": 0.02 * torch.randn(hidden, c, generator=g),
               "x_embedder.bias": torch.zeros(hidden),
               "proj_out.weight": 0.02 * torch.randn(c, hidden, generator=g),
               "proj_out.bias": torch.zeros(c)}, os.path.join(dirs["dcgen_embeddings"], "full-width-embedding.safetensors"))
    lora = {}
    for module in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.proj_out"):
        cols = hidden * 5 if module.endswith("proj_out") else hidden
        lora[f"transformer.{module}.lora_A.weight"] = 0.01 * torch.randn(r, cols, generator=g)
        lora[f"transformer.{module}.lora_B.weight"] = 0.01 * torch.randn(hidden, r, generator=g)
    save_file(lora, os.path.join(dirs["loras"], "full-width-lora.safetensors"))
    return {"vae": vae, "tiny": t}


def _route_models(nodes, route: str):
    vae = nodes["DCGenDCAELoader"]().load("dcae-tiny", "auto")[0]
    if route == "pack loader":
        model = nodes["DCGenModelLoader"]().load("dcgen-tiny", "fp32", vae)[0]
    elif route == "base + LoRA with embedding":
        base = nodes["DCGenModelLoader"]().load("flux-base-tiny.safetensors", "fp32")[0]
        model = nodes["DCGenLoraLoader"]().apply(base, "dcgen-tiny-lora+embedding.safetensors", 1.0, vae)[0]
    else:
        base = nodes["UNETLoader"]().load_unet("flux1-full-width.safetensors", "default")[0]
        model = nodes["DCGenApplyAlignedEmbedding"]().apply(base, "full-width-embedding.safetensors", vae)[0]
        model = nodes["DCGenLoraLoader"]().apply(model, "full-width-lora.safetensors", 1.0)[0]
    return model, vae


def _sample(model, vae, context_dim: int, pooled_dim: int):
    import comfy.sample
    import torch

    g = torch.Generator().manual_seed(3)
    cond = [[torch.randn(1, 16, context_dim, generator=g),
             {"pooled_output": torch.randn(1, pooled_dim, generator=g), "guidance": 3.5}]]
    neg = [[torch.zeros(1, 16, context_dim), {"pooled_output": torch.zeros(1, pooled_dim)}]]
    latent = torch.zeros(1, 32, 8, 8)
    noise = comfy.sample.prepare_noise(latent, SEED)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = comfy.sample.sample(model, noise, STEPS, 1.0, "euler", "simple", cond, neg, latent, seed=SEED)
    image = vae.decode(out)
    return out.float().cpu(), image.float().cpu(), torch.cuda.max_memory_allocated() if cuda else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=None)
    parser.add_argument("--dry-run", action="store_true",
                        help="on CPU, both runs on the legacy patcher: checks the script and routes, not dynamic VRAM")
    a = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available() and not a.dry_run:
        print("check_dynamic_vram: no CUDA device here; dynamic VRAM only exists on GPUs (exit 2).")
        return 2
    from dcgen_core.tools.headless import boot

    tmp = tempfile.mkdtemp(prefix="dcgen-dynvram-")
    kinds = ("vae", "diffusion_models", "loras", "dcgen_embeddings")
    dirs = {k: os.path.join(tmp, k) for k in kinds}
    for d in dirs.values():
        os.makedirs(d)
    runtime = boot(a.comfyui, cpu=a.dry_run, model_dirs={k: [v] for k, v in dirs.items()})
    import comfy.model_patcher as mp

    dynamic_cls = mp.ModelPatcher if a.dry_run else getattr(mp, "ModelPatcherDynamic", None)
    if not a.dry_run and (dynamic_cls is None or getattr(mp, "CoreModelPatcher", None) is not dynamic_cls):
        print(f"check_dynamic_vram: this ComfyUI ({runtime.path}) did not enable dynamic VRAM "
              "(needs v0.12+, NVIDIA and a working comfy-aimdo); exit 2.")
        return 2
    _write_models(dirs)
    nodes = runtime.node_classes
    import comfy.model_management as mm
    import tiny

    tiny_dims = (tiny.TEXT_DIM, tiny.POOLED_DIM)
    routes = {"pack loader": tiny_dims, "base + LoRA with embedding": tiny_dims,
              "core UNETLoader (full width) + embedding + LoRA": (4096, 768)}
    failures = 0
    for route, dims in routes.items():
        results = {}
        for mode, cls in (("dynamic", dynamic_cls), ("legacy", mp.ModelPatcher)):
            mp.CoreModelPatcher = cls
            model, vae = _route_models(nodes, route)
            dynamic = model.is_dynamic() if hasattr(model, "is_dynamic") else False
            if (mode == "dynamic") != dynamic and not a.dry_run:
                print(f"FAIL {route}: {mode} run built a {type(model).__name__}")
                failures += 1
            results[mode] = _sample(model, vae, *dims)
            print(f"{route} [{mode}]: MODEL {type(model).__name__}, VAE {type(vae.patcher).__name__}, "
                  f"peak VRAM {results[mode][2] / 2**20:.0f} MiB")
            del model, vae
            mm.unload_all_models()
            mm.soft_empty_cache()
        mp.CoreModelPatcher = dynamic_cls
        d_lat = (results["dynamic"][0] - results["legacy"][0]).abs().max().item()
        d_img = (results["dynamic"][1] - results["legacy"][1]).abs().max().item()
        tol = 5e-2 if "full width" in route else 2e-2
        ok = d_lat <= tol and d_img <= tol
        failures += not ok
        print(f"{'OK  ' if ok else 'FAIL'} {route}: max |dynamic - legacy| latent {d_lat:.2e}, image {d_img:.2e} "
              f"(tolerance {tol:g})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
