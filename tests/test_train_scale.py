"""Post-training at scale (issue 22): outputs never replace inputs, the README's names are the workflow's, and the
randomized SVD of extraction (achieved error, lower bound on the exact one)."""

from __future__ import annotations

import json
import math
import os
import re
import shlex

import pytest
import torch

from dcgen_core.shared.errors import DCGenError
from dcgen_core.tools.lowrank import low_rank

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOW = os.path.join(PACK_DIR, "workflows", "dcgen-flux-1k-from-base-lora.json")


DOCS = [os.path.join(PACK_DIR, "README.md"), os.path.join(PACK_DIR, "docs", "training.md")]


def _docs_text() -> str:
    """The README and the training guide it links (docs/training.md), where the commands are."""
    out = []
    for path in DOCS:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                out.append(f.read())
    return "\n".join(out)


def _readme_commands(prefix: str) -> list[list[str]]:
    """Each documented command line starting with ``python -m <prefix>`` (continuations joined), as argv."""
    text = _docs_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(f"python -m {prefix} "):
            out.append(shlex.split(line)[3:])
    return out


def _workflow_files(path: str = WORKFLOW) -> dict:
    with open(path, encoding="utf-8") as f:
        nodes = {n["type"]: n for n in json.load(f)["nodes"]}
    return {"lora": nodes["DCGenLoraLoader"]["widgets_values"][0],
            "embedding": nodes["DCGenApplyAlignedEmbedding"]["widgets_values"][0]}


def test_readme_extract_writes_the_workflow_names():
    from dcgen_core.tools.extract import build_parser, default_embedding_path

    wf = _workflow_files()
    (argv,) = _readme_commands("dcgen_core.extract")
    args = build_parser().parse_args(argv)
    assert args.embedding_out is None and not args.embed_in_lora
    assert os.path.normpath(args.out) == os.path.join("models", "loras", wf["lora"])
    assert os.path.normpath(default_embedding_path(args.out)) == os.path.join("models", "dcgen_embeddings",
                                                                                wf["embedding"])
    # outside a ComfyUI loras folder: beside OUT; a name without -lora gets a suffix
    assert default_embedding_path(os.path.join("out", "x-lora.safetensors")) == os.path.join(
        "out", "x-embedding.safetensors")
    assert default_embedding_path("lora.safetensors") == "lora-embedding.safetensors"


def test_readme_train_writes_the_workflow_names():
    """Each align -> lora as the README writes them (FLUX, then DC-Gen-SANA): lora's input embedding is not one of
    its outputs, and the files it writes carry the names the workflow loads (FLUX 1K from base, DC-Gen-SANA 4K),
    copied into the folders the workflow's loaders list."""
    from dcgen_core.tools.train.__main__ import build_parser
    from dcgen_core.tools.train.finetune import OUTPUT_SUFFIXES

    commands = [build_parser().parse_args(argv) for argv in _readme_commands("dcgen_core.train")]
    aligns = [c for c in commands if c.command == "align"]
    loras = [c for c in commands if c.command == "lora"]
    workflows = [WORKFLOW, os.path.join(PACK_DIR, "workflows", "dcgen-sana-4k-t2i.json")]
    assert len(aligns) == len(loras) == len(workflows)
    readme = _docs_text()
    for align, lora, workflow in zip(aligns, loras, workflows):
        wf = _workflow_files(workflow)
        assert os.path.normpath(lora.embedding) == os.path.normpath(
            os.path.join(align.out, f"{align.name}-embedding.safetensors"))
        outputs = {os.path.normpath(os.path.join(lora.out, f"{lora.name}-{s}")) for s in OUTPUT_SUFFIXES}
        assert os.path.normpath(lora.embedding) not in outputs
        assert f"{lora.name}-lora.safetensors" == wf["lora"]
        assert f"{lora.name}-embedding.safetensors" == wf["embedding"]
        assert f"cp {os.path.join(lora.out, wf['lora'])} models/loras/" in readme
        assert f"cp {os.path.join(lora.out, wf['embedding'])} models/dcgen_embeddings/" in readme


