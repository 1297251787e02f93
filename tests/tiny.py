"""Tiny random DC-Gen-FLUX models saved in the real file layouts, and the diffusers reference pipeline.

The reference reproduces the authors' pipeline from REFERENCE.md with diffusers
only: pack (B, C, h, w) -> (B, h*w, C) row-major with ids [0, row, col],
FlowMatchEulerDiscreteScheduler over linspace(1, 1/steps, steps) with the
official shift, FLUX guidance embedding, then AutoencoderDC.decode(latents /
scaling_factor) and image = clamp(x/2 + 0.5).
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import save_file

from dcgen_core.tools.smoke import fast_random_weights  # noqa: F401  (shared with the smoke run)

LATENT_CHANNELS = 32
SCALING = 0.41407
TEXT_DIM = 32
POOLED_DIM = 16
TEXT_TOKENS = 7

FLUX_CONFIG = dict(
    patch_size=1, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=1, num_single_layers=2,
    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
    guidance_embeds=True, axes_dims_rope=(4, 6, 6),
)

# A DC-AE f32c32 of SANA-1.1 shape, at tiny widths (6 stages, so f = 32 as in the real one).
DCAE_CONFIG = dict(
    in_channels=3, latent_channels=LATENT_CHANNELS, attention_head_dim=8,
    encoder_block_types=["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"],
    decoder_block_types=["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"],
    encoder_block_out_channels=[8, 8, 16, 16, 32, 32], decoder_block_out_channels=[8, 8, 16, 16, 32, 32],
    encoder_layers_per_block=[1, 1, 1, 1, 1, 1], decoder_layers_per_block=[1, 1, 1, 1, 1, 1],
    encoder_qkv_multiscales=[[], [], [], [5], [5], [5]], decoder_qkv_multiscales=[[], [], [], [5], [5], [5]],
    upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
    decoder_act_fns="silu", scaling_factor=SCALING,
)

def dcae15_config() -> dict:
    """A DC-AE-1.5 f64c128 (7 stages, conv-only) at tiny widths, flags from the variant table."""
    from dcgen_core.shared.dcae import VARIANTS

    cfg = VARIANTS["dc-ae-1.5-f64c128"].to_diffusers_dict()
    widths = [8, 16, 32, 32, 64, 64, 64]
    cfg.update(encoder_block_out_channels=widths, decoder_block_out_channels=widths,
               encoder_layers_per_block=[1] * 7, decoder_layers_per_block=[1] * 7)
    return cfg


def tiny_dcae15(seed: int = 2, scale: float = 0.07):
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return _randomize(AutoencoderDC(**dcae15_config()).eval(), seed, scale=scale)


LORA_TARGETS_DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                       "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                       "ff_context.net.2")
LORA_TARGETS_SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
LORA_RANK, LORA_ALPHA = 4, 8.0


def _randomize(model, seed: int, scale: float = 0.08):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(("norm.weight", "norm1.weight", "norm2.weight")) or ".norm" in name and p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def tiny_dcae(seed: int = 1, scale: float = 0.07):
    """A random tiny DC-AE; a small ``scale`` keeps it near-linear, so that colour is linearly
    readable from its latents as it is in trained DC-AEs (used by the preview test)."""
    from diffusers import AutoencoderDC

    torch.manual_seed(seed)
    return _randomize(AutoencoderDC(**DCAE_CONFIG).eval(), seed, scale=scale)


def lora_modules(num_layers: int, num_single_layers: int) -> list[str]:
    mods = [f"transformer_blocks.{i}.{t}" for i in range(num_layers) for t in LORA_TARGETS_DOUBLE]
    mods += [f"single_transformer_blocks.{i}.{t}" for i in range(num_single_layers) for t in LORA_TARGETS_SINGLE]
    return mods


class TinyDCGen:
    """Base FLUX (16 ch, 2x2 patches) + LoRA + aligned embedding, and the merged DC-Gen transformer."""

    def __init__(self, seed: int = 0, latent_channels: int = LATENT_CHANNELS,
                 text_dims: tuple[int, int] = (TEXT_DIM, POOLED_DIM), flux_config: dict | None = None):
        """``text_dims``: (context, pooled) widths it reads; FLUX's real (4096, 768) where a workflow shares its
        text encoder with a full-width FLUX. ``flux_config``: diffusers config entries replacing FLUX_CONFIG's."""
        from diffusers import FluxTransformer2DModel

        self.latent_channels = latent_channels
        config = dict(FLUX_CONFIG, **(flux_config or {}), joint_attention_dim=text_dims[0],
                      pooled_projection_dim=text_dims[1])
        base_cfg = dict(config, patch_size=1, in_channels=64, out_channels=64)
        torch.manual_seed(seed)
        self.base = _randomize(FluxTransformer2DModel(**base_cfg).eval(), seed)
        self.base_config = base_cfg
        g = torch.Generator().manual_seed(seed + 100)
        hidden = config["num_attention_heads"] * config["attention_head_dim"]
        self.embedding = {
            "x_embedder.weight": 0.2 * torch.randn(hidden, latent_channels, generator=g),
            "x_embedder.bias": 0.05 * torch.randn(hidden, generator=g),
            "proj_out.weight": 0.2 * torch.randn(latent_channels, hidden, generator=g),
            "proj_out.bias": 0.05 * torch.randn(latent_channels, generator=g),
        }
        base_sd = self.base.state_dict()
        self.lora = {}  # diffusers layout: transformer.<module>.lora_A/B.weight
        for m in lora_modules(config["num_layers"], config["num_single_layers"]):
            w = base_sd[f"{m}.weight"]
            self.lora[f"transformer.{m}.lora_A.weight"] = 0.3 * torch.randn(LORA_RANK, w.shape[1], generator=g)
            self.lora[f"transformer.{m}.lora_B.weight"] = 0.3 * torch.randn(w.shape[0], LORA_RANK, generator=g)
        self.config = config
        self.dcgen = self.merge(self.base)

    def merge(self, base, embedding: dict | None = None):
        """The DC-Gen transformer: ``base``'s weights + this LoRA (alpha / rank scaled) + the aligned embedding
        (``embedding``: another one)."""
        from diffusers import FluxTransformer2DModel

        merged = {k: v.clone() for k, v in base.state_dict().items()}
        for m in lora_modules(self.config["num_layers"], self.config["num_single_layers"]):
            up, down = self.lora[f"transformer.{m}.lora_B.weight"], self.lora[f"transformer.{m}.lora_A.weight"]
            merged[f"{m}.weight"] += (LORA_ALPHA / LORA_RANK) * up @ down
        merged.update(self.embedding if embedding is None else embedding)
        c = self.latent_channels
        model = FluxTransformer2DModel(**dict(self.config, in_channels=c, out_channels=c)).eval()
        model.load_state_dict(merged, strict=True)
        return model

    # --- files ---------------------------------------------------------------
    def save_dcgen_diffusers_folder(self, folder: str, max_shard_size: str = "40KB"):
        """A sharded diffusers transformer folder (config.json, index json, shards)."""
        self.dcgen.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
        return folder

    def save_base_single_file(self, path: str):
        """Base FLUX in diffusers keys as one safetensors; the config rides in the metadata."""
        save_file({k: v.contiguous() for k, v in self.base.state_dict().items()}, path,
                  metadata={"config": json.dumps(self.base_config)})
        return path

    def save_embedding(self, path: str, layout: str = "diffusers"):
        sd = self.embedding
        if layout == "bfl":
            names = {"x_embedder": "img_in", "proj_out": "final_layer.linear"}
            sd = {names[k.rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]: v for k, v in sd.items()}
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
        return path

    def save_lora(self, path: str, with_embedding: bool = False):
        sd = dict(self.lora)
        if with_embedding:
            sd.update({f"transformer.{k}": v for k, v in self.embedding.items()})
        meta = {"lora_adapter_metadata": json.dumps({"r": LORA_RANK, "lora_alpha": LORA_ALPHA})}
        save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=meta)
        return path


