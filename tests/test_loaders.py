"""DC-Gen Load Model: file layouts, weight dtype, memory-mapped loading, schedule wiring."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import tiny


def _load(comfyui, name, dtype="default"):
    return comfyui.runtime.node_classes["DCGenModelLoader"]().load(name, dtype)[0]


def _weights(model):
    return {k: v.float() for k, v in model.model.diffusion_model.state_dict().items()}


@pytest.fixture(scope="module")
def layouts(comfyui, tiny_dcgen):
    """The same DC-Gen transformer as a single diffusers-key file, a BFL-key file and a pipeline folder."""
    from dcgen_core.flux.keys import diffusers_to_bfl

    d = comfyui.dirs["diffusion_models"]
    sd = {k: v.contiguous() for k, v in tiny_dcgen.dcgen.state_dict().items()}
    meta = {"config": json.dumps(dict(tiny.FLUX_CONFIG))}
    save_file(sd, os.path.join(d, "dcgen-diffusers-keys.safetensors"), metadata=meta)
    save_file(diffusers_to_bfl(sd), os.path.join(d, "dcgen-bfl-keys.safetensors"), metadata=meta)
    pipeline = os.path.join(d, "DC-Gen-pipeline")
    tiny_dcgen.save_dcgen_diffusers_folder(os.path.join(pipeline, "transformer"))
    with open(os.path.join(pipeline, "model_index.json"), "w") as f:
        json.dump({"_class_name": "DCGenFluxPipeline"}, f)
    return ["dcgen-diffusers-keys.safetensors", "dcgen-bfl-keys.safetensors", "DC-Gen-pipeline/transformer"]


def test_every_layout_loads_the_same_model(comfyui, comfy_models, layouts):
    listed = comfyui.runtime.node_classes["DCGenModelLoader"].INPUT_TYPES()["required"]["unet_name"][0]
    for name in [comfy_models.dcgen, *layouts]:
        assert name in listed, name
    assert not any("-0000" in n for n in listed)  # shards are not offered one by one
    reference = _weights(_load(comfyui, comfy_models.dcgen))
    for name in layouts:
        model = _load(comfyui, name)
        assert model.model_options["dcgen"]["latent_channels"] == tiny.LATENT_CHANNELS
        weights = _weights(model)
        assert weights.keys() == reference.keys()
        for k in reference:
            assert torch.equal(weights[k], reference[k]), (name, k)


@pytest.mark.parametrize("dtype,expected", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                            ("fp8_e4m3fn", torch.float8_e4m3fn), ("fp32", torch.float32)])
def test_weight_dtype(comfyui, comfy_models, dtype, expected):
    model = _load(comfyui, comfy_models.dcgen, dtype)
    dm = model.model.diffusion_model
    assert dm.double_blocks[0].img_attn.qkv.weight.dtype == expected
    assert model.model.get_dtype() == expected


def test_schedule_is_the_official_one(comfyui, comfy_models):
    import comfy.samplers

    from dcgen_core.shared.schedules import official_shift, official_sigmas

    model = _load(comfyui, comfy_models.dcgen)
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", 20)
    assert torch.allclose(sigmas.float(), official_sigmas(20, official_shift(32, 32, 32)), atol=1e-5)
    fixed = comfyui.runtime.node_classes["DCGenTimeShift"]().patch(model, "model default", 2048, 1024)[0]
    sigmas = comfy.samplers.calculate_sigmas(fixed.get_model_object("model_sampling"), "simple", 20)
    assert torch.allclose(sigmas.float(), official_sigmas(20, official_shift(32, 64, 32)), atol=1e-5)
    assert fixed.model_options["dcgen"]["fixed_resolution"] == (2048, 1024)
    assert model.model_options["dcgen"]["fixed_resolution"] is None  # the input model is unchanged


sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


@pytest.fixture(scope="module")
def big_layouts(tmp_path_factory):
    """A ~300 MB DC-Gen transformer (fp32) as a BFL file, a diffusers file and a sharded diffusers folder."""
    import load_memory

    folder = str(tmp_path_factory.mktemp("big"))
    return folder, load_memory.write_layouts(folder, double=2, single=4, heads=6)


@pytest.mark.parametrize("name,dtype", [("dcgen-folder", "fp8_e4m3fn"), ("dcgen-diffusers.safetensors", "bf16"),
                                        ("dcgen-bfl.safetensors", "default")])
def test_load_peak_private_memory(comfyui, big_layouts, name, dtype):
    """Loaded weights are private copies; building them one at a time keeps the peak private memory (RssAnon,
    sampled every ms in a fresh process) within 1.1x the final model, fused q/k/v and dtype casts included."""
    import load_memory

    folder, sizes = big_layouts
    m = load_memory.measure(folder, name, dtype)
    ratio = m["peak_anon"] / m["model_bytes"]
    print(f"{name} {dtype}: model {m['model_bytes'] / 2**20:.0f} MiB, peak private {m['peak_anon'] / 2**20:.0f} MiB "
          f"({ratio:.2f}x), VmHWM +{m['hwm'] / 2**20:.0f} MiB")
    assert m["final_anon"] >= 0.9 * m["model_bytes"]  # the weights are owned, not views of the file
    assert ratio <= 1.1


_REWRITE_SCRIPT = textwrap.dedent("""
    import os, sys, json
    sys.path.insert(0, {repo!r})
    from dcgen_core.tools.headless import boot
    boot(cpu=True, model_dirs={{"diffusion_models": [{folder!r}], "vae": [{folder!r}]}})
    import nodes
    model = nodes.NODE_CLASS_MAPPINGS["DCGenModelLoader"]().load({model!r}, "default")[0]
    vae = nodes.NODE_CLASS_MAPPINGS["DCGenDCAELoader"]().load({vae!r}, "auto")[0]
    def checksum():
        sds = [model.model.diffusion_model.state_dict(), vae.first_stage_model.state_dict()]
        return [float(t.double().sum()) for sd in sds for t in sd.values()]
    before = checksum()
    for path in {files!r}:
        size = os.path.getsize(path)
        with open(path, "r+b") as f:  # overwrite the tensor data in place, then cut the file short
            f.seek(size // 2)
            f.write(bytes([255]) * (size - size // 2))
            f.truncate(size // 3)
    print(json.dumps({{"same": checksum() == before}}))
""")


def test_files_changed_after_loading_do_not_touch_the_model(comfyui, tiny_dcgen, tiny_vae, tmp_path):
    """A cached model must not follow its file: overwriting it changed the weights and truncating it killed
    ComfyUI with SIGBUS while the weights were views of the mapped file."""
    tiny_dcgen.save_dcgen_diffusers_folder(str(tmp_path / "dcgen"))
    tiny.save_dcae_folder(tiny_vae, str(tmp_path / "dcae"))
    files = [str(p) for p in list((tmp_path / "dcgen").glob("*.safetensors")) + list((tmp_path / "dcae").glob("*.safetensors"))]
    script = _REWRITE_SCRIPT.format(repo=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    folder=str(tmp_path), model="dcgen", vae="dcae", files=files)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"exit {out.returncode} (-7 is SIGBUS):\n{out.stderr[-2000:]}"
    assert json.loads(out.stdout.strip().splitlines()[-1])["same"]


@pytest.mark.parametrize("dtype,fast", [("fp8_e4m3fn_fast", True), ("fp8_e4m3fn", False)])
def test_fp8_fast_turns_on_cores_fp8_matmuls(comfyui, comfy_models, dtype, fast):
    model = _load(comfyui, comfy_models.dcgen, dtype)
    assert model.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert model.model.model_config.optimizations.get("fp8", False) is fast