def test_lora_refuses_to_overwrite_its_input(tmp_path):
    """The README's old commands: lora reading out/dcgen-embedding.safetensors and writing into out/: refused
    before anything loads, the input untouched (the CLI prints the error, exit 1)."""
    from dcgen_core.tools.train import train_lora
    from dcgen_core.tools.train.__main__ import main

    out = tmp_path / "out"
    out.mkdir()
    emb = out / "dcgen-embedding.safetensors"
    emb.write_bytes(b"not read")
    with pytest.raises(DCGenError) as err:
        train_lora(str(tmp_path / "no-cache"), str(tmp_path / "no-base"), str(emb), str(out))
    assert str(emb) in str(err.value) and "aligned embedding" in str(err.value)
    # through a symlinked folder as well
    (tmp_path / "link").symlink_to(out, target_is_directory=True)
    with pytest.raises(DCGenError):
        train_lora(str(tmp_path / "no-cache"), str(tmp_path / "no-base"), str(tmp_path / "link" / emb.name),
                   str(out), name="dcgen")
    assert main(["lora", str(tmp_path / "no-cache"), str(tmp_path / "no-base"), str(emb), str(out),
                 "--no-progress"]) == 1
    assert emb.read_bytes() == b"not read"


def _spectrum_matrix(out: int, inp: int, spectrum: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, len(spectrum), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, len(spectrum), generator=g, dtype=torch.float64))
    return (u * spectrum) @ v.T


@pytest.mark.parametrize("kind", ["hard", "low-rank"])
def test_randomized_svd_error_and_bound(kind):
    """Randomized factors: achieved error >= the exact SVD's (Eckart-Young) >= the printed bound, and within 2% of
    the exact error on a slowly decaying spectrum (j^-0.5, the hard case), exact on a matrix of rank <= the rank."""
    rank = 16
    n = torch.arange(1, 97, dtype=torch.float64)
    spectrum = n ** -0.5 if kind == "hard" else torch.where(n <= 12, 1.0 / n, torch.zeros_like(n))
    delta = _spectrum_matrix(160, 128, spectrum, seed=3).float()
    exact = low_rank(delta, rank, method="exact")
    fast = low_rank(delta, rank, method="randomized", oversample=10, niter=4)
    optimum = spectrum[rank:].square().sum().item()
    assert fast.method == "randomized" and exact.method == "exact" and fast.rank == exact.rank == rank
    assert abs(exact.error - optimum) <= 1e-5 * spectrum.square().sum().item()
    assert fast.bound <= optimum * (1 + 1e-5) + 1e-9 and fast.error >= optimum * (1 - 1e-5) - 1e-9
    if kind == "hard":
        assert fast.error <= 1.02 * optimum and fast.bound > 0.05 * optimum
    else:
        assert fast.error <= 1e-9 and exact.error <= 1e-9
    again = low_rank(delta, rank, method="randomized")  # seeded: the same factors every run
    assert torch.equal(again.up, fast.up) and torch.equal(again.down, fast.down)
    # a sketch as wide as the matrix is no cheaper: the exact SVD runs
    assert low_rank(delta[:, :20], rank, method="randomized").method == "exact"
    with pytest.raises(DCGenError, match="--svd"):
        low_rank(delta, rank, method="fast")


def test_extract_prints_error_and_bound(tiny_dcgen, tmp_path):
    from dcgen_core.tools.extract import extract

    full = tiny_dcgen.save_dcgen_diffusers_folder(str(tmp_path / "full"))
    base = tiny_dcgen.save_base_single_file(str(tmp_path / "base.safetensors"))
    reports, lines = {}, {}
    for svd in ("randomized", "exact"):
        lines[svd] = []
        reports[svd] = extract(full, base, str(tmp_path / f"{svd}-lora.safetensors"), 2, svd=svd,
                               log=lines[svd].append)
    summary = next(x for x in lines["randomized"] if "total relative error" in x)
    got = [float(v) for v in re.findall(r"([0-9.]+e[+-]\d+)", summary)[:2]]
    assert got[0] >= got[1] > 0 and "randomized SVD" in summary
    r, e = reports["randomized"], reports["exact"]
    # the exact SVD's total error is between the randomized run's bound and its achieved error
    assert r["total_relative_error_bound"] <= e["total_relative_error"] * (1 + 1e-4)
    assert e["total_relative_error"] <= r["total_relative_error"] * (1 + 1e-4)
    assert any("exact SVD's >=" in x for x in lines["randomized"] if x.startswith("  "))


