"""``python -m dcgen_core.train prepare`` for SANA (CPU, tiny models).

A tiny random HF Gemma-2 (soft-capped attention, as SANA's) and a tiny SentencePiece-trained Gemma tokenizer
(tests/test_sana_text_encoder.py's builders) are saved as a SANA diffusers pipeline folder (model_index.json,
text_encoder/, tokenizer/ with tokenizer.json); the oracle for the text is diffusers' own
``SanaPipeline.encode_prompt`` with the complex human instruction (``SanaPipeline.__call__``'s default) on the same
model and tokenizer. Latents: diffusers ``AutoencoderDC.encode(x).latent * scaling_factor`` on the same images.
"""

from __future__ import annotations

import json
import os

import pytest
import tiny
import torch
from test_sana_text_encoder import _hf_gemma2, _hf_tokenizer, _train_spm  # the tiny Gemma-2 builders (skip w/o spm)

from dcgen_core.sana.text_encoder import COMPLEX_HUMAN_INSTRUCTION
from dcgen_core.shared.errors import DCGenError
from dcgen_core.tools.train.__main__ import main as train_main
from dcgen_core.tools.train.cache import LatentCache
from dcgen_core.tools.train.data import load_image, prepare
from dcgen_core.tools.train.sana_text import SanaTextEncoder, pipeline_family


TEXT_TOL = 1e-6  # Gemma-2 context vs SanaPipeline.encode_prompt, max abs, fp32 CPU (same model, same tokens)
LATENT_TOL = 1e-5  # pack DC-AE vs diffusers AutoencoderDC, relative, fp32 CPU
CAPTIONS = {"a": "A Photo of an astronaut riding a horse on the moon, 4K, detailed ",
            "b": "a cat sleeping on a warm sunny windowsill",
            "sub/c": "red car, city street at dusk, " * 80}  # past 300 tokens: truncated, mask all ones
SIZES = {"a": (128, 128), "b": (140, 120), "sub/c": (200, 70)}  # the last one goes to the 192x64 bucket
KEYS = ("base_latents", "dcae_latents", "context", "context_mask")


pytestmark = pytest.mark.usefixtures("one_thread")


