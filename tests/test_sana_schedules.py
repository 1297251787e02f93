"""SANA's diffusers schedules in ComfyUI: DC-Gen Flow Sigmas + core samplers vs the diffusers scheduler loops.

A deterministic toy velocity field v(x, t) = tanh(x W) + (t / 1000) b (nonlinear, and time-dependent so that
timestep handling shows) stands in for the transformer. diffusers side: the scheduler's own loop (set_timesteps,
step). ComfyUI side: core samplers (comfy.samplers.sampler_object / the SamplerDPMPP_2M_SDE node) run through
KSAMPLER.sample on a minimal model wrapper that has ComfyUI's flow model sampling with the pack's SANA settings
(ModelSamplingDiscreteFlow + CONST, shift 3.0, multiplier 1000): denoised = x - sigma * v(x, 1000 sigma).

Findings (both ComfyUI versions, fp32 CPU):
* 'flow-match euler (diffusers)' + euler == FlowMatchEulerDiscreteScheduler, step for step (the whole pipeline).
* 'dpm-solver++ flow (diffusers)' + SamplerDPMPP_2M_SDE(eta 0, midpoint) == DPMSolverMultistepScheduler(SANA's
  config) as a solver: same update, first step and (final sigma 0) last step first order, last step to x0.
* No KSamplerSelect name is exact: dpmpp_2m uses log-sigma step ratios, not the flow log-SNR; the
  KSamplerSelect dpmpp_2m_sde has eta 1 (noise).
* What remains against SanaPipeline is in the model's inputs, not the solver: the pipeline starts from the noise
  itself (ComfyUI: sigma0 * noise, sigma0 = 0.99967 at shift 3) and feeds integer timesteps int(1000 sigma)
  (ComfyUI: 1000 sigma).
* The pack's DC-Gen DPM++ Flow sampler does both: == the SanaPipeline loop (start = noise, integer
  timesteps), step for step. On a SANA transformer: tests/test_sana_dpm_e2e.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dcgen_core.shared.errors import DCGenError
from dcgen_core.shared.schedules import FLOW_SCHEDULES, dpm_flow_sigmas, flow_match_sigmas, flow_schedule_sigmas

pytest.importorskip("diffusers")
# torchsde's Brownian tree (built by dpmpp_2m_sde even at eta 0) warns about float rounding of its interval ends;
# diffusers' DPMSolverMultistepScheduler.set_timesteps calls np.array on a tensor (numpy 2 copy-keyword warning)
pytestmark = [pytest.mark.filterwarnings("ignore:Should have:UserWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

SHIFT = 3.0
EULER, DPM = FLOW_SCHEDULES
EXACT = 1e-5


#: DPMSolverMultistepScheduler as SANA's diffusers pipelines configure it (its scheduler_config.json)
SANA_DPM_CONFIG = {"use_flow_sigmas": True, "flow_shift": SHIFT, "prediction_type": "flow_prediction",
                   "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
                   "lower_order_final": True, "final_sigmas_type": "zero", "num_train_timesteps": 1000,
                   "timestep_spacing": "linspace"}


def _sana_dpm(steps, shift=SHIFT, **overrides):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(**{**SANA_DPM_CONFIG, "flow_shift": shift, **overrides})
    sched.set_timesteps(steps)
    return sched


def _flow_euler(steps, shift=SHIFT):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    return sched


class Field:
    """v(x, t) = tanh(x W) + (t / 1000) b on (B, 4, 4, 4) latents."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(64, 64, generator=g) / 8
        self.b = torch.randn(64, generator=g)

    def __call__(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1)
        return (torch.tanh(x.reshape(x.shape[0], -1) @ self.w) + t / 1000 * self.b).reshape(x.shape)


FIELD = Field()
NOISE = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))


# --- diffusers side ---------------------------------------------------------------------------------------------

@torch.no_grad()
def diffusers_loop(sched, x, timestep_of):
    for i, t in enumerate(sched.timesteps):
        x = sched.step(FIELD(x, timestep_of(sched, i, t)), t, x).prev_sample
    return x


def as_pipeline(sched, i, t):
    """What SanaPipeline feeds the transformer: the scheduler's timesteps (integers for DPM-Solver)."""
    return t.float()


def as_comfy(sched, i, t):
    """What ComfyUI feeds it: 1000 * sigma."""
    return sched.sigmas[i] * 1000