def save_dcae_folder(vae, folder: str):
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def prompt_embeddings(seed: int = 3, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=g),
            torch.randn(batch, POOLED_DIM, generator=g))


def official_shift_value(h: int, w: int, c: int, rule: str | None = None) -> tuple[str, float]:
    """("linear", r) with r = sqrt(tokens * C / 4096) ("flux2", the 1K models'), or ("exponential", mu) (FLUX's
    resolution shift, the 4K models'); ``rule`` None picks by the channel count as the authors' pipelines do."""
    tokens = h * w
    rule = rule or ("linear" if c <= 32 else "exponential")
    if rule == "linear":
        return "linear", math.sqrt(tokens * c / 4096)
    m = (1.15 - 0.5) / (4096 - 256)
    return "exponential", tokens * m + (0.5 - m * 256)


@torch.no_grad()
def reference_images(transformer, vae, width: int, height: int, seed: int, steps: int, guidance: float,
                     cond: torch.Tensor, pooled: torch.Tensor, scaling: float | None = None, batch: int = 1,
                     init_latents: torch.Tensor | None = None, denoise: float = 1.0, rule: str | None = None,
                     shift_size: tuple[int, int] | None = None):
    """The authors' pipeline on diffusers modules; returns (images [B, H, W, 3] in [0, 1], final latents).

    ``rule`` ("linear" / "exponential", see official_shift_value) and ``shift_size`` (width, height the shift is
    computed for; default the sampled size) override the pipeline's choice.

    img2img (``init_latents`` in model space, ``denoise`` < 1): the last ``steps`` of a schedule of
    steps / denoise, starting from sigma * noise + (1 - sigma) * init.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    scaling = vae.config.scaling_factor if scaling is None else scaling
    c = transformer.config.in_channels
    f = 2 ** (len(vae.config.decoder_block_out_channels) - 1)
    h, w = height // f, width // f
    sw, sh = shift_size or (width, height)
    rule, value = official_shift_value(sh // f, sw // f, c, rule)
    total = steps if denoise >= 1.0 else int(steps / denoise)
    base = torch.linspace(1.0, 1.0 / total, total).numpy()
    if rule == "linear":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=value, use_dynamic_shifting=False)
        scheduler.set_timesteps(sigmas=base)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
        scheduler.set_timesteps(sigmas=base, mu=value)
    noise = torch.randn((batch, c, h, w), generator=torch.manual_seed(seed))  # as ComfyUI's prepare_noise
    timesteps = scheduler.timesteps[total - steps:]
    scheduler.set_begin_index(total - steps)
    latents = noise if init_latents is None else scheduler.scale_noise(init_latents, timesteps[:1], noise)
    packed = latents.permute(0, 2, 3, 1).reshape(batch, h * w, c)
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    img_ids = ids.reshape(h * w, 3)
    txt_ids = torch.zeros(cond.shape[1], 3)
    for t in timesteps:
        g = None if guidance is None else torch.full((batch,), guidance)  # None: no guidance embedder (schnell)
        v = transformer(hidden_states=packed, timestep=(t / 1000).expand(batch), guidance=g,
                        pooled_projections=pooled.expand(batch, -1), encoder_hidden_states=cond.expand(batch, -1, -1),
                        txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        packed = scheduler.step(v, t, packed, return_dict=False)[0]
    latents = packed.reshape(batch, h, w, c).permute(0, 3, 1, 2)
    image = vae.decode(latents / scaling).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), latents


# --- full-width FLUX parts for the core ComfyUI loaders --------------------------------------------------------
# ComfyUI detects FLUX (UNETLoader, ControlNetLoader) and its VAE (VAELoader) with the real widths hard-coded, so
# these are full width but as shallow as the loaders allow. torch's default init of ~500M parameters takes ~30 s
# on a small CPU, so their weights come from fast_random_weights instead.

FULL_FLUX = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24,
                 joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FULL_TEXT_DIMS = (4096, 768)  # FLUX's (T5-XXL context, CLIP-L pooled) widths


def _meta_shapes(build) -> dict:
    with torch.device("meta"):
        return {k: v.shape for k, v in build().state_dict().items()}


def full_width_flux_bfl(seed: int = 0) -> dict:
    """A FLUX.1 transformer of the real width (3072, context 4096, pooled 768) with 1 double + 1 single block, in
    BFL keys (as flux1-dev.safetensors) and bf16: what the core Load Diffusion Model detects as FLUX."""
    from diffusers import FluxTransformer2DModel

    from dcgen_core.flux.keys import diffusers_to_bfl

    shapes = _meta_shapes(lambda: FluxTransformer2DModel(**FULL_FLUX, out_channels=64, num_layers=1,
                                                         num_single_layers=1))
    with torch.device("meta"):
        bfl = diffusers_to_bfl({k: torch.empty(s) for k, s in shapes.items()})
    return fast_random_weights({k: v.shape for k, v in bfl.items()}, seed)


def full_width_flux_controlnet(seed: int = 0) -> dict:
    """A diffusers FluxControlNetModel of full FLUX width with one double block (bf16 state dict): what the core
    ControlNetLoader detects as a FLUX ControlNet."""
    from diffusers import FluxControlNetModel

    return fast_random_weights(_meta_shapes(lambda: FluxControlNetModel(**FULL_FLUX, num_layers=1,
                                                                         num_single_layers=0)), seed)


def flux_vae(seed: int = 0) -> dict:
    """The FLUX VAE (diffusers AutoencoderKL, 16 latent channels, no quant convs; bf16 state dict). The core
    VAELoader converts the diffusers keys and builds its fixed 128-wide encoder/decoder, so the width is real."""
    from diffusers import AutoencoderKL

    return fast_random_weights(_meta_shapes(lambda: AutoencoderKL(
        latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False)), seed)


def tiny_upscaler(seed: int = 0, scale: int = 4) -> dict:
    """A Real-ESRGAN Compact (SRVGGNetCompact) upscaler, 8 features and 1 body conv (f32 state dict): what the
    core UpscaleModelLoader (spandrel) loads as a ``scale``x model like 4x-UltraSharp."""
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in Compact(num_feat=8, num_conv=1, upscale=scale).state_dict().items()}


def link_or_copy(src: str, dst: str):
    """Put ``src`` at ``dst`` (a hard link: no second copy of a large file), replacing what was there."""
    import shutil

    if os.path.lexists(dst):
        os.remove(dst)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


# --- SANA ----------------------------------------------------------------------------------------------------------

SANA_CAPTION = 24
SANA_TINY = dict(in_channels=32, out_channels=32, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                 num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                 caption_channels=SANA_CAPTION, sample_size=8, patch_size=1, mlp_ratio=2.5)
SANA_LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                     "attn2.to_v", "attn2.to_out.0", "ff.conv_inverted", "ff.conv_point")


def tiny_sana(seed: int = 11):
    """A tiny random SANA (diffusers SanaTransformer2DModel, DC-AE f32c32 channels)."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    return _randomize(SanaTransformer2DModel(**SANA_TINY).eval(), seed=seed, scale=0.15)


