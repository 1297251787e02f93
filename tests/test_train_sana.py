"""`python -m dcgen_core.train align / lora` for SANA (DC-Gen-SANA in DC-AE-1.5 f64c128 latents), tiny models, CPU.

What is shown: the training denoiser is the model diffusers' SanaPipeline samples with (same latents out); the base
loads from a diffusers folder, a single file and NVlabs keys alike; the loss is flow matching with SANA's flow shift
and the caption mask; alignment and LoRA over-fit a fixed batch; the written files, loaded by the pack's SANA nodes
in ComfyUI (DC-Gen Add Embedding, DC-Gen Load LoRA, core LoraLoaderModelOnly), compute what the trained PEFT
diffusers model computes; a cache of the other family, and the guidance-distilled objective, are refused.
"""

from __future__ import annotations

import json
import os

import pytest
import tiny
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dcgen_core.shared.errors import DCGenError
from dcgen_core.tools.train import align, train_lora
from dcgen_core.tools.train.__main__ import main as train_main
from dcgen_core.tools.train.cache import LatentCache, MemoryCache, write_cache
from dcgen_core.tools.train.objectives import denoising_loss, sample_sigmas
from dcgen_core.tools.train.sana_model import Denoiser, install_embedding, load_base_transformer
from test_train import _cfg, _rel

C, BASE_C, TOKENS = 128, 32, 6  # DC-AE-1.5 f64c128 student, SANA's f32c32 teacher; caption tokens (2 padded)
TOL = 1e-4  # relative, fp32 CPU: ComfyUI's SANA (comfy ops, its attention) vs diffusers + PEFT


pytestmark = pytest.mark.usefixtures("one_thread")


def _mask(valid: int) -> torch.Tensor:
    m = torch.zeros(TOKENS)
    m[:valid] = 1
    return m


def _sana_items(n: int = 4, seed: int = 0):
    """Random cache items as SANA's prepare writes them: f64c128 latents 4x4 (256 px), f32c32 teacher latents 8x8,
    Gemma-2-width context with its attention mask (float 1/0; some tokens padded)."""
    g = torch.Generator().manual_seed(seed)
    return [(f"img{i}", f"caption {i}", {
        "base_latents": torch.randn(BASE_C, 8, 8, generator=g), "dcae_latents": torch.randn(C, 4, 4, generator=g),
        "context": torch.randn(TOKENS, tiny.SANA_CAPTION, generator=g), "context_mask": _mask(4 + i % 3)})
        for i in range(n)]


@pytest.fixture(scope="module")
def sana_files(tmp_path_factory):
    """The tiny base SANA as a diffusers folder, a single file (config in its header) and NVlabs keys (with the
    config.json beside them: original keys carry no head counts); the same weights with a sin-cos position table
    (a 2K SANA's interpolation_scale 1.0) as a folder; a written SANA cache."""
    from diffusers import SanaTransformer2DModel
    from test_sana_model import _to_original

    root = tmp_path_factory.mktemp("train-sana")
    base = tiny.tiny_sana()
    folder = str(root / "sana-base")
    base.save_pretrained(folder, safe_serialization=True)
    single = str(root / "sana-base.safetensors")
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, single,
              metadata={"config": json.dumps(dict(base.config))})
    os.makedirs(root / "nvlabs")
    nvlabs = str(root / "nvlabs" / "sana-nvlabs.safetensors")
    save_file({k: v.contiguous() for k, v in _to_original(base.state_dict()).items()}, nvlabs)
    with open(root / "nvlabs" / "config.json", "w", encoding="utf-8") as f:
        json.dump(dict(base.config), f)
    pe = SanaTransformer2DModel(**dict(tiny.SANA_TINY, interpolation_scale=1.0)).eval()
    pe.load_state_dict(base.state_dict(), strict=True)
    pe_folder = str(root / "sana-base-pe")
    pe.save_pretrained(pe_folder, safe_serialization=True)
    cache = str(root / "cache")
    write_cache(cache, _sana_items(), {"family": "sana", "resolution": [256, 256]}, shard_size=3,
                text_dtype=torch.float32)
    return {"root": root, "model": base, "folder": folder, "single": single, "nvlabs": nvlabs, "cache": cache,
            "pe_model": pe, "pe_folder": pe_folder}


# --- the denoiser is the pipeline's model call ----------------------------------------------------------------------