# --- ComfyUI side -----------------------------------------------------------------------------------------------

class ToyModel:
    """The part of comfy.samplers.CFGGuider's model wrapper that KSAMPLER.sample and the k-diffusion samplers use;
    the APPLY_MODEL wrappers of the model options run around the model call, as in BaseModel.apply_model."""

    def __init__(self, model_sampling):
        self.inner_model = SimpleNamespace(model_sampling=model_sampling)
        self.model_patcher = SimpleNamespace(get_model_object=lambda name: {"model_sampling": model_sampling}[name],
                                             model=self)
        self.cfg = 1.0
        self.ms = model_sampling

    def __call__(self, x, sigma, model_options=None, seed=None, **_):
        import comfy.patcher_extension as pe

        wrappers = pe.get_all_wrappers(pe.WrappersMP.APPLY_MODEL, model_options or {}, is_model_options=True)
        return pe.WrapperExecutor.new_class_executor(self.apply_model, self, wrappers).execute(x, sigma)

    def apply_model(self, x, sigma):
        ms = self.ms
        return ms.calculate_denoised(sigma, FIELD(ms.calculate_input(sigma, x), ms.timestep(sigma)), x)


@pytest.fixture(scope="module")
def sana_sampling(comfyui):
    """ComfyUI's model sampling for the pack's SANA model config (flow, shift 3.0, multiplier 1000)."""
    import comfy.model_base
    import comfy.model_sampling

    settings = comfyui.core.sana.comfy_model.comfy_classes()[0].sampling_settings
    ms = comfy.model_base.model_sampling(SimpleNamespace(sampling_settings=settings), comfy.model_base.ModelType.FLOW)
    assert isinstance(ms, comfy.model_sampling.CONST) and ms.shift == SHIFT and ms.multiplier == 1000
    return ms


@torch.no_grad()
def comfy_sample(sampler, model_sampling, sigmas, latent=None):
    latent = torch.zeros_like(NOISE) if latent is None else latent
    return sampler.sample(ToyModel(model_sampling), sigmas, {"seed": 0, "model_options": {}}, None, NOISE.clone(),
                          latent_image=latent, denoise_mask=None, disable_pbar=True)


def core_sampler(comfyui, name):
    import comfy.samplers

    return comfy.samplers.sampler_object(name)


def dpmpp_2m_sde_node(comfyui, solver_type="midpoint", eta=0.0, noise_device="cpu"):
    node = comfyui.runtime.node_classes["SamplerDPMPP_2M_SDE"]
    return node().get_sampler(solver_type, eta, 1.0, noise_device)[0]


def node_sigmas(comfyui, steps, schedule, shift=SHIFT):
    return comfyui.runtime.node_classes["DCGenFlowSigmas"]().run(steps, shift, schedule)[0]


def max_diff(a, b):
    return (a - b).abs().max().item()


# --- sigmas -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 4.5, 7.0])
@pytest.mark.parametrize("steps", [1, 2, 14, 15, 20, 50, 1000])
def test_dpm_flow_sigmas_equal_diffusers(steps, shift):
    theirs = _sana_dpm(steps, shift).sigmas
    ours = dpm_flow_sigmas(steps, shift)
    assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == (steps + 1,)
    assert torch.equal(ours, theirs)
    assert torch.equal(flow_schedule_sigmas(DPM, steps, shift), ours)
    assert torch.equal(flow_schedule_sigmas(EULER, steps, shift), flow_match_sigmas(steps, shift))


def test_dpm_flow_sigmas_start_below_one():
    s = dpm_flow_sigmas(20, SHIFT)
    assert s[-1] == 0 and float(s[0]) == pytest.approx(3 * 0.999 / (1 + 2 * 0.999))
    assert bool((s[:-1] > s[1:]).all())


def test_flow_schedule_errors():
    with pytest.raises(DCGenError, match="expected one of"):
        flow_schedule_sigmas("karras", 20, SHIFT)
    with pytest.raises(DCGenError, match="steps"):
        dpm_flow_sigmas(0, SHIFT)
    with pytest.raises(DCGenError, match="shift"):
        dpm_flow_sigmas(20, 0.0)


