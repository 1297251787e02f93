"""Make tests/fixtures/svdquant_converter.json with deepcompressor's converter and nunchaku's merge_safetensors
(run once, commit the output).

    python scripts/make_svdquant_converter_fixture.py --deepcompressor-src DC --nunchaku-src NK [--out PATH]

``DC``: a checkout of https://github.com/nunchaku-tech/deepcompressor (formerly mit-han-lab/deepcompressor);
``NK``: a checkout of https://github.com/nunchaku-tech/nunchaku. Their commits are recorded in the fixture.
Nothing is built or installed; the pure python/torch files

* deepcompressor/backend/nunchaku/convert.py, utils.py   (convert_to_nunchaku_flux_state_dicts and what it calls)
* deepcompressor/backend/tinychat/utils.py, backend/utils.py   (AdaLN W4A16 packing, packer base, fp_quantize)
* nunchaku/merge_safetensors.py, nunchaku/utils.py    (the pre-v1 folder -> one file with header metadata)

are imported by path, their package ``__init__`` files replaced by empty stub packages (nunchaku's imports its CUDA
extension).

For each case of tests/svdquant_pack.CASES (int4 r32, fp4 r32 per-channel scale, fp4 r128 per-tensor scale,
FLUX.1-schnell int4 r32 without guidance embedder), on svdquant_pack.TINY_FLUX:

1. svdquant_pack.synthetic_weights -> svdquant_pack.deepcompressor_checkpoint: the dicts deepcompressor's PTQ saves
   (model.pt, scale.pt, smooth.pt, branch.pt);
2. the REAL convert_to_nunchaku_flux_state_dicts on them, saved as its ``__main__`` saves them
   (transformer_blocks.safetensors, unquantized_layers.safetensors) with config.json and comfy_config.json;
3. the REAL merge_safetensors on that folder, saved as its ``__main__`` saves it;
4. the manifest: per tensor "dtype shape sha256[:32]" (svdquant_pack.manifest_entry), which of the two files it
   came from, and the header metadata. The AdaLN wscales/wzeros are padded by the converter to TinyChat's
   ceil_num_groups rows (16 at width 128), which nunchaku's loaders refuse (they allocate ceil(in/64) rows); the
   manifest records the converter's shape and the digest of the ceil(in/64) rows nunchaku reads (the padding is
   checked to be zeros).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import types

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import svdquant_pack as P

DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "svdquant_converter.json")


def _stub(name: str, folder: str):
    mod = types.ModuleType(name)
    mod.__path__ = [folder]
    sys.modules[name] = mod


def load_tools(dc_src: str, nk_src: str):
    conv = os.path.join(dc_src, "deepcompressor", "backend", "nunchaku", "convert.py")
    merge = os.path.join(nk_src, "nunchaku", "merge_safetensors.py")
    for path, what in ((conv, "a deepcompressor checkout"), (merge, "a nunchaku checkout")):
        if not os.path.isfile(path):
            sys.exit(f"expected {what} with {path}, found none.")
    for name, sub in (("deepcompressor", ""), ("deepcompressor.backend", "backend"),
                      ("deepcompressor.backend.nunchaku", "backend/nunchaku"),
                      ("deepcompressor.backend.tinychat", "backend/tinychat")):
        _stub(name, os.path.join(dc_src, "deepcompressor", sub))
    _stub("nunchaku", os.path.join(nk_src, "nunchaku"))
    return (importlib.import_module("deepcompressor.backend.nunchaku.convert"),
            importlib.import_module("nunchaku.merge_safetensors"))


def commit_of(src: str, given: str | None) -> str:
    if given:
        return given
    try:
        return subprocess.check_output(["git", "-C", src, "rev-parse", "HEAD"], text=True).strip()
    except Exception:  # noqa: BLE001
        sys.exit(f"{src}: not a git checkout; pass its commit")


def read_file(path: str) -> tuple[dict, dict]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def make_case(conv, merge, case: str, seed: int, workdir: str) -> dict:
    spec = P.CASES[case]
    cfg = P.case_config(case)
    weights = P.synthetic_weights(cfg, seed)
    ckpt = P.deepcompressor_checkpoint(weights, cfg, spec["kind"], spec["rank"], spec["scales"], seed)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        converted, other = conv.convert_to_nunchaku_flux_state_dicts(
            state_dict=copy.deepcopy(ckpt["model"]), scale_dict=copy.deepcopy(ckpt["scale"]),
            smooth_dict=copy.deepcopy(ckpt["smooth"]), branch_dict=copy.deepcopy(ckpt["branch"]),
            float_point=spec["kind"] == "fp4")
    folder = os.path.join(workdir, case)
    os.makedirs(folder)
    save_file(converted, os.path.join(folder, "transformer_blocks.safetensors"))
    save_file(other, os.path.join(folder, "unquantized_layers.safetensors"))
    for name, text in P.folder_texts(cfg).items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as fh:
            fh.write(text)
    state_dict, metadata = merge.merge_safetensors(folder, "NunchakuFluxTransformer2dModel")
    merged_path = os.path.join(workdir, f"{case}.safetensors")
    save_file(state_dict, merged_path, metadata=metadata)
    tensors, meta = read_file(merged_path)

    tensors_out, padded = {}, {}
    for k, t in sorted(tensors.items()):
        mod, _, param = k.rpartition(".")
        qweight = tensors.get(f"{mod}.qweight")
        if param in ("wscales", "wzeros") and qweight is not None and qweight.dtype == torch.int32:
            rows = -(-qweight.shape[1] * 2 // 64)  # GEMV_AWQ: ceilDiv(in_features, group_size 64)
            assert not t[rows:].any(), f"{k}: expected zero padding after row {rows}"
            padded[k] = list(t.shape)
            t = t[:rows]
        tensors_out[k] = P.manifest_entry(t)
    return {"spec": spec, "seed": seed, "config": cfg, "metadata": meta,
            "files": {"transformer_blocks.safetensors": sorted(converted),
                      "unquantized_layers.safetensors": sorted(other)},
            "converter_padded_shapes": padded, "tensors": tensors_out}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--deepcompressor-src", required=True)
    ap.add_argument("--nunchaku-src", required=True)
    ap.add_argument("--deepcompressor-commit", default=None)
    ap.add_argument("--nunchaku-commit", default=None)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    dc_src, nk_src = os.path.abspath(args.deepcompressor_src), os.path.abspath(args.nunchaku_src)
    conv, merge = load_tools(dc_src, nk_src)
    version = "unknown"
    vfile = os.path.join(nk_src, "nunchaku", "__version__.py")
    if os.path.isfile(vfile):
        with open(vfile, encoding="utf-8") as fh:
            m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", fh.read())
        version = m.group(1) if m else version
    with tempfile.TemporaryDirectory() as work:
        cases = {case: make_case(conv, merge, case, args.seed, work) for case in P.CASES}
    out = {"generator": "scripts/make_svdquant_converter_fixture.py",
           "deepcompressor_commit": commit_of(dc_src, args.deepcompressor_commit),
           "deepcompressor_files": "deepcompressor/backend/nunchaku/convert.py, deepcompressor/backend/nunchaku/"
                                   "utils.py, deepcompressor/backend/tinychat/utils.py, "
                                   "deepcompressor/backend/utils.py",
           "nunchaku_commit": commit_of(nk_src, args.nunchaku_commit), "nunchaku_version": version,
           "nunchaku_files": "nunchaku/merge_safetensors.py, nunchaku/utils.py",
           "torch": torch.__version__, "cases": cases}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1, sort_keys=True)
        fh.write("\n")
    counts = ", ".join(f"{c} ({len(v['tensors'])} tensors)" for c, v in cases.items())
    print(f"wrote {args.out}: {counts}; {os.path.getsize(args.out)} bytes")


if __name__ == "__main__":
    main()
