"""DC-Gen for SANA: the aligned embedding moves a SANA MODEL into another DC-AE latent space (DC-AE-1.5 f64c128
for native 4K), as for FLUX. SANA patchifies 1x1 already, so no token view is needed: only its patch embedder
(``patch_embed.proj``, a 1x1 conv) and head (``proj_out``) are replaced, on a clone, and the DC-AE facts the
model carries follow (latent format, sizes); the flow shift stays the base model's. The DC-Gen LoRA is applied
by the shared LoRA loader.
"""

from __future__ import annotations

from ..shared.errors import DCGenError
from ..shared.embedding import AlignedEmbedding, check_embedding_for_model
from ..shared.latent_space import dcgen_info, linear_like, make_latent_format, resolve_scaling
from .comfy_model import require_sana, sana_info


def apply_aligned_embedding(model, emb: AlignedEmbedding, vae=None, clone: bool = True):
    """A clone of a SANA ``model`` that samples the DC-AE latents of ``emb`` (``emb.latent_channels`` channels)."""
    dm = require_sana(model, subject=emb.source)
    if dm.config.patch_size != 1:
        raise DCGenError(f"{emb.source}: expected a SANA with 1x1 patches (DC-Gen replaces a 1x1 patch embedder), "
                         f"found patch size {dm.config.patch_size}.")
    check_embedding_for_model(emb, hidden_size=dm.config.hidden_size, source=emb.source)
    c = emb.latent_channels
    scaling = resolve_scaling(c, vae, emb.source)
    info = dcgen_info(model) or {}
    if info.get("dcgen") and info["latent_channels"] != c:
        raise DCGenError(
            f"{emb.source}: expected an aligned embedding for {info['latent_channels']}-channel DC-AE latents (this "
            f"model already samples them), found one for {c} channels. Apply it to the base SANA model instead.")
    m = model.clone() if clone else model
    fallback = getattr(model.model, "manual_cast_dtype", None)
    embedder = emb.img_in_weight.reshape(emb.hidden_size, c, 1, 1)
    m.add_object_patch("diffusion_model.patch_embed.proj",
                       linear_like(dm.patch_embed.proj, embedder, emb.img_in_bias, fallback))
    m.add_object_patch("diffusion_model.proj_out", linear_like(dm.proj_out, emb.out_weight, emb.out_bias, fallback))
    m.add_object_patch("latent_format", make_latent_format(c, scaling))
    # the base model's flow shift stays (its release's scheduler config or its size's default): DC-Gen-SANA samples
    # on the base SANA's schedule
    shift = float(model.get_model_object("model_sampling").shift)
    m.model_options["dcgen"] = {**sana_info(c, scaling, shift), "dcgen": True}
    if info.get("shift"):
        m.model_options["dcgen"]["shift"] = info["shift"]
    return m
