"""NVFP4 vs bf16 at full FLUX width on CPU: file size, load memory, resident weights, per-step time.

    python benchmarks/bench_nvfp4.py [--double 1 --single 2] [--tokens 256] [--text 64] [--repeats 3]

A DC-Gen-FLUX 4K model (128 DC-AE channels) with FLUX.1's full width (hidden 3072, 24 heads, MLP 12288) and
--double/--single blocks, random bf16 weights, written as a BFL safetensors and quantized by
``python -m dcgen_core.quantize`` (default layout: block linears NVFP4, modulation bf16; and with
--quantize-modulation). Then, side by side in one run:

- file bytes, and the ratio to bf16;
- loading through the nodes (DC-Gen Load Model, weight_dtype bf16 / DC-Gen Load Model
  (NVFP4)), each in a fresh process: peak and final private memory (final = resident weights), and the weight
  bytes as stored;
- one diffusion-model call (= one sampling step, cfg 1) of each model on the same latent (--tokens image tokens)
  and text (--text tokens), best of --repeats alternating rounds: on CPU the NVFP4 layers are dequantized per
  call (weight-only path), the bf16 ones cast to the compute dtype per call, as ComfyUI runs them.

Whole FLUX.1 for the ratios: the blocks are 96% of its weights, so the ratios of a few full-width blocks carry
over; see README (4-bit models) for the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import flux_config, loadavg, random_flux_state_dict, timed_pair  # noqa: E402
from load_memory import measure  # noqa: E402


def mib(b: float) -> str:
    return f"{b / 2**20:8.0f} MiB"


def projected_ratio(path: str, modulation: bool) -> float:
    """File size of the whole FLUX.1 in this layout / its bf16 size: the quantized layers at the bytes per weight
    of ``path`` (codes + block scales + tensor scale), the rest at 2 bytes."""
    import comfy.ldm.flux.model
    import comfy.ops
    from safetensors import safe_open

    from dcgen_core.shared.quant import nvfp4
    from dcgen_core.flux.comfy_model import flux_params_kwargs

    with safe_open(path, "pt") as f:
        layers = {k[: -len(".comfy_quant")] for k in f.keys() if k.endswith(".comfy_quant")}
        stored = sum(math.prod(f.get_slice(f"{m}{s}").get_shape()) * (4 if s == ".weight_scale_2" else 1)
                     for m in layers for s in (".weight", ".weight_scale", ".weight_scale_2"))
        weights = sum(math.prod(f.get_slice(f"{m}.weight").get_shape()) * 2 for m in layers)  # 2 codes a byte
    per_weight = stored / weights
    full = comfy.ldm.flux.model.Flux(image_model="flux", device="meta", operations=comfy.ops.disable_weight_init,
                                     **flux_params_kwargs(flux_config(19, 38, channels=128).comfy_flux_kwargs()))
    total = quantized = 0
    for name, t in full.state_dict().items():
        total += t.numel() * 2
        if name.endswith(".weight") and nvfp4.should_quantize(name[:-7], t.shape, modulation):
            quantized += t.numel() * (2 - per_weight)
    return (total - quantized) / total


def forward(model, x, cond, pooled):
    """One diffusion-model call as a sampler makes it (patches applied, wrappers passed)."""
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    opts = {**model.model_options.get("transformer_options", {}), "wrappers": model.wrappers}
    with torch.no_grad():
        return model.model.apply_model(x, torch.tensor([0.7]), c_crossattn=cond, y=pooled,
                                       guidance=torch.tensor([3.5]), transformer_options=opts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256, help="image tokens (a square latent; 256 = 1K at f64)")
    ap.add_argument("--text", type=int, default=64, help="text tokens")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from dcgen_core.tools.headless import boot, comfyui_path, comfyui_version_at
    from dcgen_core.flux.quantize import quantize_flux
    from dcgen_core.shared.quant.ops import core_reads_nvfp4

    side = int(round(a.tokens ** 0.5))
    with tempfile.TemporaryDirectory() as folder:
        boot(cpu=True, model_dirs={"diffusion_models": [folder]})
        import nodes
        from safetensors.torch import save_file

        cfg = flux_config(a.double, a.single, channels=128)
        save_file(random_flux_state_dict(cfg, dtype=torch.bfloat16), os.path.join(folder, "dcgen-bf16.safetensors"),
                  metadata={"config": json.dumps({"axes_dims_rope": list(cfg.axes_dim)})})
        files = {"bf16": "dcgen-bf16.safetensors", "nvfp4": "dcgen-nvfp4.safetensors",
                 "nvfp4 + modulation": "dcgen-nvfp4-mod.safetensors"}
        reports = {
            "nvfp4": quantize_flux(os.path.join(folder, files["bf16"]), os.path.join(folder, files["nvfp4"]),
                                   progress=False),
            "nvfp4 + modulation": quantize_flux(os.path.join(folder, files["bf16"]),
                                                os.path.join(folder, files["nvfp4 + modulation"]),
                                                quantize_modulation=True, progress=False),
        }
        ops = "core mixed-precision ops" if core_reads_nvfp4() else "the pack's NVFP4 ops"
        print(f"ComfyUI {comfyui_version_at(comfyui_path())} ({ops}); torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; load {loadavg()}")
        print(f"DC-Gen-FLUX f64c128 at FLUX.1 width (hidden {cfg.hidden_size}), {a.double} double + {a.single} "
              f"single blocks")
        size = {k: os.path.getsize(os.path.join(folder, f)) for k, f in files.items()}
        print(f"\n{'file':22s} {'bytes':>12s} {'vs bf16':>8s} {'NVFP4 layers':>13s} {'worst layer rel. err':>21s}")
        for k in files:
            r = reports.get(k)
            layers, err = (str(r["layers"]), f"{r['worst_layer_relative_error']:.3f}") if r else ("-", "-")
            print(f"{k:22s} {mib(size[k]):>12s} {size[k] / size['bf16']:7.3f}x {layers:>13s} {err:>21s}")

        print("full FLUX.1 (19 double + 38 single blocks), from the bytes per weight measured above: "
              + ", ".join(f"{k} {projected_ratio(os.path.join(folder, files[k]), m):.3f}x bf16"
                          for k, m in (("nvfp4", False), ("nvfp4 + modulation", True))))

        print(f"\n{'load (fresh process)':22s} {'weights':>12s} {'peak priv':>12s} {'final priv':>12s} "
              f"{'peak/weights':>13s} {'resident vs bf16':>17s}")
        loads = {}
        for k, name in files.items():
            node, args = (("DCGenModelLoader", ("bf16",)) if k == "bf16" else ("DCGenNVFP4ModelLoader", ("auto",)))
            loads[k] = measure(folder, name, node=node, args=args)
        for k, m in loads.items():
            print(f"{k:22s} {mib(m['model_bytes']):>12s} {mib(m['peak_anon']):>12s} {mib(m['final_anon']):>12s} "
                  f"{m['peak_anon'] / m['model_bytes']:12.2f}x "
                  f"{m['final_anon'] / loads['bf16']['final_anon']:16.3f}x")

        bf16 = nodes.NODE_CLASS_MAPPINGS["DCGenModelLoader"]().load(files["bf16"], "bf16")[0]
        q = nodes.NODE_CLASS_MAPPINGS["DCGenNVFP4ModelLoader"]().load(files["nvfp4"], "auto")[0]
        qm = nodes.NODE_CLASS_MAPPINGS["DCGenNVFP4ModelLoader"]().load(files["nvfp4 + modulation"], "auto")[0]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 128, side, side, generator=g)
        cond = torch.randn(1, a.text, cfg.context_in_dim, generator=g)
        pooled = torch.randn(1, cfg.vec_in_dim, generator=g)
        outs = {k: forward(m, x, cond, pooled) for k, m in (("bf16", bf16), ("nvfp4", q), ("nvfp4 + modulation", qm))}
        t_bf16, t_q = timed_pair(lambda: forward(bf16, x, cond, pooled), lambda: forward(q, x, cond, pooled),
                                 a.repeats)
        _, t_qm = timed_pair(lambda: forward(bf16, x, cond, pooled), lambda: forward(qm, x, cond, pooled), a.repeats)
        print(f"\nper step ({side}x{side} latent = {side * side} image tokens + {a.text} text tokens, compute "
              f"{str(q.model.manual_cast_dtype or q.model.get_dtype()).replace('torch.', '')}; best of {a.repeats}):")
        for k, t in (("bf16", t_bf16), ("nvfp4", t_q), ("nvfp4 + modulation", t_qm)):
            err = ((outs[k] - outs["bf16"]).norm() / outs["bf16"].norm()).item()
            print(f"  {k:20s} {t:7.3f} s  {t / t_bf16:5.2f}x bf16   output rel. error vs bf16 {err:.3f}")


if __name__ == "__main__":
    main()
