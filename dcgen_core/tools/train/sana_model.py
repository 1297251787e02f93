"""The base SANA as a diffusers ``SanaTransformer2DModel`` for training DC-Gen-SANA: loading any layout the pack's
SANA loader reads, swapping in a DC-Gen embedder/head (``patch_embed.proj`` as a 1x1 conv on C channels,
``proj_out``), and the denoiser call as diffusers' ``SanaPipeline`` makes it.

Same interface as model.py (FLUX), so that alignment.py and finetune.py serve both families (families.py picks the
module). SANA patchifies 1x1 already: no token view, the model takes (B, C, h, w) latents and its own positional
embedding (when its config has one) follows the grid, as in the pack's SANA model.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from ...sana.comfy_model import read_sana_release
from ...sana.release import SANA_FLOW_SHIFT
from ...shared.checkpoints import check_tensors_match, owned
from ...shared.errors import DCGenError
from ...shared.schedules import LINEAR, TimeShift
from .model import new_linear, write_embedding

#: PEFT targets: the self- and cross-attention q/k/v/out linears and the 1x1 convs of the GLUMBConv feed-forward of
#: every block (the depthwise 3x3 conv and the new head are not LoRA targets). Matched with re.fullmatch.
LORA_TARGET_REGEX = r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.(conv_inverted|conv_point))"

#: LoRA key prefix: core ComfyUI knows no diffusers naming for SANA (it has no SANA), only ``diffusion_model.<param>``;
#: the pack reads both (as the SANA extractor writes it).
LORA_KEY_PREFIX = "diffusion_model."
#: SANA's own DC-AE (f32c32): the latent channels of a base SANA, the alignment teacher's input.
BASE_CHANNELS = 32
#: Flow-matching timestep scale: diffusers' SANA schedulers use timesteps = sigma * 1000 (ComfyUI's multiplier).
NUM_TRAIN_TIMESTEPS = 1000


def read_base_state_dict(path: str) -> tuple[dict, dict, float]:
    """(diffusers-keyed state dict of mapped views, SanaTransformer2DModel config, flow shift) of a base SANA
    transformer file or folder (diffusers or original NVlabs/Sana keys; the pack's SANA loader's reader, and the
    flow shift the pack samples it and its DC-Gen-SANA with: the release's scheduler config, else by size)."""
    sd, cfg, shift, _ = read_sana_release(path)
    if cfg.guidance_embeds:
        raise DCGenError(f"{path}: expected a SANA sampled with classifier-free guidance (SANA 1.0 / 1.5), found a "
                         "SANA-Sprint (guidance embedding): a distilled few-step model, not a base DC-Gen post-trains.")
    if cfg.patch_size != 1:
        raise DCGenError(f"{path}: expected a SANA with 1x1 patches (DC-Gen replaces a 1x1 patch embedder), found "
                         f"patch size {cfg.patch_size}.")
    return sd, cfg.to_diffusers_config(), shift


def _fill_position_table(model, device):
    """The patch embedder's sin-cos table is a non-persistent buffer: built on the meta device, it is recomputed
    here as diffusers' PatchEmbed builds it."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    pe = model.patch_embed
    if getattr(pe, "pos_embed", None) is not None and pe.pos_embed.is_meta:
        table = get_2d_sincos_pos_embed(pe.proj.out_channels, int(pe.pos_embed.shape[1] ** 0.5),
                                        base_size=pe.base_size, interpolation_scale=pe.interpolation_scale,
                                        output_type="pt")
        pe.register_buffer("pos_embed", table.float().unsqueeze(0).to(device), persistent=False)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise DCGenError(f"SANA transformer: expected every buffer to be rebuilt after loading, found {left}.")


def load_base_transformer(path: str, dtype: torch.dtype = torch.float32, device="cpu"):
    """A frozen diffusers SanaTransformer2DModel from ``path``, built on the meta device and filled one tensor at a
    time in ``dtype``. ``model.flow_shift``: the base's flow shift (the training timesteps' shift)."""
    from diffusers import SanaTransformer2DModel

    sd, config, shift = read_base_state_dict(path)
    with torch.device("meta"):
        model = SanaTransformer2DModel.from_config(config)
    check_tensors_match(model.state_dict(), sd, path, "a SANA transformer of its config")
    model.load_state_dict({k: owned(sd.pop(k), dtype).to(device) for k in list(sd)}, strict=True, assign=True)
    _fill_position_table(model, device)
    model.source = os.path.abspath(path)
    model.flow_shift = shift
    return model.eval().requires_grad_(False)


def hidden_size(model) -> int:
    return int(model.config.num_attention_heads * model.config.attention_head_dim)


def base_embedder(model) -> nn.Conv2d:
    """The frozen base SANA's patch embedder (the alignment teacher); refuses a model that is already DC-Gen."""
    proj = model.patch_embed.proj
    if proj.in_channels != BASE_CHANNELS:
        raise DCGenError(f"{getattr(model, 'source', 'base transformer')}: expected the base SANA ({BASE_CHANNELS} "
                         f"channels of its DC-AE f32c32), found a patch embedder of {proj.in_channels} channels "
                         "(already a DC-Gen model?).")
    return proj


