"""The DC-Gen sampler node (text-to-image and img2img up to 4096x4096)."""

from ..dcgen_core.shared.dpm_flow import SOLVER_TYPES, dpm_flow_sampler
from ..dcgen_core.shared.sampling import sample
from ..dcgen_core.shared.schedules import FLOW_SCHEDULES, flow_schedule_sigmas
from .latent import MAX_RESOLUTION


class DCGenSampler:
    DESCRIPTION = ("Sample a DC-Gen model with the official schedule (euler/simple, time shift for the size, FLUX "
                   "guidance), at the model's native size (1024 or 4096) or any size on its DC-AE grid. Connect a "
                   "LATENT for img2img (width/height 0 then follow it); connect the DC-AE VAE to also get the IMAGE.")
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
            "model": ("MODEL", {"tooltip": "A DC-Gen model (Load DC-Gen Diffusion Model, or FLUX + embedding + LoRA)."}),
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
            "negative": ("CONDITIONING", {"tooltip": "SANA models only: the negative prompt (official: \"\"), for "
                                                     "classifier-free guidance. FLUX ignores it (guidance-distilled)."}),
        }}

    def run(self, model, positive, width, height, batch_size, steps, guidance, seed, sampler_name, scheduler,
            denoise, latent=None, vae=None, negative=None):
        return sample(model, positive, width, height, steps, guidance, seed, sampler_name, scheduler, denoise,
                      latent=latent, vae=vae, negative=negative, batch_size=batch_size)


class DCGenFlowSigmas:
    DESCRIPTION = ("Sigmas (final 0 included) of a diffusers flow-matching scheduler, for SamplerCustomAdvanced.\n"
                   "'flow-match euler (diffusers)': FlowMatchEulerDiscreteScheduler(shift); with KSamplerSelect "
                   "'euler' it reproduces SANA's diffusers pipelines on that scheduler step for step.\n"
                   "'dpm-solver++ flow (diffusers)': DPMSolverMultistepScheduler(use_flow_sigmas, flow_shift=shift), "
                   "SANA's official (default) scheduler; sample with DC-Gen DPM-Solver++ Flow (SANA), which "
                   "reproduces diffusers' SanaPipeline (within 2e-6 on a tiny SANA transformer: 20 steps, cfg 4.5, "
                   "masked 300-token prompt and negative). Core SamplerDPMPP_2M_SDE with eta 0 and solver_type "
                   "midpoint takes the same solver steps but feeds the model 1000 * sigma where diffusers feeds the "
                   "integer timesteps int(1000 * sigma), and starts from sigma0 * noise (sigma0 = 0.99967 at shift "
                   "3) where diffusers starts from the noise: about 6e-2 off on that transformer. No KSamplerSelect "
                   "name is exact: 'dpmpp_2m' takes its second-order step ratios in log-sigma rather than the "
                   "flow's log-SNR, and 'dpmpp_2m_sde' there has eta 1 (adds noise).")
    CATEGORY = "DC-Gen/sampling"
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Sampling steps (SANA: 20)."}),
            "shift": ("FLOAT", {"default": 3.0, "min": 0.01, "max": 100.0, "step": 0.01,
                                "tooltip": "Flow shift: sigma = shift * t / (1 + (shift - 1) * t) (SANA: 3.0)."}),
            "schedule": (list(FLOW_SCHEDULES), {
                "tooltip": "Which diffusers scheduler's sigmas to reproduce. 'flow-match euler (diffusers)': "
                           "FlowMatchEulerDiscreteScheduler, sample with euler. 'dpm-solver++ flow (diffusers)': "
                           "DPMSolverMultistepScheduler (SANA's official DPM-Solver++), sample with DC-Gen "
                           "DPM-Solver++ Flow (SANA)."}),
        }}

    def run(self, steps, shift, schedule):
        return (flow_schedule_sigmas(schedule, steps, shift),)


class DCGenDPMSolverFlowSampler:
    DESCRIPTION = ("SANA's official scheduler as a SAMPLER for SamplerCustomAdvanced: diffusers' "
                   "DPMSolverMultistepScheduler (DPM-Solver++ order 2 on flow sigmas, as SanaPipeline runs it). Use "
                   "it with DC-Gen Flow Sigmas 'dpm-solver++ flow (diffusers)' (shift 3.0, 20 steps) and CFGGuider "
                   "(cfg 4.5). Beyond the solver steps of core SamplerDPMPP_2M_SDE (eta 0) it feeds the model "
                   "diffusers' integer timesteps int(1000 * sigma) and, from an empty latent, starts from the noise "
                   "itself (ComfyUI: sigma0 * noise). On a tiny SANA transformer (20 steps, cfg 4.5, masked "
                   "300-token prompt and negative) it matches SanaPipeline within 2e-6, where the core route is about "
                   "6e-2 off. From a latent (img2img) it starts as ComfyUI does, which is diffusers' add_noise. "
                   "Flow-matching models only.")
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


SAMPLER_NODES = {"DCGenSampler": (DCGenSampler, "DC-Gen Sampler (4K)"),
                 "DCGenFlowSigmas": (DCGenFlowSigmas, "DC-Gen Flow Sigmas (SANA)"),
                 "DCGenDPMSolverFlowSampler": (DCGenDPMSolverFlowSampler, "DC-Gen DPM-Solver++ Flow (SANA)")}