def _pipeline_latents(model, x, ctx, mask, steps: int = 3):
    """diffusers' SanaPipeline (no CFG, flow-match Euler, shift 3) from given latents and prompt embeddings."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    h, w = x.shape[-2:]
    return pipe(prompt_embeds=ctx, prompt_attention_mask=mask, guidance_scale=1.0, num_inference_steps=steps,
                height=32 * h, width=32 * w, latents=x.clone(), output_type="latent", use_resolution_binning=False,
                return_dict=False)[0]


def _euler_with(denoiser, x, ctx, mask, steps: int = 3):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    s = sched.sigmas
    with torch.no_grad():
        for i in range(steps):
            x = x + (s[i + 1] - s[i]) * denoiser(x, s[i:i + 1], ctx, mask.float())
    return x


@pytest.mark.parametrize("case", ["single file", "nvlabs, dc-gen embedding", "folder, sin-cos positions"])
def test_denoiser_samples_as_the_sana_pipeline(sana_files, case):
    """Euler steps with the training denoiser (timestep = 1000 sigma, the caption mask) on the model our loader
    builds give the latents SanaPipeline gives with diffusers' own model, base and DC-Gen (128-channel) alike; a
    model with a sin-cos position table (2K/4K SANA) on its native grid uses the table rebuilt after the meta build."""
    from diffusers import SanaTransformer2DModel

    g = torch.Generator().manual_seed(7)
    reference, grid = sana_files["model"], (4, 3)
    if case == "single file":
        ours = load_base_transformer(sana_files["single"])
    elif case == "nvlabs, dc-gen embedding":
        ours = load_base_transformer(sana_files["nvlabs"])
        emb = {"x_embedder.weight": 0.2 * torch.randn(16, C, generator=g),
               "x_embedder.bias": torch.randn(16, generator=g),
               "proj_out.weight": 0.2 * torch.randn(C, 16, generator=g), "proj_out.bias": torch.randn(C, generator=g)}
        install_embedding(ours, C, emb)
        reference = SanaTransformer2DModel(**dict(tiny.SANA_TINY, in_channels=C, out_channels=C)).eval()
        sd = dict(sana_files["model"].state_dict())
        sd.update({"patch_embed.proj.weight": emb["x_embedder.weight"].reshape(16, C, 1, 1),
                   "patch_embed.proj.bias": emb["x_embedder.bias"], "proj_out.weight": emb["proj_out.weight"],
                   "proj_out.bias": emb["proj_out.bias"]})
        reference.load_state_dict(sd, strict=True)
    else:
        reference = sana_files["pe_model"]
        ours, grid = load_base_transformer(sana_files["pe_folder"]), (8, 8)  # the table's own grid
        assert torch.equal(ours.patch_embed.pos_embed, reference.patch_embed.pos_embed)
    x = torch.randn(1, ours.config.in_channels, *grid, generator=g)
    ctx = torch.randn(1, TOKENS, tiny.SANA_CAPTION, generator=g)
    mask = _mask(4).unsqueeze(0).long()
    with torch.no_grad():
        want = _pipeline_latents(reference, x, ctx, mask)
    got = _euler_with(Denoiser(ours), x, ctx, mask)
    err = _rel(got, want)
    print(f"{case}: training denoiser vs SanaPipeline, relative error {err:.1e}")
    assert err <= 1e-6
    # the time scale matters: the transformer at timestep sigma (FLUX's convention) samples something else
    wrong = _euler_with(lambda x, s, c, m: Denoiser(ours)(x, s / 1000, c, m), x, ctx, mask)
    assert _rel(wrong, want) > 1e-3


# --- the objective -------------------------------------------------------------------------------------------------

def test_sana_loss_is_flow_matching_with_sanas_shift(sana_files):
    """One step's loss equals the hand computation from the same generator: logit-normal t shifted with SANA's flow
    shift 3 (the pack's sampler and the authors' SANA trainer), x_t = s eps + (1 - s) x0, v* = eps - x0, the model
    called with the caption mask; no guidance draw. An in-memory cache of family "sana" serves as well as the
    written one."""
    model = load_base_transformer(sana_files["folder"])
    install_embedding(model, C)
    denoiser = Denoiser(model)
    items = _sana_items()
    memory = MemoryCache({k: torch.stack([t[k] for _, _, t in items]) for k in items[0][2]}, family="sana")
    for cache in (LatentCache(sana_files["cache"]), memory):
        loss_fn = denoising_loss(denoiser, cache, _cfg(), "cpu")
        assert loss_fn.objective == "flow"
        got = loss_fn([2, 0], torch.Generator().manual_seed(4))
        g = torch.Generator().manual_seed(4)
        t = torch.sigmoid(torch.randn(2, generator=g, dtype=torch.float64))
        s = (3 * t / (1 + 2 * t)).float()
        assert torch.allclose(sample_sigmas(2, torch.Generator().manual_seed(4), denoiser.time_shift()), s)
        eps = torch.randn(2, C, 4, 4, generator=g)
        b = cache.batch([2, 0], keys=("dcae_latents", "context", "context_mask"))
        assert torch.equal(b["context_mask"][0], _mask(6)) and torch.equal(b["context_mask"][1], _mask(4))
        x0, sv = b["dcae_latents"], s.view(-1, 1, 1, 1)
        with torch.no_grad():
            v = denoiser(sv * eps + (1 - sv) * x0, s, b["context"], b["context_mask"])
            hand = F.mse_loss(v, eps - x0)
        assert abs(got.item() - hand.item()) <= 1e-6 * hand.item()
        with torch.no_grad():  # the mask reaches the model: unmasking the padding changes the loss
            unmasked = F.mse_loss(denoiser(sv * eps + (1 - sv) * x0, s, b["context"], torch.ones(2, TOKENS)), eps - x0)
        assert abs(unmasked.item() - hand.item()) > 1e-4 * hand.item()


# --- align + lora, and the files in ComfyUI -------------------------------------------------------------------------

def _halved_at(losses) -> int:
    return next(i for i, v in enumerate(losses) if v <= 0.5 * losses[0])


@pytest.fixture(scope="module")
def trained(sana_files):
    """align (Adam embedder fit, then the head) on the single-file base, lora on the base with a position table
    (a folder), --overfit."""
    root, cache = sana_files["root"], sana_files["cache"]
    aligned = align(cache, sana_files["single"], str(root / "align"), channels=C, embed_steps=30, embed_lr=0.03,
                    cfg=_cfg(steps=40, lr=2e-2, overfit=True, seed=3), name="sana")
    lora = train_lora(cache, sana_files["pe_folder"], aligned.embedding_path, str(root / "lora"), rank=4, alpha=8,
                      embed_in_lora=True, save_dtype="float32", cfg=_cfg(steps=30, lr=1e-2, overfit=True, seed=1),
                      name="sana")
    return aligned, lora


def test_sana_align_and_lora_overfit(trained):
    aligned, lora = trained
    assert aligned.objective == lora.objective == "flow"
    assert _halved_at(aligned.losses["embed"]) < 30 and _halved_at(aligned.losses["head"]) < 40
    assert _halved_at(lora.losses) < 30
    assert {n for n, p in lora.model.named_parameters() if p.requires_grad} == set()
    modules = {n.rsplit(".lora_A", 1)[0] for n, _ in lora.model.named_parameters() if ".lora_A." in n}
    assert modules == {f"transformer_blocks.{i}.{t}" for i in range(tiny.SANA_TINY["num_layers"])
                       for t in tiny.SANA_LORA_TARGETS}
    emb = load_file(aligned.embedding_path)
    assert {k: tuple(v.shape) for k, v in emb.items()} == {
        "patch_embed.proj.weight": (16, C, 1, 1), "patch_embed.proj.bias": (16,), "proj_out.weight": (C, 16),
        "proj_out.bias": (C,)}
    sd = load_file(lora.lora_path)
    # core ComfyUI reads SANA LoRAs under diffusion_model.<module> only; a LoRA on a 1x1 conv is saved 2-D
    assert sd["diffusion_model.transformer_blocks.0.ff.conv_inverted.lora_A.weight"].shape == (4, 16)
    assert not any(k.startswith("transformer.transformer_blocks.") for k in sd)
    assert "transformer.patch_embed.proj.weight" in sd  # --embed-in-lora
    print(f"SANA over-fit: embed {aligned.losses['embed'][0]:.3f} -> {aligned.losses['embed'][-1]:.3f}, head "
          f"{aligned.losses['head'][0]:.3f} -> {aligned.losses['head'][-1]:.3f}, LoRA {lora.losses[0]:.3f} -> "
          f"{lora.losses[-1]:.3f}")


def _comfy_velocity(m, x, sigma, ctx, mask):
    """One model call as ComfyUI's samplers make it (timestep = 1000 sigma from the model's sampling settings, the
    mask as the SANA model's extra condition); ComfyUI's flow models return x - sigma * v."""
    import comfy.model_management as mm

    mm.load_models_gpu([m])
    opts = {**m.model_options.get("transformer_options", {}), "wrappers": m.wrappers}
    with torch.no_grad():
        denoised = m.model.apply_model(x, torch.tensor([sigma]), c_crossattn=ctx, attention_mask=mask,
                                       transformer_options=opts)
    return (x - denoised) / sigma


def test_trained_sana_files_in_comfyui_equal_the_peft_model(comfyui, sana_files, trained, caplog):
    aligned, lora = trained
    d = comfyui.dirs
    sana_files["model"].save_pretrained(os.path.join(d["diffusion_models"], "train-sana-base"),
                                        safe_serialization=True)
    sana_files["pe_model"].save_pretrained(os.path.join(d["diffusion_models"], "train-sana-pe"),
                                           safe_serialization=True)
    tiny.link_or_copy(aligned.embedding_path, os.path.join(d["dcgen_embeddings"], "train-sana-aligned.safetensors"))
    tiny.link_or_copy(lora.embedding_path, os.path.join(d["dcgen_embeddings"], "train-sana-embedding.safetensors"))
    tiny.link_or_copy(lora.lora_path, os.path.join(d["loras"], "train-sana-lora+emb.safetensors"))
    from dcgen_core.tools.train.finetune import save_trained_lora

    save_trained_lora(os.path.join(d["loras"], "train-sana-lora.safetensors"), lora.model, 8.0, torch.float32,
                      False, {})
    without_embedding = load_file(os.path.join(d["loras"], "train-sana-lora.safetensors"))
    assert "transformer.patch_embed.proj.weight" not in without_embedding

    nodes = comfyui.runtime.node_classes
    base = nodes["DCGenSanaModelLoader"]().load("train-sana-base", "default")[0]
    embedded = nodes["DCGenApplyAlignedEmbedding"]().apply(base, "train-sana-aligned.safetensors")[0]
    base_pe = nodes["DCGenSanaModelLoader"]().load("train-sana-pe", "default")[0]  # the base lora trained on
    with_emb = nodes["DCGenApplyAlignedEmbedding"]().apply(base_pe, "train-sana-embedding.safetensors")[0]
    models = {
        "embedding (align)": embedded,
        "embedding + DC-Gen Load LoRA": nodes["DCGenLoraLoader"]().apply(with_emb, "train-sana-lora.safetensors",
                                                                          1.0)[0],
        "LoRA carrying the embedding": nodes["DCGenLoraLoader"]().apply(base_pe, "train-sana-lora+emb.safetensors",
                                                                         1.0)[0],
        "core LoraLoaderModelOnly": nodes["LoraLoaderModelOnly"]().load_lora_model_only(
            with_emb, "train-sana-lora.safetensors", 1.0)[0]}
    assert "not loaded" not in caplog.text  # core reads every entry of the LoRA
    assert models["embedding (align)"].model_options["dcgen"]["latent_channels"] == C

    g = torch.Generator().manual_seed(21)
    x = torch.randn(1, C, 4, 3, generator=g)
    ctx = torch.randn(1, TOKENS, tiny.SANA_CAPTION, generator=g)
    mask = _mask(5).unsqueeze(0)
    sigma = 0.6
    s = torch.tensor([sigma])
    with torch.no_grad():
        ref_align = Denoiser(aligned.model)(x, s, ctx, mask)
        ref_lora = Denoiser(lora.model)(x, s, ctx, mask)
        lora.model.disable_adapters()
        without_lora = Denoiser(lora.model)(x, s, ctx, mask)
        lora.model.enable_adapters()
    errs = {k: _rel(_comfy_velocity(m, x, sigma, ctx, mask), ref_align if k == "embedding (align)" else ref_lora)
            for k, m in models.items()}
    print("ComfyUI SANA vs PEFT diffusers, relative errors:", {k: f"{v:.1e}" for k, v in errs.items()})
    assert all(v <= TOL for v in errs.values()), errs
    assert _rel(without_lora, ref_lora) > 1e-3  # the LoRA matters in this comparison
    # and so do the position table's values on the 4x3 grid (recomputed from the 8x8 one by both)
    no_table = nodes["DCGenLoraLoader"]().apply(base, "train-sana-lora+emb.safetensors", 1.0)[0]
    assert _rel(_comfy_velocity(no_table, x, sigma, ctx, mask), ref_lora) > 1e-3


def test_training_shift_is_the_shift_the_pack_samples_with(comfyui, sana_files):
    """A pipeline folder whose scheduler config says flow shift 6 (SANA 4K's): training draws its timesteps with 6,
    and the pack's SANA loader, after DC-Gen Add Embedding, samples with 6; without a scheduler config both use 3."""
    import shutil

    pipe = os.path.join(comfyui.dirs["diffusion_models"], "train-sana-pipe")
    shutil.copytree(sana_files["folder"], os.path.join(pipe, "transformer"), dirs_exist_ok=True)
    os.makedirs(os.path.join(pipe, "scheduler"), exist_ok=True)
    with open(os.path.join(pipe, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump({"_class_name": "DPMSolverMultistepScheduler", "flow_shift": 6.0, "use_flow_sigmas": True}, f)
    shutil.copytree(sana_files["folder"], os.path.join(comfyui.dirs["diffusion_models"], "train-sana-plain"),
                    dirs_exist_ok=True)
    emb = os.path.join(comfyui.dirs["dcgen_embeddings"], "train-sana-shift.safetensors")
    save_file({"patch_embed.proj.weight": torch.zeros(16, C, 1, 1), "proj_out.weight": torch.zeros(C, 16)}, emb)
    nodes = comfyui.runtime.node_classes
    for name, want in (("train-sana-pipe", 6.0), ("train-sana-plain", 3.0)):
        trained = Denoiser(load_base_transformer(os.path.join(comfyui.dirs["diffusion_models"], name))).time_shift()
        model = nodes["DCGenSanaModelLoader"]().load(name, "default")[0]
        model = nodes["DCGenApplyAlignedEmbedding"]().apply(model, "train-sana-shift.safetensors")[0]
        sampled = float(model.get_model_object("model_sampling").shift)
        assert trained.value == sampled == want, name
        assert float(trained.apply(torch.tensor(0.5))) == pytest.approx(want * 0.5 / (1 + (want - 1) * 0.5))


def test_sana_cli_align_and_lora(sana_files, tmp_path, capsys):
    """The command line runs both stages on a SANA base (NVlabs keys here) and a SANA cache."""
    cache, base = sana_files["cache"], sana_files["nvlabs"]
    common = ["--no-progress", "--device", "cpu", "--batch-size", "2"]
    assert train_main(["align", cache, base, str(tmp_path / "a"), "--channels", str(C), "--embed-solver", "lstsq",
                       "--steps", "2", *common]) == 0
    emb = str(tmp_path / "a" / "dcgen-embedding.safetensors")
    assert train_main(["lora", cache, base, emb, str(tmp_path / "l"), "--rank", "2", "--alpha", "2", "--steps", "2",
                       *common]) == 0
    out = capsys.readouterr().out
    assert "objective flow" in out and os.path.isfile(tmp_path / "l" / "dcgen-lora.safetensors")


# --- refusals ------------------------------------------------------------------------------------------------------

def test_family_mismatch_and_objective_are_refused(sana_files, tmp_path, tiny_dcgen):
    flux_base = tiny_dcgen.save_base_single_file(str(tmp_path / "flux-base.safetensors"))
    g = torch.Generator().manual_seed(0)
    flux_cache = str(tmp_path / "flux-cache")
    write_cache(flux_cache, [(f"img{i}", "c", {
        "base_latents": torch.randn(16, 16, 16, generator=g), "dcae_latents": torch.randn(C, 2, 2, generator=g),
        "context": torch.randn(tiny.TEXT_TOKENS, tiny.TEXT_DIM, generator=g),
        "pooled": torch.randn(tiny.POOLED_DIM, generator=g)}) for i in range(2)], {}, text_dtype=torch.float32)
    assert LatentCache(flux_cache).family == "flux"  # an index without the field: a FLUX cache
    cfg = _cfg(steps=1)
    with pytest.raises(DCGenError, match="expected a training cache prepared for SANA.*found one prepared for FLUX") \
            as e:
        align(flux_cache, sana_files["folder"], None, channels=C, embed_steps=1, cfg=cfg)
    assert "flux-cache" in str(e.value)
    with pytest.raises(DCGenError, match="expected a training cache prepared for FLUX.*found one prepared for SANA"):
        align(sana_files["cache"], flux_base, None, channels=C, embed_steps=1, cfg=cfg)
    emb = str(tmp_path / "emb.safetensors")
    save_file({"patch_embed.proj.weight": torch.zeros(16, C, 1, 1), "proj_out.weight": torch.zeros(C, 16)}, emb)
    with pytest.raises(DCGenError, match="prepared for FLUX"):
        train_lora(flux_cache, sana_files["single"], emb, None, rank=2, alpha=2, cfg=cfg)
    with pytest.raises(DCGenError, match="prepared for SANA"):
        train_lora(sana_files["cache"], flux_base, emb, None, rank=2, alpha=2, cfg=cfg)
    with pytest.raises(DCGenError, match="guidance-distilled.*SANA.*classifier-free"):
        align(sana_files["cache"], sana_files["folder"], None, channels=C, embed_steps=1,
              cfg=_cfg(steps=1, objective="guidance-distilled"))
    with pytest.raises(DCGenError, match="already a DC-Gen model"):
        model = load_base_transformer(sana_files["folder"])
        install_embedding(model, C)
        align(sana_files["cache"], model, None, channels=C, embed_steps=1, cfg=cfg)