class Assets:
    def __init__(self, root: str):
        from diffusers import AutoencoderKL
        from PIL import Image

        self.root = root
        self.tokenizer = _hf_tokenizer(_train_spm())
        self.gemma = _hf_gemma2(len(self.tokenizer), softcap=50.0, seed=4, qk_gain=6.0)
        self.sana = os.path.join(root, "sana-pipeline")
        self.gemma.save_pretrained(os.path.join(self.sana, "text_encoder"))
        self.tokenizer.save_pretrained(os.path.join(self.sana, "tokenizer"))
        with open(os.path.join(self.sana, "model_index.json"), "w", encoding="utf-8") as f:
            json.dump({"_class_name": "SanaPipeline", "text_encoder": ["transformers", "Gemma2Model"],
                       "tokenizer": ["transformers", "GemmaTokenizer"]}, f)
        self.target, self.base = tiny.tiny_dcae15(), tiny.tiny_dcae()  # f64c128 target, SANA's f32c32
        self.target_dir = tiny.save_dcae_folder(self.target, os.path.join(root, "dc-ae-1.5-f64c128-tiny"))
        self.base_dir = tiny.save_dcae_folder(self.base, os.path.join(root, "dc-ae-f32c32-sana-1.1"))
        torch.manual_seed(0)
        AutoencoderKL(latent_channels=16, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      use_quant_conv=False, use_post_quant_conv=False).save_pretrained(os.path.join(root, "flux-vae"))
        self.flux_vae = os.path.join(root, "flux-vae")
        self.data = os.path.join(root, "data")
        os.makedirs(os.path.join(self.data, "sub"))
        g = torch.Generator().manual_seed(1)
        for name, (w, h) in SIZES.items():
            arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(os.path.join(self.data, f"{name}.png"))
            with open(os.path.join(self.data, f"{name}.txt"), "w", encoding="utf-8") as f:
                f.write(CAPTIONS[name])

    @property
    def width(self) -> int:
        return self.gemma.config.hidden_size

    @torch.no_grad()
    def oracle_text(self, captions, instruction=COMPLEX_HUMAN_INSTRUCTION):
        from diffusers import SanaPipeline

        pipe = SanaPipeline(tokenizer=self.tokenizer, text_encoder=self.gemma, vae=None, transformer=None,
                            scheduler=None)
        embeds, mask, _, _ = pipe.encode_prompt(list(captions), do_classifier_free_guidance=False,
                                                device=torch.device("cpu"), complex_human_instruction=instruction)
        return embeds.float(), mask.float()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return Assets(str(tmp_path_factory.mktemp("sana-prepare")))


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_gemma_encoder_matches_sana_pipeline(assets):
    """(a) The folder's Gemma-2 + tokenizer (loaded from disk) give SanaPipeline.encode_prompt's context and mask."""
    enc = SanaTextEncoder(assets.sana, torch.device("cpu"), torch.float32)
    names, captions = list(CAPTIONS), list(CAPTIONS.values())
    ctx, mask = enc.encode(names, captions)
    ref_ctx, ref_mask = assets.oracle_text(captions)
    assert ctx.shape == ref_ctx.shape == (3, 300, assets.width) and mask.shape == (3, 300)
    assert torch.equal(mask, ref_mask)
    assert 1 < mask[1].sum() < mask[0].sum() < 300 and mask[2].sum() == 300  # padded, padded, truncated
    assert (ctx - ref_ctx).abs().max().item() <= TEXT_TOL
    # the instruction is part of the conditioning: without it the context differs
    assert (ctx - assets.oracle_text(captions, instruction=None)[0]).abs().max().item() > 1e-3
    assert enc.describe()["complex_human_instruction"] is True