# --- prepare at scale: validation, buckets, shards written as they fill, resume -------------------------------------

def _bomb_png(path):
    """A valid PNG whose header claims 60000x60000 (PIL's DecompressionBombError case): 1 byte of pixel data."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) +
                     chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def image_set(tmp_path_factory):
    """Portrait, landscape and square images with captions, plus the bad ones: a bomb header, a truncated PNG, a
    text file named .jpg, an image without caption and one with an empty caption."""
    import tiny
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    data = root / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(7)
    sizes = {"p1": (60, 100), "p2": (70, 110), "l1": (100, 60), "s1": (64, 64), "s2": (80, 76)}
    for name, (w, h) in sizes.items():
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(f"a photo of {name}")
    _bomb_png(data / "bomb.png")
    (data / "bomb.txt").write_text("a bomb")
    good = (data / "s1.png").read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "truncated.txt").write_text("cut")
    (data / "text.jpg").write_text("not an image")
    (data / "text.txt").write_text("text")
    Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(data / "nocap.png")
    Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(data / "empty.png")
    (data / "empty.txt").write_text("  \n")
    dcae = tiny.save_dcae_folder(tiny.tiny_dcae(), str(root / "dc-ae-f32c32"))
    return root, data, dcae


BAD = {"bomb": "60000x60000", "truncated": "not a readable image", "text": "not a readable image",
       "nocap": "no caption file", "empty": "empty caption"}


def _prepare(data, out, dcae, *extra):
    from dcgen_core.tools.train.__main__ import main

    return main(["prepare", str(data), str(out), "--dcae", str(dcae), "--text-embeddings-from", "hash:8,4,3",
                 "--resolution", "128", "--batch-size", "2", "--shard-size", "2", "--text-dtype", "float32",
                 "--no-progress", *map(str, extra)])


def test_prepare_strict_refuses_before_loading_models(image_set, tmp_path, capsys):
    _, data, _ = image_set
    # the DC-AE path does not exist: the images are refused first, so no model was loaded
    assert _prepare(data, tmp_path / "c", tmp_path / "no-such-dcae", "--strict") == 1
    err = capsys.readouterr().err
    assert "--strict" in err and "found 5 bad" in err
    for name, reason in BAD.items():
        assert any(name in line and reason in line for line in err.splitlines()), (name, err)
    assert "Traceback" not in err and not (tmp_path / "c" / "index.json").exists()


def test_prepare_skips_bad_images_and_buckets_the_rest(image_set, tmp_path, capsys):
    """Bad images listed and skipped (recorded in the index); each good one in the bucket of the nearest aspect
    ratio on the DC-AE's 32 px grid (area <= 128x128): portrait 96x160, landscape 160x96, square 128x128; its DC-AE
    latent is the reference AutoencoderDC's on the image resized to cover that bucket."""
    from diffusers import AutoencoderDC

    from dcgen_core.tools.train.cache import LatentCache
    from dcgen_core.tools.train.data import load_image

    _, data, dcae = image_set
    out = tmp_path / "cache"
    assert _prepare(data, out, dcae) == 0
    text = capsys.readouterr().out
    assert "skipping 5 bad image(s)" in text and all(name in text for name in BAD)
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and index["count"] == 5
    assert {os.path.basename(s["path"]).split(".")[0] for s in index["skipped"]} == set(BAD)
    buckets = {it["name"]: it["bucket"] for it in index["items"]}
    assert buckets == {"p1": "96x160", "p2": "96x160", "l1": "160x96", "s1": "128x128", "s2": "128x128"}
    assert index["bucket_shapes"]["96x160"]["dcae_latents"] == [32, 5, 3]
    assert all(len({index["items"][i]["bucket"] for i in range(len(index["items"]))
                    if index["items"][i]["shard"] == s}) == 1 for s in range(len(index["shards"])))
    cache = LatentCache(str(out))
    groups = cache.groups()
    assert sorted(sorted(index["items"][i]["name"] for i in g) for g in groups) == [["l1"], ["p1", "p2"],
                                                                                  ["s1", "s2"]]
    ref = AutoencoderDC.from_pretrained(dcae).eval()
    i = next(i for i, it in enumerate(index["items"]) if it["name"] == "p2")
    with torch.no_grad():
        expected = ref.encode(load_image(str(data / "p2.png"), 96, 160)[None]).latent * ref.config.scaling_factor
    got = cache.batch([i], keys=("dcae_latents",))["dcae_latents"]
    assert got.shape == (1, 32, 5, 3) and ((got - expected).norm() / expected.norm()).item() <= 1e-5