def test_node_dispatches_on_schedule(comfyui):
    node = comfyui.runtime.node_classes["DCGenFlowSigmas"]
    assert node.INPUT_TYPES()["required"]["schedule"][0] == list(FLOW_SCHEDULES)
    assert torch.equal(node_sigmas(comfyui, 20, DPM), _sana_dpm(20).sigmas)
    assert torch.equal(node_sigmas(comfyui, 20, EULER), _flow_euler(20).sigmas)


# --- samplers ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 4, 20])
def test_euler_reproduces_flow_match_euler(comfyui, sana_sampling, steps):
    """Exact for the whole pipeline: sigma0 = 1 (so sigma0 * noise = noise) and float timesteps 1000 sigma."""
    sched = _flow_euler(steps)
    theirs = diffusers_loop(sched, NOISE.clone(), as_pipeline)
    ours = comfy_sample(core_sampler(comfyui, "euler"), sana_sampling, node_sigmas(comfyui, steps, EULER))
    assert max_diff(ours, theirs) < EXACT


@pytest.mark.parametrize("steps,noise_device", [(1, "cpu"), (2, "cpu"), (4, "cpu"), (15, "cpu"), (20, "cpu"),
                                                (20, "gpu")])
def test_dpmpp_2m_sde_eta0_midpoint_reproduces_dpm_solver(comfyui, sana_sampling, steps, noise_device):
    """The solver, given the same start (sigma0 * noise) and the same model inputs (1000 sigma): exact."""
    sched = _sana_dpm(steps)
    theirs = diffusers_loop(sched, NOISE * sched.sigmas[0], as_comfy)
    sampler = dpmpp_2m_sde_node(comfyui, "midpoint", eta=0.0, noise_device=noise_device)
    ours = comfy_sample(sampler, sana_sampling, node_sigmas(comfyui, steps, DPM))
    assert max_diff(ours, theirs) < EXACT


def test_heun_variant_maps_too(comfyui, sana_sampling):
    """diffusers solver_type="heun" corresponds to SamplerDPMPP_2M_SDE solver_type heun (eta 0)."""
    sched = _sana_dpm(20, solver_type="heun")
    theirs = diffusers_loop(sched, NOISE * sched.sigmas[0], as_comfy)
    ours = comfy_sample(dpmpp_2m_sde_node(comfyui, "heun"), sana_sampling, node_sigmas(comfyui, 20, DPM))
    assert max_diff(ours, theirs) < EXACT


@pytest.mark.parametrize("name", ["dpmpp_2m", "res_multistep", "dpmpp_2m_sde"])
def test_no_ksampler_select_name_is_exact(comfyui, sana_sampling, name):
    """The closest KSamplerSelect names differ by ~1e-2 (20 steps) to ~1e-1 (4 steps) on this field (output ~3)."""
    for steps in (4, 20):
        sched = _sana_dpm(steps)
        theirs = diffusers_loop(sched, NOISE * sched.sigmas[0], as_comfy)
        ours = comfy_sample(core_sampler(comfyui, name), sana_sampling, node_sigmas(comfyui, steps, DPM))
        assert max_diff(ours, theirs) > 1e-3, f"{name} ({steps} steps) is exact: update the node DESCRIPTION"


@pytest.mark.parametrize("steps", [4, 20])
def test_sana_pipeline_differs_only_in_model_inputs(comfyui, sana_sampling, steps):
    """Against SanaPipeline as it runs (start = noise, integer timesteps) the best ComfyUI route is ~1e-3 off on this
    field; aligning either input on the diffusers side leaves only the other."""
    sched = _sana_dpm(steps)
    ours = comfy_sample(dpmpp_2m_sde_node(comfyui), sana_sampling, node_sigmas(comfyui, steps, DPM))
    pipeline = diffusers_loop(_sana_dpm(steps), NOISE.clone(), as_pipeline)
    start_aligned = diffusers_loop(_sana_dpm(steps), NOISE * sched.sigmas[0], as_pipeline)
    timesteps_aligned = diffusers_loop(_sana_dpm(steps), NOISE.clone(), as_comfy)
    assert sched.timesteps.dtype == torch.int64  # int(1000 sigma)
    assert bool(((sched.sigmas[:-1] * 1000 - sched.timesteps).abs() < 1).all())
    assert 1e-5 < max_diff(ours, pipeline) < 1e-2
    assert 1e-5 < max_diff(ours, start_aligned) < 1e-2
    assert 1e-5 < max_diff(ours, timesteps_aligned) < 1e-2


