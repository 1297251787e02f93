"""Tiny random DC-AE-V (and, for the Wan tests, DiT) models in the real file layouts."""

from __future__ import annotations

import torch

WIDTHS = (4, 8, 8, 8, 8, 8, 8)  # the f32t4 layout (7 stages, stage 0 empty), tiny widths
DEPTHS = (0, 1, 1, 1, 1, 1, 1)
LATENT = 32


def authors_config(dc_ae_v, name: str = "dc-ae-v-f32t4c32-1.0", widths=WIDTHS, depths=DEPTHS):
    """The authors' config for ``name`` (their block strings, chunk 40) at tiny widths and depths."""
    fn = dc_ae_v.dc_ae_v_f64t4_chunk_causal if "f64" in name else dc_ae_v.dc_ae_v_f32t4_chunk_causal
    cfg = fn(name, None)
    for side in (cfg.encoder, cfg.decoder):
        side.width_list, side.depth_list = list(widths), list(depths)
    return cfg


def authors_model(dc_ae_v, seed: int = 0, **kw):
    """The authors' DCAEV, tiny, with random norm affines (default init elsewhere keeps activations O(1))."""
    torch.manual_seed(seed)
    model = dc_ae_v.DCAEV(authors_config(dc_ae_v, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "op_list.0." in name and p.ndim == 1:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    return model


def save_pt(model, path: str, ema: bool = True):
    """As the authors' release: {'ema_model_state_dict': {name: state dict}} (or model_state_dict), bf16."""
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    torch.save({"ema_model_state_dict": {"ema": sd}} if ema else {"model_state_dict": sd}, path)


def smooth_video(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A ComfyUI IMAGE batch (frames, H, W, 3) in [0, 1] that moves slowly."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 2, 4, 4, generator=g)
    clip = torch.nn.functional.interpolate(coarse, size=(frames, height, width), mode="trilinear",
                                           align_corners=True)
    return clip[0].permute(1, 2, 3, 0).contiguous()


def tiny_wan(i2v: bool, seed: int = 0, patch=(1, 1, 1)):
    """A tiny diffusers WanTransformer3DModel with the DC-Gen-Wan channel layout (32 in/out; i2v 68 in)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=patch, num_attention_heads=2, attention_head_dim=16, in_channels=68 if i2v else 32,
        out_channels=32, text_dim=24, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280 if i2v else None,
        added_kv_proj_dim=32 if i2v else None, rope_max_seq_len=1024)
    with torch.no_grad():  # diffusers zero-inits nothing here, but make the modulations non-trivial
        for name, p in model.named_parameters():
            if "scale_shift_table" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save_wan_folder(model, folder: str, flow_shift: float | None = 5.0):
    """The release layout: <folder>/ (config.json + safetensors) and ../scheduler/scheduler_config.json."""
    import json
    import os

    model.save_pretrained(folder, safe_serialization=True)
    if flow_shift is not None:
        sched = os.path.join(os.path.dirname(os.path.normpath(folder)), "scheduler")
        os.makedirs(sched, exist_ok=True)
        with open(os.path.join(sched, "scheduler_config.json"), "w") as f:
            json.dump({"_class_name": "UniPCMultistepScheduler", "flow_shift": flow_shift, "use_flow_sigmas": True,
                       "prediction_type": "flow_prediction", "num_train_timesteps": 1000}, f)