def test_prepare_resumes_where_it_stopped(image_set, tmp_path, monkeypatch, capsys):
    """Stopped after its first shard (the 4th image fails to load): the index lists what is cached, training
    refuses the unfinished cache, the same command continues and ends with the cache of an uninterrupted run."""
    from dcgen_core.tools.train import data as data_mod
    from dcgen_core.tools.train.cache import LatentCache

    _, data, dcae = image_set
    full, part = tmp_path / "full", tmp_path / "part"
    assert _prepare(data, full, dcae) == 0
    real, calls = data_mod.load_image, []

    def flaky(path, w, h):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(path, w, h)

    monkeypatch.setattr(data_mod, "load_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        _prepare(data, part, dcae)
    monkeypatch.setattr(data_mod, "load_image", real)
    index = json.loads((part / "index.json").read_text())
    assert not index["complete"] and index["count"] == 2
    del index["family"]  # as written before caches recorded their family (FLUX): still resumed
    (part / "index.json").write_text(json.dumps(index))
    with pytest.raises(DCGenError, match="resumes"):
        LatentCache(str(part))
    capsys.readouterr()
    assert _prepare(data, part, dcae) == 0
    assert "2 items cached, 3 to go" in capsys.readouterr().out
    a, b = LatentCache(str(full)), LatentCache(str(part))
    names_a = {it["name"]: i for i, it in enumerate(a.index["items"])}
    names_b = {it["name"]: i for i, it in enumerate(b.index["items"])}
    assert set(names_a) == set(names_b) and b.index["complete"]
    for name in names_a:
        keys = ("dcae_latents", "context", "pooled")
        x, y = a.batch([names_a[name]], keys=keys), b.batch([names_b[name]], keys=keys)
        assert all(torch.equal(x[k], y[k]) for k in ("dcae_latents", "context", "pooled")), name
    # other settings in the same folder: refused, nothing mixed
    assert _prepare(data, part, dcae, "--buckets", "none") == 1
    assert "other settings" in capsys.readouterr().err


def test_batches_stay_within_a_bucket_and_training_runs(image_set, tmp_path, tiny_dcgen):
    """The sampler draws every batch from one bucket (probability by size); a LoRA run on the bucketed cache trains
    (the tiny FLUX reads any grid)."""
    from dcgen_core.tools.train import TrainConfig, train_lora
    from dcgen_core.tools.train.cache import LatentCache
    from dcgen_core.tools.train.common import BatchSampler

    _, data, dcae = image_set
    out = tmp_path / "cache"
    assert _prepare(data, out, dcae, "--text-embeddings-from", "hash:32,16,7") == 0
    cache = LatentCache(str(out))
    bucket_of = {i: it["bucket"] for i, it in enumerate(cache.index["items"])}
    sampler = BatchSampler(cache.groups(), 2, seed=0)
    seen = set()
    for _ in range(30):
        batch, _ = sampler.next()
        assert len({bucket_of[i] for i in batch}) == 1
        seen.add(bucket_of[batch[0]])
    assert seen == {"96x160", "160x96", "128x128"}
    base = tiny_dcgen.save_base_single_file(str(tmp_path / "base.safetensors"))
    emb = str(tmp_path / "emb.safetensors")
    tiny_dcgen.save_embedding(emb)
    r = train_lora(str(out), base, emb, None, rank=2, alpha=2, cfg=TrainConfig(steps=3, batch_size=2, lr=1e-3,
                                                                                objective="flow", progress=False))
    assert len(r.losses) == 3 and all(math.isfinite(v) for v in r.losses)


def test_sizing_formulas_count_the_trained_parameters(tiny_dcgen, tmp_path):
    """scripts/train_gpu_sizing.py --estimate: its LoRA + embedder/head count equals PEFT's on the tiny FLUX, and
    its base count is FLUX.1's ~11.9 B block parameters at full width."""
    import importlib.util

    from dcgen_core.tools.train.finetune import add_lora
    from dcgen_core.tools.train.model import install_embedding, load_base_transformer

    spec = importlib.util.spec_from_file_location("sizing", os.path.join(PACK_DIR, "scripts", "train_gpu_sizing.py"))
    sizing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sizing)
    cfg = tiny_dcgen.config
    h = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    counts = sizing.flux_counts(128, 32, 4, 7, double=cfg["num_layers"], single=cfg["num_single_layers"], h=h,
                                m=4 * h, context=cfg["joint_attention_dim"])
    model = load_base_transformer(tiny_dcgen.save_base_single_file(str(tmp_path / "base.safetensors")))
    install_embedding(model, 32)
    add_lora(model, 4, 4.0, 0)
    peft = sum(p.numel() for n, p in model.named_parameters()
               if ".lora_" in n or n.startswith(("x_embedder.", "proj_out.")))
    assert counts["L"] == peft
    full = sizing.flux_counts(1024, 32, 256, 512)
    assert 11.7e9 <= full["P"] <= 12.0e9 and full["img"] == 1024 and full["n"] == 1536