def write_dcgen_sana(sana, embedding_path: str, lora_path: str, channels: int = 128, seed: int = 5):
    """A DC-Gen aligned embedding (``channels``) and LoRA for ``sana`` in their files; returns the merged
    DC-Gen-SANA (diffusers) they make together."""
    from diffusers import SanaTransformer2DModel

    g = torch.Generator().manual_seed(seed)
    hidden = SANA_TINY["num_attention_heads"] * SANA_TINY["attention_head_dim"]
    emb = {"patch_embed.proj.weight": 0.2 * torch.randn(hidden, channels, 1, 1, generator=g),
           "patch_embed.proj.bias": 0.05 * torch.randn(hidden, generator=g),
           "proj_out.weight": 0.2 * torch.randn(channels, hidden, generator=g),
           "proj_out.bias": 0.05 * torch.randn(channels, generator=g)}
    save_file(emb, embedding_path)
    base = sana.state_dict()
    lora, merged = {}, {k: v.clone() for k, v in base.items()}
    for i in range(SANA_TINY["num_layers"]):
        for t in SANA_LORA_TARGETS:
            m = f"transformer_blocks.{i}.{t}"
            w = base[f"{m}.weight"]
            down = 0.3 * torch.randn(LORA_RANK, w.shape[1], generator=g)
            up = 0.3 * torch.randn(w.shape[0], LORA_RANK, generator=g)
            lora[f"transformer.{m}.lora_A.weight"], lora[f"transformer.{m}.lora_B.weight"] = down, up
            merged[f"{m}.weight"] = w + ((LORA_ALPHA / LORA_RANK) * up @ down).reshape(w.shape)
    save_file(lora, lora_path, metadata={"lora_adapter_metadata": json.dumps({"r": LORA_RANK, "lora_alpha": LORA_ALPHA})})
    merged.update(emb)
    model = SanaTransformer2DModel(**dict(SANA_TINY, in_channels=channels, out_channels=channels)).eval()
    model.load_state_dict(merged, strict=True)
    return model
