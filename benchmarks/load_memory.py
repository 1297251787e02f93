"""Memory of loading a DC-Gen transformer: peak private memory (RssAnon) and VmHWM against the final model.

    python benchmarks/load_memory.py [--double 2 --single 4 --heads 6]

Each case loads through DC-Gen Load Model in a fresh process (ComfyUI booted on CPU):
layouts BFL single file, diffusers single file, sharded diffusers folder; weight_dtype default
(the file's fp32), bf16, fp8_e4m3fn. A thread samples /proc/self/status every millisecond while
the loader runs. Loaded weights are private copies (the file may be overwritten or truncated
later without touching the model), so the target is peak private memory <= 1.1x the final
model; VmHWM also counts the file's pages that were read, so it is near file + model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = textwrap.dedent("""
    import json, sys, threading, time
    sys.path.insert(0, {repo!r})
    from dcgen_core.tools.headless import boot
    boot(cpu=True, model_dirs={{"diffusion_models": [{folder!r}]}})

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := current RSS
        f.write("5")
    base_anon, base_rss = status("RssAnon"), status("VmRSS")
    peak, done = [base_anon], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], status("RssAnon"))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    import nodes
    model = nodes.NODE_CLASS_MAPPINGS[{node!r}]().load({name!r}, *{args!r})[0]
    done.set()
    sampler.join()
    final_anon = status("RssAnon")
    peak[0] = max(peak[0], final_anon)
    model_bytes = sum(t.numel() * t.element_size() for t in model.model.diffusion_model.state_dict().values())
    print(json.dumps({{"model_bytes": model_bytes, "peak_anon": peak[0] - base_anon,
                      "final_anon": final_anon - base_anon, "hwm": status("VmHWM") - base_rss}}))
""")


def measure(folder: str, name: str, weight_dtype: str = "default", env: dict | None = None,
            node: str = "DCGenModelLoader", args: tuple | None = None) -> dict:
    """Load ``name`` from ``folder`` with the loader ``node`` (further widget values ``args``, default the
    weight_dtype) in a fresh process; bytes above the booted process: peak/final RssAnon, VmHWM, and the final
    model's weight bytes (as stored: a 4-bit layer counts its codes and scales)."""
    script = _CHILD.format(repo=REPO, folder=folder, name=name, node=node,
                           args=tuple(args) if args is not None else (weight_dtype,))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"loading {name} ({node}, {args or weight_dtype}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_layouts(folder: str, double: int, single: int, heads: int, seed: int = 0) -> dict[str, int]:
    """The same random FLUX-like DC-Gen transformer (32 channels) as a BFL file, a diffusers file and a sharded
    diffusers folder; returns name -> bytes on disk."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    sys.path.insert(0, REPO)
    from dcgen_core.flux.keys import diffusers_to_bfl

    torch.manual_seed(seed)
    cfg = dict(patch_size=1, in_channels=32, out_channels=32, num_layers=double, num_single_layers=single,
               attention_head_dim=128, num_attention_heads=heads, joint_attention_dim=256, pooled_projection_dim=64,
               guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    model = FluxTransformer2DModel(**cfg)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(cfg)}
    save_file(diffusers_to_bfl(sd), os.path.join(folder, "dcgen-bfl.safetensors"), metadata=meta)
    save_file(sd, os.path.join(folder, "dcgen-diffusers.safetensors"), metadata=meta)
    shard = max(1, sum(v.numel() * 4 for v in sd.values()) // 3 // 2**20)
    model.save_pretrained(os.path.join(folder, "dcgen-folder"), safe_serialization=True, max_shard_size=f"{shard}MB")
    sizes = {}
    for name in ("dcgen-bfl.safetensors", "dcgen-diffusers.safetensors", "dcgen-folder"):
        path = os.path.join(folder, name)
        sizes[name] = os.path.getsize(path) if os.path.isfile(path) else sum(
            os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".safetensors"))
    return sizes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6, help="attention heads of 128 (FLUX: 24)")
    a = ap.parse_args()
    sys.path.insert(0, REPO)
    from dcgen_core.tools.headless import comfyui_path, comfyui_version_at

    with tempfile.TemporaryDirectory() as folder:
        sizes = write_layouts(folder, a.double, a.single, a.heads)
        print(f"ComfyUI {comfyui_version_at(comfyui_path())}; FLUX-like DC-Gen, hidden {128 * a.heads}, "
              f"{a.double} double + {a.single} single blocks; files fp32")
        print(f"{'layout':30s} {'weight_dtype':12s} {'file':>9s} {'model':>9s} {'peak priv':>10s} {'final priv':>10s} "
              f"{'VmHWM':>9s} {'peak/model':>10s}")
        for name, size in sizes.items():
            for dtype in ("default", "bf16", "fp8_e4m3fn"):
                m = measure(folder, name, dtype)
                mib = lambda b: f"{b / 2**20:7.0f}Mi"  # noqa: E731
                print(f"{name:30s} {dtype:12s} {mib(size):>9s} {mib(m['model_bytes']):>9s} {mib(m['peak_anon']):>10s} "
                      f"{mib(m['final_anon']):>10s} {mib(m['hwm']):>9s} {m['peak_anon'] / m['model_bytes']:9.2f}x")


if __name__ == "__main__":
    main()
