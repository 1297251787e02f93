"""DC-Gen-Wan2.1 t2v and i2v sampled through ComfyUI's executor vs the authors' DCVideoGenWan pipelines.

Same tiny random WanTransformer3DModel (DC-Gen channel layout, 1x1x1 patches), fixed text / CLIP-vision
embeddings, same noise, CFG 5, UniPC with the shipped flow scheduler config, DC-AE-V (tiny, the authors' modules)
for the i2v condition. Routes: the pack's DC-Gen UniPC Flow sampler + sigmas (diffusers' scheduler, integer
timesteps); core KSampler uni_pc / uni_pc_bh2 (measured, reported, not asserted). Tolerance 1e-3 (float32 on CPU).
"""

import os

import pytest
import torch

import tiny_video
from authors_dc_gen import dc_videogen

TOL = 1e-3
STEPS, FRAMES, H, W = 6, 8, 64, 96  # 2 latent frames of 2x3
SHIFT = 5.0
TEXT_TOKENS = 512  # diffusers' Wan attention assumes 512 text tokens (the pipelines pad to it)


class _AE(torch.nn.Module):
    """As the authors' AEWrapper (pipeline_dc_videogen.py), around a tiny DCAEV of their own modules."""

    def __init__(self, ae):
        super().__init__()
        self.ae = ae
        self.config = type("C", (), {"scale_factor_temporal": 4, "scale_factor_spatial": 32, "z_dim": 32,
                                     "scaling_factor": 0.7241})()

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    @property
    def device(self):
        return next(self.parameters()).device

    def encode(self, video):
        return self.ae.encode(video)

    def decode(self, latents, return_dict=True):
        return (self.ae.decode(latents), None)


class _Stub(torch.nn.Module):
    """Stands for the text / image encoder the pipelines move between devices (the embeddings are given)."""

    device = torch.device("cpu")
    dtype = torch.float32


class _FixedImageEncoder(_Stub):
    """The pipeline's image encoder giving the fixed CLIP embeddings (its ``hidden_states[-2]``)."""

    def __init__(self, embeds):
        super().__init__()
        self.embeds = embeds

    def forward(self, **kwargs):
        return type("Out", (), {"hidden_states": (None, self.embeds, None)})()


class _Processor:
    def __call__(self, images=None, return_tensors=None):
        return _Batch()


class _Batch(dict):
    def to(self, device):
        return self


class TestClipVision:
    CATEGORY = "_test"
    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    FUNCTION = "run"
    EMBEDS = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": "clip"})}}

    def run(self, key):
        out = type("Out", (), {})()
        out.penultimate_hidden_states = self.EMBEDS[key].clone()
        return (out,)


@pytest.fixture(scope="module")
def setup(comfyui):
    from diffusers import UniPCMultistepScheduler

    comfyui.runtime.register({"TestClipVision": TestClipVision})
    authors_ae = dc_videogen("dc_ae_v")
    ref_ae = tiny_video.authors_model(authors_ae, seed=11)
    tiny_video.save_pt(ref_ae, os.path.join(comfyui.dirs["vae"], "dc-ae-v-wan-tiny.pt"))
    ref_ae = ref_ae.to(torch.bfloat16).float()
    models = {}
    for i2v in (False, True):
        m = tiny_video.tiny_wan(i2v, seed=21 + i2v)
        folder = os.path.join(comfyui.dirs["diffusion_models"], "dcgen-wan-sampling", "transformer_" +
                              ("i2v" if i2v else "t2v"))
        tiny_video.save_wan_folder(m, folder, flow_shift=SHIFT)
        models[i2v] = m
    g = torch.Generator().manual_seed(3)
    emb = {"pos": torch.randn(1, TEXT_TOKENS, 24, generator=g), "neg": torch.randn(1, TEXT_TOKENS, 24, generator=g)}
    for k, v in emb.items():
        comfyui.test_nodes.EMBEDDINGS[f"wan-{k}"] = (v, torch.zeros(1, 1))
    clip = torch.randn(1, 257, 1280, generator=g)
    TestClipVision.EMBEDS["wan"] = clip
    image = tiny_video.smooth_video(1, H, W, seed=4)  # (1, H, W, 3) in [0, 1]
    comfyui.test_nodes.IMAGES["wan-start"] = image
    scheduler_config = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT,
                            solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
                            final_sigmas_type="zero", num_train_timesteps=1000)
    return dict(ae=_AE(ref_ae), models=models, emb=emb, clip=clip, image=image,
                scheduler=lambda: UniPCMultistepScheduler(**scheduler_config))