def install_embedding(model, channels: int, embedding: dict | None = None, device=None):
    """Give ``model`` a 1x1 conv embedder [hidden, C, 1, 1] and head [C, hidden] (fp32): from ``embedding`` (the
    four tensors under FLUX's diffusers names, as :func:`~.model.read_embedding` gives them for any layout), else
    freshly initialised (xavier-uniform, zero bias: a 1x1 conv has the fan-in and fan-out of the linear).
    Returns the two modules."""
    hidden = hidden_size(model)
    device = device or model.patch_embed.proj.weight.device
    embedder = nn.Conv2d(channels, hidden, kernel_size=1, device=device, dtype=torch.float32)
    nn.init.xavier_uniform_(embedder.weight)
    nn.init.zeros_(embedder.bias)
    head = new_linear(hidden, channels, device)
    if embedding is not None:
        with torch.no_grad():
            embedder.weight.copy_(embedding["x_embedder.weight"].reshape(hidden, channels, 1, 1))
            embedder.bias.copy_(embedding["x_embedder.bias"])
            head.weight.copy_(embedding["proj_out.weight"])
            head.bias.copy_(embedding["proj_out.bias"])
    model.patch_embed.proj, model.proj_out = embedder, head
    model.register_to_config(in_channels=channels, out_channels=channels)
    return embedder, head


def embedding_state_dict(model) -> dict:
    """The four aligned-embedding tensors under SANA's diffusers names (fp32 copies; the embedder as the 1x1 conv
    weight [hidden, C, 1, 1] the pack's SANA embedding patch and the extractor use)."""
    proj, head = model.patch_embed.proj, model.proj_out
    return {"patch_embed.proj.weight": proj.weight.detach().float().cpu().clone(),
            "patch_embed.proj.bias": proj.bias.detach().float().cpu().clone(),
            "proj_out.weight": head.weight.detach().float().cpu().clone(),
            "proj_out.bias": head.bias.detach().float().cpu().clone()}


def save_embedding(path: str, model, metadata: dict | None = None) -> str:
    return write_embedding(path, embedding_state_dict(model), metadata)


class Denoiser:
    """``F(x_t, sigma, context, context_mask)``: the velocity for a (B, C, h, w) latent, as ``SanaPipeline`` calls
    the transformer (timestep = sigma * 1000 * timestep_scale, the caption's attention mask).

    Training timesteps are shifted with the base's flow shift, sigma = k s / (1 + (k - 1) s) whatever the latent:
    the shift the pack samples the base and its DC-Gen-SANA with, and, as in the authors' SANA trainer (one
    ``flow_shift`` for its training sigmas and its DPM-Solver sampling), the one training draws with. ``k``:
    ``model.flow_shift`` (set by :func:`load_base_transformer`), else SANA's 3.0."""

    text_keys = ("context", "context_mask")
    guidance_embeds = False  # SANA samples with classifier-free guidance: no guidance embedding

    def __init__(self, model, runtime=None):
        self.model = model
        self.runtime = runtime
        self.shift = TimeShift(LINEAR, float(getattr(model, "flow_shift", SANA_FLOW_SHIFT)))

    def time_shift(self, x0: torch.Tensor | None = None) -> TimeShift:
        return self.shift

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor,
                 guidance: torch.Tensor | None = None) -> torch.Tensor:
        if guidance is not None:
            raise DCGenError("SANA denoiser: expected no guidance value (SANA has no guidance embedding), found one.")
        timestep = sigma.reshape(-1).expand(x.shape[0]) * NUM_TRAIN_TIMESTEPS * self.model.config.timestep_scale
        ctx = self.runtime.autocast_context() if self.runtime is not None else contextlib.nullcontext()
        with ctx:
            out = self.model(x, encoder_hidden_states=context, encoder_attention_mask=context_mask,
                             timestep=timestep, return_dict=False)[0]
        return out.float()


def teacher_tokens(embedder: nn.Conv2d, base_latent: torch.Tensor) -> torch.Tensor:
    """The frozen base patch embedder's tokens on SANA's own DC-AE latent as a grid (B, hidden, H, W)."""
    weight = embedder.weight
    return F.conv2d(base_latent.to(weight.dtype), weight, embedder.bias).float()