def test_align_runs_on_a_bucketed_cache(tmp_path, tiny_dcgen):
    """Two buckets (128x128 and 64x128): the least-squares pass, the embedder and the head stages draw every batch
    within one bucket (a batch across buckets could not be stacked)."""
    import tiny

    from dcgen_core.tools.train import TrainConfig, align
    from dcgen_core.tools.train.cache import CacheWriter

    g = torch.Generator().manual_seed(4)
    writer = CacheWriter(str(tmp_path / "cache"), {}, shard_size=2, text_dtype=torch.float32)
    for i in range(5):
        w, h = (128, 128) if i % 2 else (64, 128)
        writer.add(f"img{i}", f"c{i}", {"base_latents": torch.randn(16, h // 8, w // 8, generator=g),
                                        "dcae_latents": torch.randn(32, h // 32, w // 32, generator=g),
                                        "context": torch.randn(tiny.TEXT_TOKENS, tiny.TEXT_DIM, generator=g),
                                        "pooled": torch.randn(tiny.POOLED_DIM, generator=g)}, bucket=(w, h))
    writer.close((torch.randn(tiny.TEXT_TOKENS, tiny.TEXT_DIM, generator=g), torch.randn(tiny.POOLED_DIM, generator=g)))
    base = tiny_dcgen.save_base_single_file(str(tmp_path / "base.safetensors"))
    for solver in ("lstsq", "adam"):
        r = align(str(tmp_path / "cache"), base, None, channels=32, solver=solver, embed_steps=3, embed_lr=1e-2,
                  cfg=TrainConfig(steps=3, batch_size=3, lr=1e-3, progress=False))
        losses = [v for stage in r.losses.values() for v in stage]
        assert losses and all(math.isfinite(v) for v in losses), solver


def test_readme_sizing_table_is_the_scripts_output():
    """README's training table (rows: stage, GPUs, sharding, memory, step, images/s) is what
    `scripts/train_gpu_sizing.py --estimate --gpus 1 8` prints, rounded as shown."""
    import re
    import subprocess
    import sys

    out = subprocess.run([sys.executable, os.path.join(PACK_DIR, "scripts", "train_gpu_sizing.py"), "--estimate",
                          "--gpus", "1", "8"], capture_output=True, text=True, check=True).stdout
    printed = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 7 and parts[0] in ("head", "head+embed", "lora"):
            printed[(parts[0], int(parts[2]), parts[1])] = tuple(float(v) for v in parts[3:6])
    readme = open(os.path.join(PACK_DIR, "README.md"), encoding="utf-8").read()
    rows = re.findall(r"^\| (head|head\+embed|lora) \| (\d+) \| (none|fsdp) \| ([\d.]+) GiB \| ([\d.]+) s \| "
                      r"([\d.]+) \|$", readme, re.M)
    assert len(rows) >= 4
    for stage, gpus, sharding, mem, step, ips in rows:
        want = printed[(stage, int(gpus), sharding)]
        for shown, value in zip((mem, step, ips), want):
            digits = len(shown.split(".")[1]) if "." in shown else 0
            assert abs(float(shown) - value) <= 0.5 * 10 ** -digits + 1e-9 or \
                float(shown) == float(f"{value:.2g}"), (stage, gpus, sharding, shown, value)
