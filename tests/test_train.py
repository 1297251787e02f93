"""`python -m dcgen_core.train` (prepare / align / lora) on tiny models in the real file layouts, CPU.

What is shown: the cache holds what the reference encoders (diffusers AutoencoderKL / AutoencoderDC) give;
alignment recovers a known linear embedder; head and LoRA training over-fit a fixed batch; a resumed run ends
with the same weights as an uninterrupted one; the guidance-distilled loss is the hand computation; the trained
files, loaded by the pack's nodes in ComfyUI, compute what the PEFT model computes.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import tiny
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dcgen_core.shared.errors import DCGenError
from dcgen_core.shared.schedules import official_shift
from dcgen_core.tools.train import TrainConfig, align, train_lora
from dcgen_core.tools.train.__main__ import main as train_main
from dcgen_core.tools.train.cache import LatentCache, write_cache
from dcgen_core.tools.train.model import Denoiser, install_embedding, load_base_transformer, patchify2x2, unpatchify2x2
from dcgen_core.tools.train.objectives import denoising_loss, guidance_distilled_loss, noisy_sample, sample_sigmas

C, HIDDEN = tiny.LATENT_CHANNELS, 32  # TinyDCGen: 2 heads x 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"progress": False, "batch_size": 2, **kw})


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dcgen):
    """The tiny base FLUX (diffusers keys, one safetensors) and a random cache of 4 items (DC-AE 4x4, base 16x16)."""
    root = tmp_path_factory.mktemp("train")
    base = tiny_dcgen.save_base_single_file(str(root / "base.safetensors"))
    g = torch.Generator().manual_seed(0)
    items = [(f"img{i}", f"caption {i}", {
        "base_latents": torch.randn(16, 16, 16, generator=g), "dcae_latents": torch.randn(C, 4, 4, generator=g),
        "context": torch.randn(tiny.TEXT_TOKENS, tiny.TEXT_DIM, generator=g),
        "pooled": torch.randn(tiny.POOLED_DIM, generator=g)}) for i in range(4)]
    null = (torch.randn(tiny.TEXT_TOKENS, tiny.TEXT_DIM, generator=g), torch.randn(tiny.POOLED_DIM, generator=g))
    cache = str(root / "cache")
    write_cache(cache, items, {"resolution": [128, 128]}, null_text=null, shard_size=3, text_dtype=torch.float32)
    emb = str(root / "embedding.safetensors")
    tiny_dcgen.save_embedding(emb)
    return root, base, cache, emb


# --- prepare -------------------------------------------------------------------------------------------------------

def test_prepare_matches_reference_encoders(tmp_path, capsys):
    """An image folder -> shards + index: base latents = diffusers AutoencoderKL mode, (z - shift) * scale; DC-AE
    latents = diffusers AutoencoderDC latents * scaling_factor; text from the deterministic hash encoder."""
    from diffusers import AutoencoderKL
    from PIL import Image

    from dcgen_core.tools.train.encoders import HashTextEncoder
    from dcgen_core.tools.train.data import load_image

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    names = ["a", "b", "sub/c"]
    for i, name in enumerate(names):
        size = (80, 64) if i == 0 else (64, 64)  # one landscape image: resized to cover, centre-cropped
        arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(f"a photo number {i}\n")
    torch.manual_seed(0)
    kl = AutoencoderKL(latent_channels=16, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                       use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                       shift_factor=0.1159).eval()
    kl.save_pretrained(tmp_path / "flux-vae")
    dcae = tiny.tiny_dcae()
    tiny.save_dcae_folder(dcae, str(tmp_path / "dc-ae-f32c32-sana-1.1"))
    out = tmp_path / "cache"
    assert train_main(["prepare", str(data), str(out), "--dcae", str(tmp_path / "dc-ae-f32c32-sana-1.1"),
                       "--base-vae", str(tmp_path / "flux-vae"), "--text-embeddings-from", "hash:32,16,7",
                       "--resolution", "64", "--batch-size", "2", "--shard-size", "2", "--text-dtype", "float32",
                       "--no-progress"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [2, 1]
    assert [it["name"] for it in index["items"]] == names
    assert index["shapes"] == {"base_latents": [16, 8, 8], "dcae_latents": [C, 2, 2], "context": [7, 32],
                               "pooled": [16]}
    assert index["dcae"]["scaling_factor"] == pytest.approx(tiny.SCALING)
    cache = LatentCache(str(out))
    got = cache.batch(range(3))
    images = torch.stack([load_image(str(data / f"{n}.png"), 64, 64) for n in names])
    assert images.shape == (3, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    with torch.no_grad():
        base_ref = (kl.encode(images).latent_dist.mode() - 0.1159) * 0.3611
        dcae_ref = dcae.encode(images).latent * tiny.SCALING
    assert _rel(got["base_latents"], base_ref) <= 1e-5
    assert _rel(got["dcae_latents"], dcae_ref) <= 1e-5
    enc = HashTextEncoder("hash:32,16,7")
    ctx, pooled = enc.encode(names, [f"a photo number {i}" for i in range(3)])
    assert torch.equal(got["context"], ctx) and torch.equal(got["pooled"], pooled)
    null_ctx, null_pooled = cache.null_text()
    assert torch.equal(null_ctx[0], enc.null()[0]) and torch.equal(null_pooled[0], enc.null()[1])

    # precomputed embeddings: a missing entry is named; no base VAE -> a cache for the LoRA stage only
    pre = tmp_path / "text.safetensors"
    sd = {f"{n}.{k}": v for n in names for k, v in (("context", torch.randn(5, 8)), ("pooled", torch.randn(4)))}
    save_file(sd, str(pre))
    assert train_main(["prepare", str(data), str(tmp_path / "c2"), "--dcae", str(tmp_path / "dc-ae-f32c32-sana-1.1"),
                       "--text-embeddings-from", str(pre), "--resolution", "64", "--no-progress"]) == 1
    assert "__null__.context" in capsys.readouterr().err
    save_file({**sd, "__null__.context": torch.zeros(5, 8), "__null__.pooled": torch.zeros(4)}, str(pre))
    assert train_main(["prepare", str(data), str(tmp_path / "c2"), "--dcae", str(tmp_path / "dc-ae-f32c32-sana-1.1"),
                       "--text-embeddings-from", str(pre), "--resolution", "64", "--no-progress"]) == 0
    c2 = LatentCache(str(tmp_path / "c2"))
    assert not c2.has_base_latents and c2.batch([2], keys=("context",))["context"].shape == (1, 5, 8)


# --- alignment -----------------------------------------------------------------------------------------------------

def test_alignment_recovers_a_known_linear_embedder(tmp_path, tiny_dcgen):
    """DC-AE latent = A q on a coarse grid q; the base latent is the 2x2-unpatchified bilinear upsampling of q; the
    base embedder is W* A with bias b*. Then W* (and b*) is the exact embedder (bilinear upsampling commutes with a
    1x1 linear map and keeps constants), and the only one (A has full row rank)."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(C, 64, generator=g) / 8
    w_star, b_star = 0.3 * torch.randn(HIDDEN, C, generator=g), 0.1 * torch.randn(HIDDEN, generator=g)
    sd = {k: v.clone() for k, v in tiny_dcgen.base.state_dict().items()}
    sd["x_embedder.weight"], sd["x_embedder.bias"] = w_star @ a, b_star
    base = str(tmp_path / "base-linear.safetensors")
    save_file(sd, base, metadata={"config": json.dumps(tiny_dcgen.base_config)})
    n, h = 16, 4
    q = torch.randn(n, 64, h, h, generator=g)
    p = F.interpolate(q, scale_factor=2, mode="bilinear", align_corners=False)
    base_latents = unpatchify2x2(p)  # (n, 16, 16, 16)
    assert torch.equal(patchify2x2(base_latents).reshape(n, 2 * h, 2 * h, 64).permute(0, 3, 1, 2), p)
    dcae_latents = torch.einsum("cd,ndhw->nchw", a, q)
    items = [(f"i{i}", "", {"base_latents": base_latents[i], "dcae_latents": dcae_latents[i],
                            "context": torch.zeros(tiny.TEXT_TOKENS, tiny.TEXT_DIM),
                            "pooled": torch.zeros(tiny.POOLED_DIM)}) for i in range(n)]
    cache = str(tmp_path / "cache")
    write_cache(cache, items, {}, shard_size=5)
    target = torch.cat([w_star.flatten(), b_star])

    def error(model):
        return _rel(torch.cat([model.x_embedder.weight.detach().flatten(), model.x_embedder.bias.detach()]), target)

    # the recipe: xavier init, zero bias, MSE on the upsampled student grid, AdamW
    r = align(cache, base, None, channels=C, embed_steps=500, embed_lr=0.03, cfg=_cfg(steps=0, batch_size=4))
    err_adam = error(r.model)
    assert r.losses["embed"][0] > 1e4 * r.losses["embed"][-1]
    assert err_adam <= 1e-4, err_adam
    # the exact least-squares minimiser of the same loss, through the CLI; the written file is the pack's format
    out = tmp_path / "aligned"
    assert train_main(["align", cache, base, str(out), "--channels", str(C), "--embed-solver", "lstsq", "--steps",
                       "0", "--no-progress"]) == 0
    from dcgen_core.shared.embedding import load_aligned_embedding

    emb = load_aligned_embedding(str(out / "dcgen-embedding.safetensors"))
    err_lstsq = _rel(torch.cat([emb.img_in_weight.flatten(), emb.img_in_bias]), target)
    assert err_lstsq <= 1e-5, err_lstsq
    assert emb.latent_channels == C and emb.hidden_size == HIDDEN
    # the other grid matchings run and beat the untrained embedder
    for mode in ("pool", "mean", "sum"):
        r = align(cache, base, None, channels=C, mode=mode, embed_steps=30, embed_lr=0.03,
                  cfg=_cfg(steps=0, batch_size=4))
        assert r.losses["embed"][-1] < 0.5 * r.losses["embed"][0], mode
    print(f"alignment recovery: relative error adam {err_adam:.2e}, lstsq {err_lstsq:.2e}")