# --- the pack's official-scheduler sampler (DC-Gen DPM++ Flow) -------------------------------------------

def official_node(comfyui, solver_type="midpoint"):
    return comfyui.runtime.node_classes["DCGenDPMSolverFlowSampler"]().run(solver_type)[0]


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("steps", [1, 2, 4, 14, 15, 20, 50])
def test_official_sampler_reproduces_sana_pipeline(comfyui, sana_sampling, steps, solver_type):
    """The whole SanaPipeline loop (start = noise, integer timesteps, DPM-Solver++ 2M flow): exact."""
    sched = _sana_dpm(steps, solver_type=solver_type)
    theirs = diffusers_loop(sched, NOISE.clone(), as_pipeline)
    ours = comfy_sample(official_node(comfyui, solver_type), sana_sampling, node_sigmas(comfyui, steps, DPM))
    assert max_diff(ours, theirs) < EXACT


def test_official_sampler_img2img_start_is_add_noise(comfyui, sana_sampling):
    """From a latent (img2img) the start is ComfyUI's, which is diffusers' add_noise at the first sigma."""
    latent = torch.randn(NOISE.shape, generator=torch.Generator().manual_seed(5))
    sched = _sana_dpm(20)
    s0 = sched.sigmas[0]
    theirs = diffusers_loop(sched, s0 * NOISE + (1 - s0) * latent, as_pipeline)
    ours = comfy_sample(official_node(comfyui), sana_sampling, node_sigmas(comfyui, 20, DPM), latent=latent)
    assert max_diff(ours, theirs) < EXACT


@pytest.mark.parametrize("shift,steps", [(SHIFT, range(1, 333)), (4.5, range(1, 101)), (7.0, range(1, 101))])
def test_integer_timesteps_equal_diffusers(shift, steps):
    from dcgen_core.shared.dpm_flow import diffusers_timesteps

    for n in steps:
        assert torch.equal(diffusers_timesteps(dpm_flow_sigmas(n, shift)[:-1]), _sana_dpm(n, shift).timesteps), n


def test_integer_timestep_wrapper(comfyui):
    """The model runs at floor(1000 sigma) / 1000 and its velocity is used at the true sigma; below timestep 1 the
    model keeps its sigma."""
    from dcgen_core.shared.dpm_flow import integer_timestep_wrapper

    seen = []

    def apply_model(x, t):
        seen.append(t.clone())
        return x - t.reshape(-1, 1, 1, 1) * FIELD(x, t * 1000)

    wrapper = integer_timestep_wrapper()
    x = NOISE.clone()
    sigma = torch.tensor([0.4567891, 0.0004], dtype=torch.float32)
    out = wrapper(apply_model, x, sigma)
    assert torch.equal(seen[0], torch.tensor([0.456, 0.0004], dtype=torch.float32))
    expected = x - sigma.reshape(-1, 1, 1, 1) * FIELD(x, torch.tensor([456.0, 0.4]))
    assert max_diff(out, expected) < EXACT
    seen.clear()
    on_grid = torch.tensor([0.5, 0.5])
    assert torch.equal(wrapper(apply_model, x, on_grid), apply_model(x, on_grid)) and len(seen) == 2


def test_official_sampler_errors(comfyui, sana_sampling):
    import comfy.model_base

    error = comfyui.core.shared.errors.DCGenError  # the pack's class, as ComfyUI loaded it
    node = comfyui.runtime.node_classes["DCGenDPMSolverFlowSampler"]
    assert node.INPUT_TYPES()["required"]["solver_type"][0] == ["midpoint", "heun"]
    with pytest.raises(error, match="solver_type"):
        node().run("karras")
    sampler = official_node(comfyui)
    with pytest.raises(error, match=r"sigmas in \[0, 1\]"):
        comfy_sample(sampler, sana_sampling, torch.tensor([14.6, 1.0, 0.0]))
    with pytest.raises(error, match="decreasing"):
        comfy_sample(sampler, sana_sampling, torch.tensor([0.5, 0.8, 0.0]))
    eps = comfy.model_base.model_sampling(SimpleNamespace(sampling_settings={}), comfy.model_base.ModelType.EPS)
    with pytest.raises(error, match="flow-matching model"):
        comfy_sample(sampler, eps, node_sigmas(comfyui, 4, DPM))
