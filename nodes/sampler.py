"""The DC-Gen sampler node (text-to-image and img2img up to 4096x4096)."""

from ..dcgen_core.shared.dpm_flow import SOLVER_TYPES, dpm_flow_sampler
from ..dcgen_core.shared.sampling import sample
from ..dcgen_core.shared.schedules import FLOW_SCHEDULES, flow_schedule_sigmas
from .latent import MAX_RESOLUTION


class DCGenSampler:
    DESCRIPTION = ("Sample a DC-Gen model with the official schedule at its native size (1024 or 4096) or any size on its "
                   "DC-AE grid; connect a LATENT for img2img and the DC-AE VAE to also get the IMAGE.")
    OUTPUT_TOOLTIPS = ("The sampled DC-AE latent (decode it with the DC-AE, or refine it further).",
                       "The image, decoded with the connected DC-AE VAE (None when no VAE is connected).")
    SEARCH_ALIASES = ["dcgen", "4k", "2k", "1k", "sampler", "ksampler", "text to image", "img2img", "flux", "sana"]
    CATEGORY = "DC-Gen/sampling"
    RETURN_TYPES = ("LATENT", "IMAGE")
    RETURN_NAMES = ("latent", "image")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers

        size = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 32,
                "tooltip": "Image size in pixels. 0 x 0: the model's native size (1024 for the 1K model, 4096 for the "
                           "4K model), or the connected LATENT's size. Otherwise a multiple of the model's DC-AE f "
                           "(32 for 1K, 64 for 4K) within its range (1K model: up to 2048 per side)."}
        return {"required": {
            "model": ("MODEL", {"tooltip": "A DC-Gen model (DC-Gen Load Model, or FLUX + embedding + LoRA)."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt, from CLIP Text Encode (FLUX's CLIP-L + T5-XXL)."}),
            "width": ("INT", size),
            "height": ("INT", size),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                   "tooltip": "Images per run (with a LATENT: 1, or its batch)."}),
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Sampling steps (official: 20)."}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1,
                                   "tooltip": "FLUX: the guidance embedding (official 3.5). SANA: the classifier-free "
                                              "guidance scale (official 4.5), with the negative connected."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "Noise seed (the same noise as KSampler with this seed)."}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "euler",
                                                                "tooltip": "euler = the official sampler."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "simple",
                                                              "tooltip": "simple = the official linspace schedule."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Below 1 with a LATENT: img2img refinement strength."}),
        }, "optional": {
            "latent": ("LATENT", {"tooltip": "img2img: a DC-AE latent of this model (e.g. VAE Encode with the DC-AE)."}),
            "vae": ("VAE", {"tooltip": "The model's DC-AE: also decode to IMAGE (tiles when memory is short)."}),
            "negative": ("CONDITIONING", {"tooltip": "SANA and DC-Gen-Qwen-Image-Edit only: the negative prompt "
                                                     "(official: \"\" / \" \"), for classifier-free guidance. FLUX "
                                                     "ignores it (guidance-distilled)."}),
        }}

    def run(self, model, positive, width, height, batch_size, steps, guidance, seed, sampler_name, scheduler,
            denoise, latent=None, vae=None, negative=None):
        return sample(model, positive, width, height, steps, guidance, seed, sampler_name, scheduler, denoise,
                      latent=latent, vae=vae, negative=negative, batch_size=batch_size)


class DCGenFlowSigmas:
    DESCRIPTION = ("SIGMAS of diffusers' flow-matching schedulers (FlowMatchEuler or SANA's DPM-Solver++ flow) for "
                   "SamplerCustomAdvanced; with the matching sampler they reproduce diffusers step for step.")
    OUTPUT_TOOLTIPS = ("The sigmas (final 0 included), for SamplerCustomAdvanced.",)
    SEARCH_ALIASES = ["dcgen", "sana", "sigmas", "scheduler", "flow match", "dpm-solver", "shift"]
    CATEGORY = "DC-Gen/sampling"
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Sampling steps (SANA: 20)."}),
            "shift": ("FLOAT", {"default": 3.0, "min": 0.01, "max": 100.0, "step": 0.01,
                                "tooltip": "Flow shift: sigma = shift * t / (1 + (shift - 1) * t) (SANA: 3.0; SANA 4K: "
                                           "6.0; DC-Gen Load SANA logs the model's)."}),
            "schedule": (list(FLOW_SCHEDULES), {
                "tooltip": "Which diffusers scheduler's sigmas to reproduce. 'flow-match euler (diffusers)': "
                           "FlowMatchEulerDiscreteScheduler, sample with euler. 'dpm-solver++ flow (diffusers)': "
                           "DPMSolverMultistepScheduler (SANA's official DPM-Solver++), sample with DC-Gen "
                           "DPM-Solver++ Flow (SANA)."}),
        }}

    def run(self, steps, shift, schedule):
        return (flow_schedule_sigmas(schedule, steps, shift),)


class DCGenDPMSolverFlowSampler:
    DESCRIPTION = ("SANA's official scheduler (diffusers' DPM-Solver++ 2M on flow sigmas) as a SAMPLER for "
                   "SamplerCustomAdvanced, with DC-Gen Flow Sigmas 'dpm-solver++ flow'; matches SanaPipeline where core "
                   "DPM++ 2M differs.")
    SEARCH_ALIASES = ["dcgen", "sana", "dpm-solver++", "dpmpp", "dpm++ 2m", "flow", "sampler"]
    CATEGORY = "DC-Gen/sampling"
    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("The sampler, for SamplerCustomAdvanced (with DC-Gen Flow Sigmas 'dpm-solver++ flow').",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "solver_type": (list(SOLVER_TYPES), {
                "default": "midpoint",
                "tooltip": "The second-order update of diffusers' solver_type: midpoint is SANA's (its "
                           "scheduler_config); heun is diffusers' other choice."}),
        }}

    def run(self, solver_type):
        return (dpm_flow_sampler(solver_type),)


SAMPLER_NODES = {"DCGenSampler": (DCGenSampler, "DC-Gen Sampler 4K"),
                 "DCGenFlowSigmas": (DCGenFlowSigmas, "DC-Gen Flow Sigmas"),
                 "DCGenDPMSolverFlowSampler": (DCGenDPMSolverFlowSampler, "DC-Gen DPM++ Flow")}
