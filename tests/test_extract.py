"""python -m dcgen_core.extract: aligned embedding + LoRA from a full DC-Gen-FLUX checkpoint and its base.

TinyDCGen's full model is base + a rank-4 LoRA (alpha / rank = 2) + an aligned embedding, so an extraction at
rank >= 4 must give back exactly those deltas and that embedding, and base + extracted files through the pack's
nodes must draw the full model's image (as test_parity_e2e checks for the shipped files).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import tiny
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dcgen_core.shared.errors import DCGenError
from dcgen_core.tools.extract import extract
from dcgen_core.flux.keys import diffusers_to_bfl

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = re.compile(r"total relative error ([0-9.e+-]+)")


def _dcgen_config(t) -> dict:
    return dict(t.config, in_channels=t.latent_channels, out_channels=t.latent_channels)


def _save_single(sd: dict, path: str, config: dict | None = None) -> str:
    meta = {"config": json.dumps(config)} if config else None
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=meta)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dcgen):
    d = tmp_path_factory.mktemp("extract")
    full = tiny_dcgen.save_dcgen_diffusers_folder(str(d / "DC-Gen-FLUX-tiny"))  # sharded diffusers folder
    base = tiny_dcgen.save_base_single_file(str(d / "flux-base.safetensors"))  # diffusers keys, one file
    # the same two in BFL keys (ComfyUI's prefix on the base, as a ComfyUI-saved checkpoint); the config in the
    # header gives the tiny model's RoPE axes (head dim 16), which BFL weights cannot tell
    full_bfl = _save_single(diffusers_to_bfl(dict(tiny_dcgen.dcgen.state_dict())), str(d / "full-bfl.safetensors"),
                            _dcgen_config(tiny_dcgen))
    base_bfl = _save_single({f"model.diffusion_model.{k}": v
                             for k, v in diffusers_to_bfl(dict(tiny_dcgen.base.state_dict())).items()},
                            str(d / "base-bfl.safetensors"), tiny_dcgen.base_config)
    return SimpleNamespace(dir=d, full=full, base=base, full_bfl=full_bfl, base_bfl=base_bfl)


def true_deltas(t) -> dict:
    scale = tiny.LORA_ALPHA / tiny.LORA_RANK
    return {m: scale * t.lora[f"transformer.{m}.lora_B.weight"] @ t.lora[f"transformer.{m}.lora_A.weight"]
            for m in tiny.lora_modules(t.config["num_layers"], t.config["num_single_layers"])}


def lora_deltas(sd: dict) -> dict:
    """module -> alpha / rank * up @ down, as ComfyUI's loaders compute it."""
    out = {}
    for k, down in sd.items():
        if k.endswith(".lora_A.weight"):
            m = k[len("transformer."):-len(".lora_A.weight")]
            up = sd[f"transformer.{m}.lora_B.weight"]
            alpha = sd[f"transformer.{m}.alpha"].item()
            out[m] = (alpha / down.shape[0]) * up.float() @ down.float()
    return out


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("rank,layout", [(4, "diffusers"), (40, "bfl")])
def test_rank_at_least_the_true_rank_is_exact(files, tiny_dcgen, tmp_path, rank, layout):
    """Rank 4 (the true rank) and rank 40 (above every layer's full rank: each stored at its own rank, alpha =
    that rank) give back the true deltas and the true embedding, from either key layout."""
    full, base = (files.full, files.base) if layout == "diffusers" else (files.full_bfl, files.base_bfl)
    out = str(tmp_path / "lora.safetensors")
    report = extract(full, base, out, rank, log=None)
    sd = load_file(out)
    expected = true_deltas(tiny_dcgen)
    got = lora_deltas(sd)
    assert set(got) == set(expected)  # only the LoRA's targets differ; q/k/v and proj_mlp as their own modules
    for m, delta in expected.items():
        assert _rel(got[m], delta) <= 1e-5, m
        r = sd[f"transformer.{m}.lora_A.weight"].shape[0]
        assert r == min(rank, *delta.shape) and sd[f"transformer.{m}.alpha"].item() == r  # scale 1
    assert not [k for k in sd if not k.endswith((".lora_A.weight", ".lora_B.weight", ".alpha"))]
    assert report["total_relative_error"] <= 1e-5 and not report["skipped"]
    emb = load_file(report["embedding"])
    assert report["embedding"] == str(tmp_path / "lora-embedding.safetensors")
    assert set(emb) == set(tiny_dcgen.embedding)
    for k, v in tiny_dcgen.embedding.items():
        assert torch.equal(emb[k], v), k
    with safe_open(out, "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["lora_alpha"] == meta["r"]


def test_truncated_rank_error_is_printed_and_falls_with_rank(files, tiny_dcgen, tmp_path):
    lines_by_rank, totals = {}, {}
    for rank in (1, 2, 3, 4):
        lines = []
        report = extract(files.full, files.base, str(tmp_path / f"r{rank}.safetensors"), rank, log=lines.append)
        lines_by_rank[rank] = lines
        totals[rank] = float(TOTAL.search("\n".join(lines)).group(1))
        assert math.isclose(totals[rank], report["total_relative_error"], rel_tol=1e-3)
    assert totals[1] > totals[2] > totals[3] > 0.01 and totals[4] < 1e-5
    # each layer's printed error is the best rank-R one (Eckart-Young): the singular values left out
    m = "transformer_blocks.0.attn.to_k"
    s = torch.linalg.svdvals(true_deltas(tiny_dcgen)[m].double())
    line = next(x for x in lines_by_rank[2] if x.strip().startswith(m + " "))
    printed = float(re.search(r"relative error ([0-9.e+-]+)", line).group(1))
    assert math.isclose(printed, (s[2:].norm() / s.norm()).item(), rel_tol=1e-3)
    assert any("MiB" in x and "r2.safetensors" in x for x in lines_by_rank[2])  # file sizes


def test_norms_biases_and_other_linears(comfyui, comfy_models, tiny_dcgen, files, tmp_path, caplog):
    """A full model that also changed an RMSNorm, biases (a fused q/k/v one, norm_out's swapped one, a plain one)
    and a modulation linear: norms go in as .diff, biases as .diff_b, the linear as LoRA; core LoraLoaderModelOnly
    and DC-Gen Load LoRA patch the base into exactly the full model's weights (v0.3.64 and v0.33 names)."""
    from dcgen_core.shared.comfy_compat import norm_param_in

    g = torch.Generator().manual_seed(5)
    sd = {k: v.clone() for k, v in tiny_dcgen.dcgen.state_dict().items()}
    for k in ("transformer_blocks.0.attn.norm_added_k.weight", "single_transformer_blocks.1.attn.norm_q.weight",
              "single_transformer_blocks.0.attn.to_k.bias", "transformer_blocks.0.attn.add_v_proj.bias",
              "norm_out.linear.bias", "transformer_blocks.0.ff.net.2.bias", "transformer_blocks.0.norm1.linear.weight",
              "norm_out.linear.weight"):
        sd[k] += 0.05 * torch.randn(sd[k].shape, generator=g)
    full = _save_single(sd, str(tmp_path / "full-more.safetensors"), _dcgen_config(tiny_dcgen))
    name = "extracted-more.safetensors"
    report = extract(full, files.base, os.path.join(comfyui.dirs["loras"], name), 64, log=None, overwrite=True)
    kinds = {(e["module"], e["kind"]) for e in report["layers"]}
    assert {("transformer_blocks.0.attn.norm_added_k", "diff"), ("single_blocks.0.linear1", "diff_b"),
            ("double_blocks.0.txt_attn.qkv", "diff_b"), ("final_layer.adaLN_modulation.1", "diff_b"),
            ("transformer_blocks.0.norm1.linear", "lora"), ("norm_out.linear", "lora")} <= kinds
    assert report["total_relative_error"] < 1e-5

    nodes = comfyui.runtime.node_classes
    base = nodes["DCGenModelLoader"]().load(comfy_models.base, "default")[0]
    models = {"pack": nodes["DCGenLoraLoader"]().apply(base, name, 1.0)[0]}
    with caplog.at_level("WARNING"):
        models["core"] = nodes["LoraLoaderModelOnly"]().load_lora_model_only(base, name, 1.0)[0]
    assert "not loaded" not in caplog.text  # core reads every entry (.alpha, .diff, .diff_b included)
    import comfy.lora

    expected = diffusers_to_bfl(sd)
    for loader, model in models.items():
        model_sd = model.model_state_dict()
        for k, w in model_sd.items():
            if not k.startswith("diffusion_model.") or k.startswith(("diffusion_model.img_in.",
                                                                      "diffusion_model.final_layer.linear.")):
                continue  # the base's own embedder/head: the embedding replaces them
            bfl = k[len("diffusion_model."):]
            want = expected[bfl] if bfl in expected else expected[norm_param_in(bfl, expected)]
            got = comfy.lora.calculate_weight(model.patches[k], w.detach().clone().float(), k) \
                if k in model.patches else w.float()
            assert torch.allclose(got, want, atol=1e-5), (loader, k)


SEED, STEPS, GUIDANCE, SIZE = 42, 4, 3.5, (256, 256)


@pytest.fixture(scope="module")
def reference(tiny_dcgen, tiny_vae):
    cond, pooled = tiny.prompt_embeddings(seed=7)
    image, _ = tiny.reference_images(tiny_dcgen.dcgen, tiny_vae, *SIZE, SEED, STEPS, GUIDANCE, cond, pooled)
    return cond, pooled, image


@pytest.mark.parametrize("route", ["embedding+lora", "lora-carrying-embedding"])
def test_base_plus_extracted_files_draw_the_full_model(comfyui, comfy_models, files, reference, route):
    import test_parity_e2e as parity

    lora = f"extracted-{route}.safetensors"
    emb = f"extracted-{route}-embedding.safetensors"
    extract(files.full, files.base, os.path.join(comfyui.dirs["loras"], lora), 4, log=None, overwrite=True,
            embedding_out=None if route == "lora-carrying-embedding" else os.path.join(
                comfyui.dirs["dcgen_embeddings"], emb), embed_in_lora=route == "lora-carrying-embedding")
    models = SimpleNamespace(**vars(comfy_models))
    models.embedding, models.lora, models.lora_with_embedding = emb, lora, lora
    key = f"extract-{route}"
    cond, pooled, ref = reference
    comfyui.test_nodes.EMBEDDINGS[key] = (cond, pooled)
    nodes, model_ref = parity.ROUTES[route](models)
    comfyui.runtime.run(parity._ksampler_prompt(nodes, model_ref, key, *SIZE, models))
    ours = comfyui.test_nodes.CAPTURED[key]["image"]
    assert ours.shape == ref.shape
    assert ((ref > 0.01) & (ref < 0.99)).float().mean() > 0.5
    assert (ours - ref).abs().max().item() <= parity.IMAGE_TOL


def _cli(*args, cwd=PACK_DIR):
    return subprocess.run([sys.executable, "-m", "dcgen_core.extract", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_writes_the_files(files, tmp_path):
    out = tmp_path / "cli.safetensors"
    res = _cli(files.full, files.base, out, "--rank", 4)
    assert res.returncode == 0, res.stderr
    assert out.is_file() and (tmp_path / "cli-embedding.safetensors").is_file()
    assert "total relative error" in res.stdout and "transformer_blocks.0.attn.to_q" in res.stdout
    assert f"wrote {out}" in res.stdout
    again = _cli(files.full, files.base, out, "--rank", 4)  # no silent overwrite
    assert again.returncode == 1 and "--overwrite" in again.stderr
    bad = _cli(files.base, files.base, tmp_path / "x.safetensors", "--rank", 4)
    assert bad.returncode == 1 and "nothing to extract" in bad.stderr and str(files.base) in bad.stderr
    assert not (tmp_path / "x.safetensors").exists()


@pytest.fixture(scope="module")
def other_archs(tmp_path_factory):
    d = tmp_path_factory.mktemp("other-archs")
    shallow = tiny.TinyDCGen(seed=1, flux_config={"num_single_layers": 1})
    wide = tiny.TinyDCGen(seed=1, flux_config={"num_attention_heads": 3})
    return SimpleNamespace(shallow=shallow.save_base_single_file(str(d / "base-1-single.safetensors")),
                           wide=wide.save_base_single_file(str(d / "base-hidden-48.safetensors")))


@pytest.mark.parametrize("case", ["depth", "width", "full-not-dcgen", "base-not-flux", "rank-0"])
def test_bad_input(files, other_archs, tmp_path, case):
    full, base, rank = files.full, files.base, 4
    if case == "depth":
        base, expect = other_archs.shallow, ["depth_single_blocks 1 vs 2", "base-1-single.safetensors",
                                             "DC-Gen-FLUX-tiny"]
    elif case == "width":
        base, expect = other_archs.wide, ["hidden_size 48 vs 32", "base-hidden-48.safetensors"]
    elif case == "full-not-dcgen":
        full, expect = files.base, ["FULL", "expected a DC-Gen transformer", "same 64-channel embedder",
                                    "nothing to extract"]
    elif case == "base-not-flux":
        full, base, expect = files.full, files.full_bfl, ["BASE", "full-bfl.safetensors", "64-channel embedder",
                                                          "found 32 in / 32 out"]
    else:
        rank, expect = 0, ["--rank", "found 0"]
    out = tmp_path / "bad.safetensors"
    with pytest.raises(DCGenError) as err:
        extract(full, base, str(out), rank, log=None)
    for text in expect:
        assert text in str(err.value), (text, str(err.value))
    assert not out.exists() and not (tmp_path / "bad-embedding.safetensors").exists()


def test_min_delta_leaves_out_small_layers(files, tiny_dcgen, tmp_path):
    out = str(tmp_path / "min-delta.safetensors")
    report = extract(files.full, files.base, out, 4, min_delta=4.5, log=None)
    skipped = {s["module"] for s in report["skipped"]}
    kept = set(lora_deltas(load_file(out)))
    deltas = true_deltas(tiny_dcgen)
    assert skipped and kept and skipped | kept == set(deltas) and not skipped & kept
    assert all(s["relative_delta"] < 4.5 for s in report["skipped"])
    left_out = sum(deltas[m].square().sum() for m in skipped) / sum(d.square().sum() for d in deltas.values())
    assert math.isclose(report["total_relative_error"], left_out.sqrt().item(), rel_tol=1e-4)
