"""What a workflow needs, and whether this install has it.

    python -m dcgen_core.doctor [WORKFLOW ...] [--comfyui PATH] [--model-dir PATH]

Prints the ComfyUI version and path, the pack's version and whether it imported, the torch and
device facts that decide code paths, and for each workflow (default: the shipped ones) every
node type it uses that is not installed (with who provides it) and every model file it names:
found (where) or missing (the folder it belongs in, where it is published, and whether it sits
in another model folder). Exits 1 when anything is missing. The headless runner prints the same
summary when ComfyUI rejects a workflow.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import sys

from .headless import PACK_DIR, boot, comfyui_path, comfyui_version_at, model_dirs_under
from .workflows import check_workflow, file_status, workflow_needs  # noqa: F401 (check_workflow: API)


def _pack_version() -> str:
    try:
        with open(os.path.join(PACK_DIR, "pyproject.toml"), encoding="utf-8") as f:
            return re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M).group(1)
    except (OSError, AttributeError):
        return "unknown"


def device_facts() -> list[str]:
    """The torch/device facts that pick code paths (bf16, native NVFP4, nunchaku kernels)."""
    import torch

    lines = [f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else ", CPU build")]
    if not torch.cuda.is_available():
        lines.append("device: CPU (no CUDA device): fp32 compute; NVFP4 and SVDQuant files are dequantized per layer")
        return lines
    major, minor = torch.cuda.get_device_capability()
    sm = major * 10 + minor
    lines.append(f"device: {torch.cuda.get_device_name()} (sm {sm}), bf16 "
                 f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    from ..shared.quant.nvfp4 import compute_path
    from ..shared.quant.svdquant import nunchaku_supports

    kitchen = importlib.util.find_spec("comfy_kitchen") is not None
    lines.append(f"NVFP4 layers: {compute_path('cuda')}"
                 f"{'' if kitchen else ' (comfy-kitchen not installed: pip install comfy-kitchen)'}")
    nunchaku = importlib.util.find_spec("nunchaku") is not None
    kinds = (", ".join(k for k in ("int4", "fp4") if nunchaku_supports(k, sm))
             or "none on this GPU (int4: sm 75-89, fp4: sm 120/121)")
    lines.append(f"nunchaku SVDQuant kernels: {'installed' if nunchaku else 'not installed (optional)'}; "
                 f"formats this GPU runs: {kinds}")
    return lines


def report(workflows: list[str], runtime=None) -> tuple[list[str], int]:
    lines = []
    path = runtime.path if runtime else comfyui_path()
    lines.append(f"ComfyUI {comfyui_version_at(path)} at {path}")
    pack = sys.modules.get("comfyui_dc_gen")
    status = f"imported, {len(pack.NODE_CLASS_MAPPINGS)} nodes" if pack else "NOT imported"
    lines.append(f"ComfyUI-DC-Gen {_pack_version()} at {PACK_DIR}: {status}")
    lines += device_facts()
    problems = 0 if pack else 1
    needed_by, status = {}, {}  # (folder, name) -> workflow names; -> (line, missing)
    for wf_path in workflows:
        with open(wf_path, encoding="utf-8") as f:
            wf = json.load(f)
        type_lines, files = workflow_needs(wf, runtime.node_classes)
        name = os.path.basename(wf_path)
        missing = []
        for kind, file, _node_id, _cls in files:
            needed_by.setdefault((kind, file), []).append(name)
            if (kind, file) not in status:
                status[(kind, file)] = file_status(kind, file, "needed by <workflows>")
            if status[(kind, file)][1]:
                missing.append(f"{kind}/{file}")
        problems += len(type_lines)
        n = len(type_lines) + len(missing)
        lines.append(f"{name}: " + ("OK" if n == 0 else f"{n} missing" + (f" ({', '.join(missing)})" if missing else "")))
        lines += type_lines
    if status:
        lines.append("model files (each once, with the workflows that name it):")
    for key, (line, missing) in sorted(status.items(), key=lambda kv: (-kv[1][1], kv[0])):
        names = ", ".join(needed_by[key])
        problems += missing
        lines.append(line.replace("<workflows>", names) if missing else f"{line}  [{names}]")
    return lines, problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workflows", nargs="*", help="workflow JSON files (default: the pack's workflows/)")
    ap.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH or ~/ComfyUI)")
    ap.add_argument("--model-dir", action="append", default=[], metavar="PATH",
                    help="extra model folder laid out like ComfyUI's models/")
    ap.add_argument("--smoke", action="store_true",
                    help="run every workflow on tiny random models in a temporary folder (nothing downloaded, "
                         "your model folders untouched): tells a broken install from missing weights")
    ap.add_argument("--gpu", action="store_true", help="with --smoke: run on the GPU (default: CPU)")
    a = ap.parse_args(argv)
    workflows = a.workflows or sorted(glob.glob(os.path.join(PACK_DIR, "workflows", "*.json")))
    try:
        runtime = boot(a.comfyui, cpu=not a.gpu, model_dirs=model_dirs_under(a.model_dir))
    except Exception as e:  # noqa: BLE001 (report what broke, not a traceback)
        print(f"ComfyUI at {a.comfyui or comfyui_path()}: could not start ({type(e).__name__}: {e})")
        return 1
    if a.smoke:
        from .smoke import run

        header, _ = report([], runtime)
        print("\n".join(header), flush=True)
        lines, failures = run(workflows, runtime)
        print("\n".join(lines))
        print(f"{failures} of {len(workflows)} workflow(s) failed" if failures else
              f"all {len(workflows)} workflows ran: this install works (real weights still needed: run without --smoke)")
        return 1 if failures else 0
    lines, problems = report(workflows, runtime)
    print("\n".join(lines))
    print(f"{problems} problem(s)" if problems else "everything the workflows name is here")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
