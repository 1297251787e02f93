"""Make tests/fixtures/svdquant_packing.safetensors with nunchaku's OWN packing code (run once, commit the output).

    python scripts/make_svdquant_fixture.py --nunchaku-src /path/to/nunchaku-checkout [--out PATH] [--seed 0]

``--nunchaku-src`` is a checkout of https://github.com/nunchaku-tech/nunchaku (formerly mit-han-lab/nunchaku); its
commit is recorded in the fixture metadata. Nothing is built or installed: the pure python/torch files

* nunchaku/lora/flux/packer.py            (NunchakuWeightPacker: pack_weight, pack_scale, pack_micro_scale,
                                            pack_lowrank_weight, pad_*)
* nunchaku/lora/flux/utils.py, nunchaku/utils.py   (pad, ceil_divide: imported by packer.py)
* nunchaku/models/text_encoders/tinychat_utils.py   (pack_w4 / convert_to_tinychat_w4x16y16_linear_weight: AWQ)
* nunchaku/lora/flux/nunchaku_converter.py          (optional: its own pack_lowrank_weight, cross-checked)

are imported by path. The package ``__init__`` files of ``nunchaku``, ``nunchaku.lora``, ``nunchaku.lora.flux``,
``nunchaku.models`` and ``nunchaku.models.text_encoders`` are replaced by empty stub packages (``__path__`` set to the
checkout's folders) because ``nunchaku/__init__.py`` imports the models, which import the CUDA extension
``nunchaku._C``; no module of the CUDA extension itself is stubbed or needed.

The conversion steps that live in deepcompressor rather than nunchaku (the order in which it calls the packer, the
AdaLN row interleave and "+1" of deepcompressor/backend/nunchaku/utils.py convert_to_nunchaku_w4x16_linear_weight)
are reproduced here, each citing that file.

Cases (out x in, rank): a = 256 x 128 r32, b = 128 x 384 r16, for int4 (group 64, bf16 scales) and fp4 (group 16,
fp8 e4m3 scales, per-channel wcscales and per-tensor wtscale); plus one AWQ W4A16 AdaLN linear (6 x 32 rows, in 128).
Natural tensors are stored under ``<case>.natural.*`` and nunchaku's packing under ``<case>.packed.*``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import types

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "svdquant_packing.safetensors")

CASES = {"a": (256, 128, 32), "b": (128, 384, 16)}
GROUP = {"int4": 64, "fp4": 16}


def load_nunchaku(src: str) -> dict[str, types.ModuleType]:
    pkg = os.path.join(src, "nunchaku")
    if not os.path.isfile(os.path.join(pkg, "lora", "flux", "packer.py")):
        sys.exit(f"{src}: expected a nunchaku checkout (nunchaku/lora/flux/packer.py), found none.")
    for name, sub in (("nunchaku", ""), ("nunchaku.lora", "lora"), ("nunchaku.lora.flux", "lora/flux"),
                      ("nunchaku.models", "models"), ("nunchaku.models.text_encoders", "models/text_encoders")):
        stub = types.ModuleType(name)  # stub package: its real __init__ would import the CUDA extension
        stub.__path__ = [os.path.join(pkg, sub)]
        sys.modules[name] = stub
    mods = {
        "packer": importlib.import_module("nunchaku.lora.flux.packer"),
        "tinychat": importlib.import_module("nunchaku.models.text_encoders.tinychat_utils"),
    }
    try:
        mods["converter"] = importlib.import_module("nunchaku.lora.flux.nunchaku_converter")
    except Exception as e:  # noqa: BLE001 - needs diffusers; only used for a cross-check
        print(f"note: nunchaku_converter not importable ({type(e).__name__}: {e}); skipping its cross-check")
    return mods


def nunchaku_commit(src: str, given: str | None) -> str:
    if given:
        return given
    try:
        return subprocess.check_output(["git", "-C", src, "rev-parse", "HEAD"], text=True).strip()
    except Exception:  # noqa: BLE001
        sys.exit(f"{src}: not a git checkout; pass --nunchaku-commit")


def make_svdq(packer_mod, conv_mod, kind: str, out: int, inn: int, rank: int, g: torch.Generator) -> dict:
    gs = GROUP[kind]
    ng = inn // gs
    bf = torch.bfloat16
    nat = {}
    if kind == "int4":
        nat["codes"] = torch.randint(-8, 8, (out, inn), generator=g, dtype=torch.int32)
        nat["wscales"] = (torch.rand(out, ng, generator=g) * 0.05 + 0.005).to(bf)
    else:
        nat["codes"] = torch.randint(0, 16, (out, inn), generator=g, dtype=torch.int32)
        # e4m3 values (exact in bf16), so that pack_micro_scale's cast to fp8 is lossless
        nat["wscales"] = (torch.rand(out, ng, generator=g) * 6 + 0.02).to(torch.float8_e4m3fn).to(bf)
        nat["wcscales"] = (torch.rand(out, generator=g) * 0.5 + 0.75).to(bf)
        nat["wtscale"] = torch.tensor([0.0123], dtype=bf)
    nat["smooth"] = (torch.rand(inn, generator=g) * 1.5 + 0.25).to(bf)
    nat["smooth_orig"] = (torch.rand(inn, generator=g) * 1.5 + 0.25).to(bf)
    nat["bias"] = (torch.randn(out, generator=g) * 0.1).to(bf)
    nat["lora_down"] = (torch.randn(rank, inn, generator=g) * 0.05).to(bf)   # [rank, in]
    nat["lora_up"] = (torch.randn(out, rank, generator=g) * 0.05).to(bf)     # [out, rank]

    # the call sequence of deepcompressor/backend/nunchaku/utils.py convert_to_nunchaku_w4x4y16_linear_weight,
    # with nunchaku's NunchakuWeightPacker (nunchaku/lora/flux/packer.py)
    packer = packer_mod.NunchakuWeightPacker(bits=4)
    pk = {}
    pk["qweight"] = packer.pack_weight(packer.pad_weight(nat["codes"].clone()))
    pk["wscales"] = packer.pack_scale(packer.pad_scale(nat["wscales"].clone(), group_size=gs), group_size=gs)
    for k in ("bias", "smooth", "smooth_orig") + (("wcscales",) if kind == "fp4" else ()):
        pk[k] = packer.pack_scale(packer.pad_scale(nat[k].view(-1, 1).clone(), group_size=-1), group_size=-1)
    if kind == "fp4":
        pk["wtscale"] = nat["wtscale"].clone()
    pk["lora_down"] = packer.pack_lowrank_weight(packer.pad_lowrank_weight(nat["lora_down"], down=True), down=True)
    pk["lora_up"] = packer.pack_lowrank_weight(packer.pad_lowrank_weight(nat["lora_up"], down=False), down=False)
    if conv_mod is not None:  # nunchaku's LoRA converter has its own copy of the low-rank packer: must agree
        assert torch.equal(conv_mod.pack_lowrank_weight(nat["lora_down"], down=True), pk["lora_down"])
        assert torch.equal(conv_mod.pack_lowrank_weight(nat["lora_up"], down=False), pk["lora_up"])
        assert torch.equal(conv_mod.unpack_lowrank_weight(pk["lora_down"], down=True), nat["lora_down"])
        assert torch.equal(packer.unpack_lowrank_weight(pk["lora_up"], down=False), nat["lora_up"])
    assert pk["qweight"].dtype == torch.int8 and list(pk["qweight"].shape) == [out, inn // 2]
    assert list(pk["wscales"].shape) == [ng, out]
    assert pk["wscales"].dtype == (torch.float8_e4m3fn if kind == "fp4" else bf)
    assert list(pk["lora_down"].shape) == [inn, rank] and list(pk["lora_up"].shape) == [out, rank]
    nat["codes"] = nat["codes"].to(torch.int8 if kind == "int4" else torch.uint8)
    if kind == "fp4":
        nat["wscales"] = nat["wscales"].to(torch.float8_e4m3fn)  # exact (checked above by construction)
    return {"natural": nat, "packed": pk}


def make_awq(tinychat, g: torch.Generator, splits: int = 6, per: int = 32, inn: int = 128, gs: int = 64) -> dict:
    out, ng, bf = splits * per, inn // gs, torch.bfloat16
    # diffusers-order AdaLN linear, exactly representable: (q - 7) * 2^-e, bias k / 64
    q_d = torch.randint(0, 16, (out, inn), generator=g, dtype=torch.int32)
    s_d = torch.pow(2.0, -torch.randint(4, 9, (out, ng), generator=g).float()).to(bf)
    w_d = ((q_d.float() - 7).view(out, ng, gs) * s_d.float()[:, :, None]).view(out, inn).to(bf)
    b_d = (torch.randint(-63, 64, (out,), generator=g).float() / 64).to(bf)
    # deepcompressor/backend/nunchaku/utils.py convert_to_nunchaku_w4x16_linear_weight (adanorm_splits > 1)
    w = w_d.view(splits, per, inn).transpose(0, 1).reshape(out, inn)
    s = s_d.view(splits, per, ng).transpose(0, 1).reshape(out, ng)
    b = b_d.float().reshape(splits, per).transpose(0, 1)
    delta = [0] * splits
    delta[1] = delta[-2] = 1
    b = (b + torch.tensor(delta, dtype=torch.float32)).reshape(out).to(bf)
    qw, ws, wz = tinychat.convert_to_tinychat_w4x16y16_linear_weight(
        weight=w, scale=s, zero=torch.full_like(s, 7), group_size=gs, zero_pre_scaled=True)
    q_interleaved = q_d.view(splits, per, inn).transpose(0, 1).reshape(out, inn)
    nat = {"codes": q_interleaved.to(torch.uint8), "weight_diffusers": w_d, "bias_diffusers": b_d,
           "scales": s.contiguous()}
    pk = {"qweight": qw.view(torch.int32), "wscales": ws, "wzeros": wz, "bias": b}
    return {"natural": nat, "packed": pk}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nunchaku-src", required=True, help="path to a nunchaku repository checkout")
    ap.add_argument("--nunchaku-commit", default=None, help="commit of that checkout (default: git rev-parse HEAD)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    src = os.path.abspath(args.nunchaku_src)
    mods = load_nunchaku(src)
    commit = nunchaku_commit(src, args.nunchaku_commit)
    version = {}
    vfile = os.path.join(src, "nunchaku", "__version__.py")
    if os.path.isfile(vfile):
        with open(vfile, encoding="utf-8") as fh:
            m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", fh.read())
        version["__version__"] = m.group(1) if m else "unknown"
    g = torch.Generator().manual_seed(args.seed)

    tensors, cases = {}, {}
    for kind in ("int4", "fp4"):
        for case, (out, inn, rank) in CASES.items():
            name = f"{kind}_{case}"
            made = make_svdq(mods["packer"], mods.get("converter"), kind, out, inn, rank, g)
            cases[name] = {"kind": kind, "out": out, "in": inn, "rank": rank, "group_size": GROUP[kind]}
            for part in ("natural", "packed"):
                for k, v in made[part].items():
                    tensors[f"{name}.{part}.{k}"] = v.contiguous()
    made = make_awq(mods["tinychat"], g)
    cases["awq"] = {"kind": "awq_w4a16", "out": 192, "in": 128, "group_size": 64, "adanorm_splits": 6}
    for part in ("natural", "packed"):
        for k, v in made[part].items():
            tensors[f"awq.{part}.{k}"] = v.contiguous()

    meta = {
        "nunchaku_commit": commit,
        "nunchaku_version": str(version.get("__version__", "unknown")),
        "nunchaku_files": "nunchaku/lora/flux/packer.py, nunchaku/models/text_encoders/tinychat_utils.py",
        "generator": "scripts/make_svdquant_fixture.py",
        "seed": str(args.seed),
        "cases": json.dumps(cases),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(tensors, args.out, metadata=meta)
    print(f"wrote {args.out}: {len(tensors)} tensors, {os.path.getsize(args.out)} bytes, nunchaku {commit}")


if __name__ == "__main__":
    main()