def test_head_training_overfits_a_fixed_batch(files):
    """DiT frozen, head trained: on a fixed batch (same noise/timesteps/guidance every step) the loss halves."""
    _, base, cache, _ = files
    r = align(cache, base, None, channels=C, embed_steps=20, embed_lr=0.03,
              cfg=_cfg(steps=60, lr=0.02, overfit=True, seed=3))
    losses = r.losses["head"]
    assert r.objective == "guidance-distilled"  # TinyDCGen's base has a guidance embedding
    first = next(i for i, v in enumerate(losses) if v <= 0.5 * losses[0])
    assert first < 60
    model = r.model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == set()  # nothing left trainable after the run
    print(f"head over-fit: loss {losses[0]:.3f} -> {losses[-1]:.3f}, halved at step {first + 1}")


def test_lora_training_overfits_a_fixed_batch(files):
    _, base, cache, emb = files
    r = train_lora(cache, base, emb, None, rank=4, alpha=8, cfg=_cfg(steps=40, lr=5e-3, overfit=True, seed=1))
    losses = r.losses
    first = next(i for i, v in enumerate(losses) if v <= 0.5 * losses[0])
    assert first < 40
    # LoRA on exactly the recipe's targets (the pack's tiny LoRA uses the same list), not on the new head
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in r.model.named_parameters() if ".lora_A." in n}
    cfg = tiny.FLUX_CONFIG
    assert lora_modules == set(tiny.lora_modules(cfg["num_layers"], cfg["num_single_layers"]))
    print(f"LoRA over-fit: loss {losses[0]:.3f} -> {losses[-1]:.3f}, halved at step {first + 1}")