def _noise(seed):
    import comfy.sample

    return comfy.sample.prepare_noise(torch.zeros(1, 32, FRAMES // 4, H // 32, W // 32), seed)


def _prompt(i2v: bool, route: str, seed: int) -> dict:
    name = "dcgen-wan-sampling/transformer_" + ("i2v" if i2v else "t2v")
    p = {
        "1": {"class_type": "DCGenWanModelLoader", "inputs": {"unet_name": name, "weight_dtype": "fp32"}},
        "2": {"class_type": "TestPromptEmbeds", "inputs": {"key": "wan-pos"}},
        "3": {"class_type": "TestPromptEmbeds", "inputs": {"key": "wan-neg"}},
        "4": {"class_type": "DCGenDCAEVLoader", "inputs": {"vae_name": "dc-ae-v-wan-tiny.pt", "variant": "auto"}},
    }
    if i2v:
        p["5"] = {"class_type": "DCGenWanImageToVideo", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "vae": ["4", 0], "width": W, "height": H, "length": FRAMES + 1,
            "batch_size": 1, "clip_vision_output": ["12", 0], "start_image": ["13", 0]}}
        p["12"] = {"class_type": "TestClipVision", "inputs": {"key": "wan"}}
        p["13"] = {"class_type": "TestImage", "inputs": {"key": "wan-start"}}
        pos, neg, latent = ["5", 0], ["5", 1], ["5", 2]
    else:
        p["5"] = {"class_type": "DCGenEmptyDCAEVLatentVideo", "inputs": {
            "vae": ["4", 0], "width": W, "height": H, "length": FRAMES + 1, "batch_size": 1}}
        pos, neg, latent = ["2", 0], ["3", 0], ["5", 0]
    if route == "pack":
        p["6"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}}
        p["7"] = {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": pos, "negative": neg,
                                                        "cfg": 5.0}}
        p["8"] = {"class_type": "DCGenUniPCFlowSampler", "inputs": {}}
        p["9"] = {"class_type": "DCGenUniPCFlowSigmas", "inputs": {"model": ["1", 0], "steps": STEPS, "shift": 0.0}}
        p["10"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["6", 0], "guider": ["7", 0], "sampler": ["8", 0], "sigmas": ["9", 0], "latent_image": latent}}
    else:
        p["10"] = {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": STEPS, "cfg": 5.0, "sampler_name": route, "scheduler": "simple",
            "positive": pos, "negative": neg, "latent_image": latent, "denoise": 1.0}}
    p["11"] = {"class_type": "TestCapture", "inputs": {"key": "wan-out", "latent": ["10", 0]}}
    return p


def _authors(setup, i2v: bool, noise):
    kw = dict(prompt_embeds=setup["emb"]["pos"], negative_prompt_embeds=setup["emb"]["neg"], height=H, width=W,
              num_frames=FRAMES + 1, num_inference_steps=STEPS, guidance_scale=5.0, latents=noise.clone(),
              output_type="latent", return_dict=False)
    if i2v:
        mod = dc_videogen("pipeline_dc_videogen_wan_i2v")
        pipe = mod.DCVideoGenWanImageToVideoPipeline(
            tokenizer=None, text_encoder=_Stub(), vae=setup["ae"], scheduler=setup["scheduler"](),
            image_processor=_Processor(), image_encoder=_FixedImageEncoder(setup["clip"]),
            transformer=setup["models"][True])
        kw.update(image=setup["image"].permute(0, 3, 1, 2))
    else:
        mod = dc_videogen("pipeline_dc_videogen_wan_t2v")
        pipe = mod.DCVideoGenWanTextToVideoPipeline(
            tokenizer=None, text_encoder=_Stub(), vae=setup["ae"], scheduler=setup["scheduler"](),
            transformer=setup["models"][False])
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(**kw)[0]


def _run(comfyui, i2v, route, seed):
    comfyui.runtime.run(_prompt(i2v, route, seed))
    return comfyui.test_nodes.CAPTURED["wan-out"]["latent"]["samples"] * 0.7241  # LATENT is latent / scaling


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v"])
def test_pack_route_matches_the_authors_pipeline(comfyui, setup, i2v):
    seed = 5
    want = _authors(setup, i2v, _noise(seed))
    got = _run(comfyui, i2v, "pack", seed)
    assert got.shape == want.shape == (1, 32, FRAMES // 4, H // 32, W // 32)
    diff = (got - want).abs().max().item()
    print(f"\n{'i2v' if i2v else 't2v'} pack UniPC flow route: max |diff| {diff:.2e} (scale {want.abs().max():.2f})")
    assert diff <= TOL
    for route in ("uni_pc", "uni_pc_bh2"):  # core's samplers on core's "simple" sigmas: measured, not asserted
        core = _run(comfyui, i2v, route, seed)
        print(f"{'i2v' if i2v else 't2v'} core KSampler {route}/simple: max |diff| "
              f"{(core - want).abs().max().item():.2e}")


def test_i2v_without_image_is_refused(comfyui, setup):
    p = _prompt(True, "pack", 1)
    p["5"]["inputs"].pop("start_image")
    with pytest.raises(RuntimeError, match="expected image conditioning, found no the start image"):
        comfyui.runtime.run(p)


@pytest.mark.parametrize("bad", ["image-dcae", "wan-vae", "empty-image"])
def test_wrong_latents_are_refused(comfyui, setup, bad):
    """An image-VAE latent, a Wan2.1 VAE latent, or a core empty image latent into DC-Gen-Wan: errors naming what
    was expected (core alone would sample a 1-frame video, or Wan's 1/8 grid)."""
    latent = {"image-dcae": torch.randn(1, 32, 2, 3), "wan-vae": torch.randn(1, 16, 3, 8, 12),
              "empty-image": torch.zeros(1, 4, 8, 12)}[bad]
    model = comfyui.runtime.node_classes["DCGenWanModelLoader"]().load("dcgen-wan-sampling/transformer_t2v", "fp32")[0]
    pos = [[setup["emb"]["pos"], {}]]
    with pytest.raises(ValueError, match="expected a DC-AE-V video latent" + (".*Wan2.1's VAE" if bad == "wan-vae"
                                                                               else ".*image latent")):
        comfyui.runtime.node_classes["KSampler"]().sample(model, 1, 1, 5.0, "euler", "simple", pos, pos,
                                                          {"samples": latent})