def test_prepare_sana_cache(assets, tmp_path):
    """(b) An image folder -> a SANA cache (family from the folder): f64c128 target and f32c32 base latents equal
    diffusers' encodes, Gemma-2 context and mask equal SanaPipeline's, buckets on both grids, no pooled/null."""
    out = tmp_path / "cache"
    assert train_main(["prepare", assets.data, str(out), "--dcae", assets.target_dir, "--base-vae", assets.base_dir,
                       "--text-encoder", assets.sana, "--resolution", "128", "--max-aspect", "3", "--batch-size", "2",
                       "--shard-size", "2", "--text-dtype", "float32", "--device", "cpu", "--no-progress"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["family"] == "sana" and index["null_text"] is None
    assert index["buckets"] == [[128, 128], [192, 64]]
    assert all(v % 64 == 0 and v % 32 == 0 for b in index["buckets"] for v in b)
    width = assets.width
    assert index["bucket_shapes"] == {
        "128x128": {"base_latents": [32, 4, 4], "dcae_latents": [128, 2, 2], "context": [300, width],
                    "context_mask": [300]},
        "192x64": {"base_latents": [32, 2, 6], "dcae_latents": [128, 1, 3], "context": [300, width],
                   "context_mask": [300]}}
    assert "pooled" not in index["shapes"] and index["base_vae"]["channels"] == 32
    assert {it["name"]: it["bucket"] for it in index["items"]} == {"a": "128x128", "b": "128x128",
                                                                    "sub/c": "192x64"}
    cache = LatentCache(str(out))
    assert cache.family == "sana"
    for i, item in enumerate(index["items"]):
        got = cache.batch([i], keys=KEYS)
        w, h = (int(v) for v in item["bucket"].split("x"))
        image = load_image(os.path.join(assets.data, f"{item['name']}.png"), w, h)[None]
        with torch.no_grad():
            target = assets.target.encode(image).latent * assets.target.config.scaling_factor
            base = assets.base.encode(image).latent * assets.base.config.scaling_factor
        assert _rel(got["dcae_latents"], target) <= LATENT_TOL
        assert _rel(got["base_latents"], base) <= LATENT_TOL
        ref_ctx, ref_mask = assets.oracle_text([CAPTIONS[item["name"]]])
        assert torch.equal(got["context_mask"], ref_mask)
        assert (got["context"] - ref_ctx).abs().max().item() <= TEXT_TOL


def test_prepare_sana_hash_and_precomputed(assets, tmp_path):
    """The hash:D,0,T stand-in (family sana by its pooled dim 0): its context and a mask of min(T, words + 1)
    ones; a precomputed SANA file with and without masks; no --base-vae -> no base latents."""
    from safetensors.torch import save_file

    from dcgen_core.tools.train.encoders import HashTextEncoder

    out = tmp_path / "hash"
    path = prepare(assets.data, str(out), dcae=assets.target_dir, text_embeddings_from="hash:16,0,12",
                   resolution="128", buckets="none", text_dtype="float32", device="cpu", progress=False, log=None)
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    assert index["family"] == "sana" and index["shapes"] == {"dcae_latents": [128, 2, 2], "context": [12, 16],
                                                              "context_mask": [12]}
    got = LatentCache(str(out)).batch([0, 1, 2], keys=("context", "context_mask"))
    ref = HashTextEncoder("hash:16,0,12")
    for i, name in enumerate(sorted(CAPTIONS)):
        caption = CAPTIONS[name].strip()
        assert torch.equal(got["context"][i], ref._one(caption)[0])
        ones = min(12, len(caption.split()) + 1)
        assert got["context_mask"][i].tolist() == [1.0] * ones + [0.0] * (12 - ones)

    g = torch.Generator().manual_seed(2)
    sd = {f"{n}.context": torch.randn(9, 8, generator=g) for n in CAPTIONS}
    sd["a.context_mask"] = torch.tensor([1.0] * 4 + [0.0] * 5)
    save_file(sd, str(tmp_path / "text.safetensors"))
    prepare(assets.data, str(tmp_path / "pre"), dcae=assets.target_dir, family="sana",
            text_embeddings_from=str(tmp_path / "text.safetensors"), resolution="128", buckets="none",
            text_dtype="float32", device="cpu", progress=False, log=None)
    got = LatentCache(str(tmp_path / "pre")).batch([0, 1], keys=("context", "context_mask"))
    assert torch.equal(got["context"], torch.stack([sd["a.context"], sd["b.context"]]))
    assert got["context_mask"].tolist() == [sd["a.context_mask"].tolist(), [1.0] * 9]


def _prepare(assets, out, **kw):
    args = {"dcae": assets.target_dir, "resolution": "128", "buckets": "none", "device": "cpu", "progress": False,
            "log": None}
    return prepare(assets.data, str(out), **{**args, **kw})


def test_family_mismatches_are_refused(assets, tmp_path):
    """(c) The family of the text side, of --family and of the base VAE must agree; each error names the file."""
    with pytest.raises(DCGenError, match=r"--family flux: expected FLUX text embeddings, found SANA's in "
                                         r"--text-encoder .*sana-pipeline"):
        _prepare(assets, tmp_path / "c1", text_encoder=assets.sana, family="flux")
    with pytest.raises(DCGenError, match=r"--family sana: expected SANA text embeddings, found FLUX's in "
                                         r"--text-embeddings-from hash:16,8,12"):
        _prepare(assets, tmp_path / "c2", text_embeddings_from="hash:16,8,12", family="sana")
    with pytest.raises(DCGenError, match=r"--base-vae .*flux-vae: expected SANA's VAE \(a DC-AE f32c32\) for a "
                                         r"SANA cache, found an AutoencoderKL"):
        _prepare(assets, tmp_path / "c3", text_encoder=assets.sana, base_vae=assets.flux_vae)
    with pytest.raises(DCGenError, match=r"--base-vae .*dc-ae-f32c32-sana-1.1: expected FLUX's VAE \(an "
                                         r"AutoencoderKL, 16 channels\) for a FLUX cache, found a DC-AE"):
        _prepare(assets, tmp_path / "c4", text_embeddings_from="hash:16,8,12", base_vae=assets.base_dir)
    with pytest.raises(DCGenError, match=r"--base-vae .*f64c128-tiny: expected SANA's DC-AE f32c32 \(32 latent "
                                         r"channels\), found .* with 128"):
        _prepare(assets, tmp_path / "c5", text_embeddings_from="hash:16,0,12", base_vae=assets.target_dir)
    with pytest.raises(DCGenError, match=r"--resolution 96x96: expected multiples of 64 \(the DC-AE's f64 and the "
                                         r"SANA base model tokens of 32 px\)"):
        _prepare(assets, tmp_path / "c6", text_embeddings_from="hash:16,0,12", base_vae=assets.base_dir,
                 resolution="96")
    with pytest.raises(DCGenError, match=r"--text-embeddings-from hash:16,x,12: expected hash:CONTEXT_DIM,POOLED_DIM"):
        _prepare(assets, tmp_path / "c0", text_embeddings_from="hash:16,x,12")
    from safetensors.torch import save_file

    flux_file = str(tmp_path / "flux-text.safetensors")
    save_file({"a.context": torch.zeros(3, 4), "a.pooled": torch.zeros(2)}, flux_file)
    with pytest.raises(DCGenError, match=r"--family sana: expected SANA text embeddings, found FLUX's in .*flux-text"):
        _prepare(assets, tmp_path / "c7", text_embeddings_from=flux_file, family="sana")
    bad_mask = str(tmp_path / "bad-mask.safetensors")
    save_file({f"{n}.context": torch.zeros(3, 4) for n in CAPTIONS} | {"b.context_mask": torch.ones(4)}, bad_mask)
    with pytest.raises(DCGenError, match=r"bad-mask.safetensors: expected 'b.context_mask' of shape \[3\]"):
        _prepare(assets, tmp_path / "c8", text_embeddings_from=bad_mask)
    for cache in ("c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8"):
        assert not (tmp_path / cache / "index.json").exists()


def test_incomplete_sana_folders_are_refused(assets, tmp_path):
    """(c) A SANA folder without tokenizer/ or text_encoder/, or with another text encoder; an undecidable folder
    asks for --family."""
    import shutil

    assert pipeline_family(assets.sana) == "sana"
    folder = tmp_path / "sana"
    shutil.copytree(assets.sana, folder)
    os.remove(folder / "model_index.json")
    assert pipeline_family(str(folder)) == "sana"  # from text_encoder/config.json
    shutil.rmtree(folder / "tokenizer")
    with pytest.raises(DCGenError, match=r"--text-encoder .*sana: expected a SANA pipeline folder with tokenizer/"):
        _prepare(assets, tmp_path / "c1", text_encoder=str(folder))
    shutil.copytree(assets.sana, folder, dirs_exist_ok=True)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(DCGenError, match=r"--text-encoder .*sana: expected a SANA pipeline folder with "
                                         r"text_encoder/ \(Gemma2Model\)"):
        _prepare(assets, tmp_path / "c2", text_encoder=str(folder))
    os.remove(folder / "model_index.json")
    with pytest.raises(DCGenError, match=r"--text-encoder .*sana: expected a FLUX or SANA text encoder .*pass "
                                         r"--family"):
        _prepare(assets, tmp_path / "c3", text_encoder=str(folder))
    shutil.copytree(assets.sana, folder, dirs_exist_ok=True)
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    (folder / "text_encoder" / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    with pytest.raises(DCGenError, match=r"text_encoder: expected SANA's text encoder \(a Gemma-2 model, "
                                         r"config.json model_type 'gemma2'\), found model_type 'gemma'"):
        _prepare(assets, tmp_path / "c4", text_encoder=str(folder))