# --- resume --------------------------------------------------------------------------------------------------------

def test_resume_gives_the_uninterrupted_weights(files, tmp_path):
    _, base, cache, emb = files
    common = ["--rank", "4", "--alpha", "8", "--lr", "3e-3", "--seed", "5", "--batch-size", "3", "--ema-decay",
              "0.9", "--save-dtype", "float32", "--no-progress"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert train_main(["lora", cache, base, emb, str(full), "--steps", "6", *common]) == 0
    # interrupted after 3 steps (a checkpoint at the end of the run), then continued to 6 with --resume
    assert train_main(["lora", cache, base, emb, str(parts), "--steps", "3", "--checkpoint-every", "2", *common]) == 0
    assert sorted(os.listdir(parts / "checkpoints")) == ["step-00000002", "step-00000003"]
    ckpt = json.loads((parts / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert ckpt["step"] == 3 and ckpt["stage"] == "lora" and ckpt["sampler"]["pos"] == 1  # 9 of 4 items: epoch 2
    assert train_main(["lora", cache, base, emb, str(parts), "--steps", "6", "--resume", *common]) == 0
    a, b = load_file(str(full / "dcgen-lora.safetensors")), load_file(str(parts / "dcgen-lora.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)  # it trained
    ea, eb = load_file(str(full / "dcgen-embedding.safetensors")), load_file(str(parts / "dcgen-embedding.safetensors"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)

    # alignment: resumed inside the embedder stage and inside the head stage (from another output folder)
    kw = dict(channels=C, embed_steps=4, embed_lr=0.01)
    ref = align(cache, base, str(tmp_path / "a-full"), cfg=_cfg(steps=4, lr=1e-3, checkpoint_every=3, seed=2,
                                                               keep_checkpoints=0), **kw)
    assert sorted(os.listdir(tmp_path / "a-full" / "checkpoints")) == [
        "step-00000003", "step-00000004", "step-00000006", "step-00000008"]
    expected = load_file(ref.embedding_path)
    for step in ("step-00000003", "step-00000006"):
        out = tmp_path / f"a-{step}"
        r = align(cache, base, str(out), cfg=_cfg(steps=4, lr=1e-3, seed=2, resume=str(
            tmp_path / "a-full" / "checkpoints" / step)), **kw)
        got = load_file(r.embedding_path)
        assert all(torch.equal(got[k], expected[k]) for k in expected), step
    # a checkpoint of another setup is refused
    with pytest.raises(DCGenError, match="rank"):
        train_lora(cache, base, emb, str(parts), rank=8, alpha=8, cfg=_cfg(steps=6, resume="latest"))


# --- the guidance-distilled objective ------------------------------------------------------------------------------

def test_guidance_distilled_loss_is_the_hand_computation():
    g = torch.Generator().manual_seed(11)
    x_t, v_star = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    ctx, pooled = torch.randn(3, 5, 6, generator=g), torch.randn(3, 7, generator=g)
    null_ctx, null_pooled = torch.randn(1, 5, 6, generator=g), torch.randn(1, 7, generator=g)
    sigma, w = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([1.0, 3.5, 14.0])
    theta = torch.tensor(0.7, requires_grad=True)
    calls = []

    def model(x, s, c, p, guidance):
        calls.append((torch.is_grad_enabled(), c.shape, guidance.clone()))
        return (theta * x * (1 + 0.1 * guidance.view(-1, 1, 1, 1)) + c.mean((1, 2)).view(-1, 1, 1, 1)
                + p.mean(1).view(-1, 1, 1, 1) * s.view(-1, 1, 1, 1))

    loss = guidance_distilled_loss(model, x_t, sigma, ctx, pooled, null_ctx, null_pooled, w, v_star)
    assert [c[0] for c in calls] == [True, False]  # v_w with grad, v_u without
    assert torch.equal(calls[1][2], torch.ones(3)) and calls[1][1] == (3, 5, 6)  # null text broadcast, guidance 1
    # by hand, element by element
    with torch.no_grad():
        total = 0.0
        for i in range(3):
            wi = float(w[i])
            v_w = 0.7 * x_t[i] * (1 + 0.1 * wi) + ctx[i].mean() + pooled[i].mean() * sigma[i]
            v_u = 0.7 * x_t[i] * 1.1 + null_ctx[0].mean() + null_pooled[0].mean() * sigma[i]
            v_hat = (v_w - (1 - wi) * v_u) / wi
            total += ((v_hat - v_star[i]) ** 2).sum().item()
        hand = total / v_star.numel()
    assert abs(loss.item() - hand) <= 1e-6 * hand
    # the gradient flows through v_w only: d/dtheta of mean((v_w(theta) - (1 - w) v_u_const) / w - v*)^2
    loss.backward()
    with torch.no_grad():
        wv = w.view(-1, 1, 1, 1)
        v_u = 0.7 * x_t * 1.1 + null_ctx.mean() + null_pooled.mean() * sigma.view(-1, 1, 1, 1)
        v_w = 0.7 * x_t * (1 + 0.1 * wv) + ctx.mean((1, 2)).view(-1, 1, 1, 1) + \
            pooled.mean(1).view(-1, 1, 1, 1) * sigma.view(-1, 1, 1, 1)
        resid = (v_w - (1 - wv) * v_u) / wv - v_star
        grad = (2 * resid * x_t * (1 + 0.1 * wv) / wv).mean()
    assert abs(theta.grad.item() - grad.item()) <= 1e-5 * abs(grad.item())
    # at w = 1 the objective is plain flow matching on the conditional output
    calls.clear()
    one = guidance_distilled_loss(model, x_t, sigma, ctx, pooled, null_ctx, null_pooled, torch.ones(3), v_star)
    plain = F.mse_loss(model(x_t, sigma, ctx, pooled, torch.ones(3)), v_star)
    assert abs(one.item() - plain.item()) <= 1e-6 * plain.item()


def test_training_loss_draws_and_shift(files, tiny_dcgen):
    """The loss of one step on the tiny model equals a hand computation from the same generator: logit-normal t,
    the DC-Gen shift for the latent (r = sqrt(16 tokens * 32 / 4096)), x_t = s eps + (1 - s) x0, w ~ U[1, 14]."""
    _, base, cache_dir, emb = files
    cache = LatentCache(cache_dir)
    model = load_base_transformer(base)
    install_embedding(model, C, {k: v for k, v in load_file(emb).items()})
    denoiser = Denoiser(model)
    cfg = _cfg()
    loss_fn = denoising_loss(denoiser, cache, cfg, "cpu")
    got = loss_fn([2, 0], torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    b = cache.batch([2, 0])
    shift = official_shift(4, 4, C)
    assert shift.value == pytest.approx((16 * 32 / 4096) ** 0.5)
    t = torch.sigmoid(torch.randn(2, generator=g, dtype=torch.float64))
    s = (shift.value * t / (1 + (shift.value - 1) * t)).float()
    assert torch.allclose(sample_sigmas(2, torch.Generator().manual_seed(4), shift), s)
    eps = torch.randn(2, C, 4, 4, generator=g)
    w = 1 + 13 * torch.rand(2, generator=g)
    x0 = b["dcae_latents"]
    x_t = s.view(-1, 1, 1, 1) * eps + (1 - s.view(-1, 1, 1, 1)) * x0
    assert torch.equal(noisy_sample(x0, eps, s)[0], x_t)
    null_ctx, null_pooled = cache.null_text()
    with torch.no_grad():
        v_w = denoiser(x_t, s, b["context"], b["pooled"], w)
        v_u = denoiser(x_t, s, null_ctx.expand(2, -1, -1), null_pooled.expand(2, -1), torch.ones(2))
        wv = w.view(-1, 1, 1, 1)
        hand = (((v_w - (1 - wv) * v_u) / wv - (eps - x0)) ** 2).mean()
    assert abs(got.item() - hand.item()) <= 1e-5 * hand.item()


# --- the trained files in ComfyUI --------------------------------------------------------------------------------

def _comfy_forward(m, x, sigma, cond, pooled, guidance):
    """One diffusion-model call of the patcher ``m`` as samplers make it (patches applied, wrappers and transformer
    options passed); returns the velocity (ComfyUI's flow models return x - sigma * v)."""
    import comfy.model_management as mm

    mm.load_models_gpu([m])
    opts = {**m.model_options.get("transformer_options", {}), "wrappers": m.wrappers}
    with torch.no_grad():
        denoised = m.model.apply_model(x, torch.tensor([sigma]), c_crossattn=cond, y=pooled,
                                       guidance=torch.tensor([guidance]), transformer_options=opts)
    return (x - denoised) / sigma


def test_trained_files_in_comfyui_equal_the_peft_model(comfyui, files, tiny_dcgen):
    root, base, cache, _ = files
    d = comfyui.dirs
    tiny.link_or_copy(base, os.path.join(d["diffusion_models"], "train-base.safetensors"))
    aligned = align(cache, base, str(root / "cui-align"), channels=C, embed_steps=20, embed_lr=0.03,
                    cfg=_cfg(steps=10, lr=1e-2, seed=4), name="train-aligned")
    tiny.link_or_copy(aligned.embedding_path, os.path.join(d["dcgen_embeddings"], "train-aligned-embedding.safetensors"))
    r = train_lora(cache, base, aligned.embedding_path, str(root / "cui-lora"), rank=4, alpha=8, embed_in_lora=True,
                   save_dtype="float32", cfg=_cfg(steps=10, lr=1e-2, seed=4), name="train")
    tiny.link_or_copy(r.lora_path, os.path.join(d["loras"], "train-lora+emb.safetensors"))
    tiny.link_or_copy(r.embedding_path, os.path.join(d["dcgen_embeddings"], "train-embedding.safetensors"))
    # the same LoRA without the embedding
    from dcgen_core.tools.train.finetune import save_trained_lora

    save_trained_lora(os.path.join(d["loras"], "train-lora.safetensors"), r.model, 8.0, torch.float32, False, {})
    assert "transformer.x_embedder.weight" not in load_file(os.path.join(d["loras"], "train-lora.safetensors"))

    nodes = comfyui.runtime.node_classes
    comfy_base = nodes["DCGenModelLoader"]().load("train-base.safetensors", "default")[0]
    embedded = nodes["DCGenApplyAlignedEmbedding"]().apply(comfy_base, "train-aligned-embedding.safetensors")[0]
    with_emb = nodes["DCGenApplyAlignedEmbedding"]().apply(comfy_base, "train-embedding.safetensors")[0]
    lora = nodes["DCGenLoraLoader"]().apply(with_emb, "train-lora.safetensors", 1.0)[0]
    lora_carrying = nodes["DCGenLoraLoader"]().apply(comfy_base, "train-lora+emb.safetensors", 1.0)[0]
    core_lora = nodes["LoraLoaderModelOnly"]().load_lora_model_only(with_emb, "train-lora.safetensors", 1.0)[0]

    g = torch.Generator().manual_seed(21)
    x = torch.randn(1, C, 6, 8, generator=g)
    cond, pooled = tiny.prompt_embeddings(seed=21)
    sigma, guidance = 0.6, 3.5
    with torch.no_grad():
        ref_align = Denoiser(aligned.model)(x, torch.tensor([sigma]), cond, pooled, torch.tensor([guidance]))
        ref_lora = Denoiser(r.model)(x, torch.tensor([sigma]), cond, pooled, torch.tensor([guidance]))
        r.model.disable_adapters()
        without_lora = Denoiser(r.model)(x, torch.tensor([sigma]), cond, pooled, torch.tensor([guidance]))
        r.model.enable_adapters()
    errs = {"embedding (align)": _rel(_comfy_forward(embedded, x, sigma, cond, pooled, guidance), ref_align),
            "embedding + LoRA": _rel(_comfy_forward(lora, x, sigma, cond, pooled, guidance), ref_lora),
            "LoRA carrying the embedding": _rel(_comfy_forward(lora_carrying, x, sigma, cond, pooled, guidance),
                                                ref_lora),
            "core LoraLoaderModelOnly": _rel(_comfy_forward(core_lora, x, sigma, cond, pooled, guidance), ref_lora)}
    print("ComfyUI vs PEFT relative errors:", {k: f"{v:.1e}" for k, v in errs.items()})
    assert all(v <= 1e-4 for v in errs.values()), errs
    assert _rel(without_lora, ref_lora) > 1e-3  # the LoRA matters in this comparison


def test_base_loader_reads_bfl_keys(files, tmp_path, tiny_dcgen):
    """A BFL-keyed base (as flux1-dev.safetensors) loads to the same diffusers weights (fused q/k/v(/mlp) split,
    final adaLN halves swapped back)."""
    from dcgen_core.flux.keys import diffusers_to_bfl

    _, base, _, _ = files
    bfl = {k: v.contiguous() for k, v in diffusers_to_bfl(tiny_dcgen.base.state_dict()).items()}
    path = str(tmp_path / "flux-bfl.safetensors")
    save_file(bfl, path, metadata={"config": json.dumps(tiny_dcgen.base_config)})  # tiny RoPE axes
    a, b = load_base_transformer(base).state_dict(), load_base_transformer(path).state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_gpu_setup_runs_on_cpu(files):
    """The CUDA configuration (frozen weights bf16, trained ones fp32, autocast, gradient checkpointing) runs as a CPU
    dry run; gradient checkpointing alone changes nothing (fp32)."""
    _, base, cache, emb = files
    r = train_lora(cache, base, emb, None, rank=4, alpha=8,
                   cfg=_cfg(steps=2, lr=1e-3, precision="bf16", gradient_checkpointing="on"))
    trained = {n for n, p in r.model.named_parameters() if ".lora_" in n or n.startswith(("x_embedder", "proj_out."))}
    dtypes = {n: p.dtype for n, p in r.model.named_parameters()}
    assert {dtypes[n] for n in trained} == {torch.float32}
    assert {dtypes[n] for n in dtypes if n not in trained} == {torch.bfloat16}
    assert r.model.is_gradient_checkpointing and all(math.isfinite(v) for v in r.losses)
    runs = [train_lora(cache, base, emb, None, rank=4, alpha=8, cfg=_cfg(steps=2, lr=1e-3, gradient_checkpointing=c))
            for c in ("on", "off")]
    a, b = (dict(x.model.named_parameters()) for x in runs)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
