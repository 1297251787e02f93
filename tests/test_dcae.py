"""DC-AE: our implementation against diffusers' AutoencoderDC, for every released variant.

Each variant is built TINY (few channels, one layer per stage) but keeps its
stage count (so f is real), block kinds, norms, shortcuts and activations.
Weights are random with perturbed norms/biases, saved three ways (diffusers
folder, bare single file, original mit-han-lab key layout) and loaded through
``load_dcae``; encode and decode must match diffusers within 1e-4 (fp32).
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from dcgen_core.shared.dcae import DCAE, VARIANTS, DCAEConfig, convert_original_to_diffusers, infer_config, load_dcae
from dcgen_core.shared.errors import DCGenError

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderDC  # noqa: E402

TOL = 1e-4
TINY_WIDTHS = {  # per family; attention widths are multiples of the head dim
    "sana": (8, 16, 16, 16, 32, 32),
    "f32": (8, 16, 32, 32, 32, 32),
    "f64": (8, 16, 32, 32, 32, 32, 64),
    "f128": (8, 16, 32, 32, 32, 32, 64, 64),
    "1.5": (8, 16, 32, 32, 64, 64, 64),
}
IMAGE_SIZE = {32: 128, 64: 128, 128: 256}
# Released scaling factors (REFERENCE.md "DC-AE variants").
SCALING = {
    "dc-ae-f32c32-sana-1.0": 0.41407,
    "dc-ae-f32c32-sana-1.1": 0.41407,
    "dc-ae-lite-f32c32": 0.41407,
    "dc-ae-f32c32-in-1.0": 0.3189,
    "dc-ae-f32c32-mix-1.0": 0.4552,
    "dc-ae-f64c128-in-1.0": 0.2889,
    "dc-ae-f64c128-mix-1.0": 0.4538,
    "dc-ae-f128c512-in-1.0": 0.4883,
    "dc-ae-f128c512-mix-1.0": 0.3620,
    "dc-ae-1.5-f64c128": 0.5935,
}


def tiny_config(variant: str) -> DCAEConfig:
    """The variant's flags and block kinds at tiny widths and one layer per (non-empty) stage."""
    full = VARIANTS[variant]
    n = full.num_stages
    if "sana" in variant or "lite" in variant:
        widths, head_dim = TINY_WIDTHS["sana"], 8  # multiscale branches reveal the head dim
    else:
        widths, head_dim = TINY_WIDTHS["1.5" if "1.5" in variant else f"f{full.spatial_compression}"], 32
    one = lambda layers: tuple(min(1, x) for x in layers)  # noqa: E731
    return replace(
        full,
        latent_channels=8 if n == 6 else 16,
        attention_head_dim=head_dim,
        encoder_block_out_channels=widths,
        decoder_block_out_channels=widths,
        encoder_layers_per_block=one(full.encoder_layers_per_block),
        decoder_layers_per_block=one(full.decoder_layers_per_block),
    )


def tiny_diffusers_model(variant: str, seed: int = 0) -> AutoencoderDC:
    torch.manual_seed(seed)
    model = AutoencoderDC(**tiny_config(variant).to_diffusers_dict()).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if "norm" in name and name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn_like(t))
            elif name.endswith("bias") or name.endswith("running_mean"):
                t.copy_(0.1 * torch.randn_like(t))
            elif name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
    return model


# ------------------------------------------------------------ diffusers -> original layout (independent)

def _original_block_key(rest: str, sampler_nested: bool) -> str:
    """Key inside one stage element (``rest`` after ``<stage>.<index>.``), in mit-han-lab naming."""
    rules = [
        (r"^conv1\.(weight|bias)$", r"main.conv1.conv.\1"),
        (r"^conv2\.weight$", "main.conv2.conv.weight"),
        (r"^norm\.(.+)$", r"main.conv2.norm.\1"),
        (r"^attn\.to_qkv_multiscale\.(\d+)\.proj_in\.weight$", r"context_module.main.aggreg.\1.0.weight"),
        (r"^attn\.to_qkv_multiscale\.(\d+)\.proj_out\.weight$", r"context_module.main.aggreg.\1.1.weight"),
        (r"^attn\.norm_out\.(.+)$", r"context_module.main.proj.norm.\1"),
        (r"^conv_out\.conv_inverted\.(.+)$", r"local_module.main.inverted_conv.conv.\1"),
        (r"^conv_out\.conv_depth\.(.+)$", r"local_module.main.depth_conv.conv.\1"),
        (r"^conv_out\.conv_point\.weight$", "local_module.main.point_conv.conv.weight"),
        (r"^conv_out\.norm\.(.+)$", r"local_module.main.point_conv.norm.\1"),
        (r"^conv\.(weight|bias)$", r"main.conv.conv.\1" if sampler_nested else r"main.conv.\1"),
    ]
    for pattern, repl in rules:
        if re.match(pattern, rest):
            return re.sub(pattern, repl, rest)
    raise AssertionError(f"no original name for block key {rest}")


def diffusers_to_original(sd: dict, cfg: DCAEConfig) -> dict:
    out = {}
    # A strided ConvLayer has no inner `.conv`; the pixel-(un)shuffle and interpolate layers wrap one.
    down_nested = cfg.downsample_block_type == "pixel_unshuffle"
    for key, t in sd.items():
        if key.endswith(("attn.to_k.weight", "attn.to_v.weight")):
            continue
        m = re.match(r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(\d+)\.(.+)$", key)
        if m:
            side = "encoder" if m[1].startswith("encoder") else "decoder"
            base = f"{side}.stages.{m[2]}.op_list.{m[3]}."
            rest = m[4]
            if rest == "attn.to_q.weight":
                prefix = key[: -len("to_q.weight")]
                qkv = torch.cat([sd[prefix + "to_q.weight"], sd[prefix + "to_k.weight"], sd[prefix + "to_v.weight"]])
                out[base + "context_module.main.qkv.conv.weight"] = qkv[:, :, None, None].clone()
            elif rest == "attn.to_out.weight":
                out[base + "context_module.main.proj.conv.weight"] = t[:, :, None, None].clone()
            else:
                out[base + _original_block_key(rest, down_nested if side == "encoder" else True)] = t
            continue
        top = {
            "encoder.conv_in.": "encoder.project_in.conv.",
            "encoder.conv_in.conv.": "encoder.project_in.conv.conv.",
            "encoder.conv_out.": ("encoder.project_out.main.op_list.0.conv." if cfg.encoder_out_shortcut
                                  else "encoder.project_out.op_list.0.conv."),
            "decoder.conv_in.": ("decoder.project_in.main.conv." if cfg.decoder_in_shortcut
                                 else "decoder.project_in.conv."),
            "decoder.norm_out.": "decoder.project_out.op_list.0.",
            "decoder.conv_out.": "decoder.project_out.op_list.2.conv.",
            "decoder.conv_out.conv.": "decoder.project_out.op_list.2.conv.conv.",
        }
        prefix, leaf = key.rsplit(".", 1)
        out[top[prefix + "."] + leaf] = t
    return out


# ------------------------------------------------------------ fixtures

@pytest.fixture(scope="module", params=list(VARIANTS))
def variant_files(request, tmp_path_factory):
    variant = request.param
    model = tiny_diffusers_model(variant)
    root = tmp_path_factory.mktemp("dcae")
    folder = root / variant  # folder name carries the variant, as on the hub
    model.save_pretrained(str(folder))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    single = root / f"{variant}.safetensors"
    save_file(sd, str(single))
    original = root / f"{variant}-original.safetensors"
    save_file(diffusers_to_original(sd, tiny_config(variant)), str(original))
    f = tiny_config(variant).spatial_compression
    size = IMAGE_SIZE[f]
    torch.manual_seed(1)
    image = torch.rand(1, 3, size, size) * 2 - 1
    with torch.no_grad():
        latent = model.encode(image).latent
        decoded = model.decode(latent).sample
    return dict(variant=variant, model=model, folder=str(folder), single=str(single), original=str(original),
                image=image, latent=latent, decoded=decoded, sd=sd)


def _assert_matches_diffusers(dcae: DCAE, files: dict):
    with torch.no_grad():
        latent = dcae.encode(files["image"])
        decoded = dcae.decode(files["latent"], tiled=False)
    assert latent.shape == files["latent"].shape
    assert (latent - files["latent"]).abs().max().item() <= TOL
    assert (decoded - files["decoded"]).abs().max().item() <= TOL


# ------------------------------------------------------------ parity per variant and file layout

def test_diffusers_folder_matches(variant_files):
    dcae = load_dcae(variant_files["folder"])
    assert dcae.config.variant == variant_files["variant"]  # the folder name carries it; config.json the flags
    _assert_matches_diffusers(dcae, variant_files)


def test_single_file_without_config_matches(variant_files):
    variant = variant_files["variant"]
    dcae = load_dcae(variant_files["single"])  # architecture from weights, variant from the file name
    assert dcae.config.variant == variant
    assert dcae.config.scaling_factor == SCALING[variant]
    _assert_matches_diffusers(dcae, variant_files)


def test_original_layout_matches(variant_files):
    variant = variant_files["variant"]
    dcae = load_dcae(variant_files["original"])
    assert dcae.config.variant == variant
    _assert_matches_diffusers(dcae, variant_files)


def test_explicit_variant_wins_over_file_name(variant_files, tmp_path):
    variant = variant_files["variant"]
    path = tmp_path / "vae.safetensors"
    save_file(variant_files["sd"], str(path))
    dcae = load_dcae(str(path), variant=variant)
    assert dcae.config.variant == variant
    assert dcae.config.scaling_factor == SCALING[variant]
    _assert_matches_diffusers(dcae, variant_files)


def test_original_converter_agrees_with_diffusers_single_file_converter(variant_files):
    """Our test-side inverse mapping is checked against diffusers' own original->diffusers converter."""
    if variant_files["variant"] == "dc-ae-lite-f32c32":
        pytest.skip("diffusers' converter maps the Lite pixel-shuffle head to decoder.conv_out instead of .conv")
    from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers

    original = diffusers_to_original(variant_files["sd"], tiny_config(variant_files["variant"]))
    theirs = convert_autoencoder_dc_checkpoint_to_diffusers(dict(original))
    ours = convert_original_to_diffusers(original)
    assert set(theirs) == set(variant_files["sd"]) == set(ours)
    for k, v in variant_files["sd"].items():
        assert torch.equal(theirs[k].reshape(v.shape), v)
        assert torch.equal(ours[k], v)


# ------------------------------------------------------------ configs, inference, flags

def test_full_size_variants_match_diffusers_parameter_shapes():
    for name, cfg in VARIANTS.items():
        assert cfg.scaling_factor == SCALING[name]
        with torch.device("meta"):
            ours = DCAE(cfg)
            ref = AutoencoderDC(**cfg.to_diffusers_dict())
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_variant_properties():
    assert VARIANTS["dc-ae-f32c32-sana-1.1"].spatial_compression == 32
    assert VARIANTS["dc-ae-1.5-f64c128"].spatial_compression == 64
    assert VARIANTS["dc-ae-f128c512-mix-1.0"].spatial_compression == 128
    assert VARIANTS["dc-ae-f32c32-sana-1.0"].has_attention
    assert not VARIANTS["dc-ae-lite-f32c32"].has_attention
    assert not VARIANTS["dc-ae-1.5-f64c128"].has_attention
    v15 = VARIANTS["dc-ae-1.5-f64c128"]
    assert (v15.encoder_out_shortcut, v15.decoder_in_shortcut, v15.decoder_conv_act_fn) == (False, False, "silu")
    assert VARIANTS["dc-ae-lite-f32c32"].decoder_conv_act_fn == "silu"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_inference_recovers_tiny_architecture(variant):
    sd = tiny_diffusers_model(variant).state_dict()
    inferred = infer_config(sd, filename=f"{variant}.safetensors")
    assert inferred == tiny_config(variant)


def test_dc_ae_1_5_without_hints_is_detected_from_architecture(tmp_path):
    """DC-AE-1.5 loads strictly with 1.0-style flags too; the weights alone must select 1.5's flags."""
    variant = "dc-ae-1.5-f64c128"
    model = tiny_diffusers_model(variant)
    path = tmp_path / "vae.safetensors"
    save_file(model.state_dict(), str(path))
    dcae = load_dcae(str(path))
    assert dcae.config.variant == variant
    assert not dcae.config.encoder_out_shortcut and not dcae.config.decoder_in_shortcut
    assert dcae.config.decoder_conv_act_fn == "silu"
    z = torch.randn(1, 16, 2, 2)
    with torch.no_grad():
        assert (dcae.decode(z) - model.decode(z).sample).abs().max() <= TOL
        # A wrong flag still loads strictly but decodes something else: the check above is meaningful.
        wrong = DCAE(replace(dcae.config, decoder_in_shortcut=True, decoder_conv_act_fn="relu"))
        wrong.load_state_dict(dcae.state_dict(), strict=True)
        assert (wrong.eval().decode(z) - model.decode(z).sample).abs().max() > 1e-2


def test_architecture_defaults_without_hints(tmp_path):
    expectations = {
        "dc-ae-f32c32-sana-1.0": "dc-ae-f32c32-sana-1.1",  # identical weights' shape and flags
        "dc-ae-lite-f32c32": "dc-ae-lite-f32c32",
        "dc-ae-f32c32-in-1.0": "dc-ae-f32c32-mix-1.0",
        "dc-ae-f64c128-in-1.0": "dc-ae-f64c128-mix-1.0",
        "dc-ae-f128c512-in-1.0": "dc-ae-f128c512-mix-1.0",
    }
    for variant, expected in expectations.items():
        cfg = infer_config(tiny_diffusers_model(variant).state_dict(), filename="vae.safetensors")
        assert cfg.variant == expected


def test_config_json_beats_file_name_and_explicit_variant_beats_config_json():
    variant = "dc-ae-f64c128-in-1.0"
    model = tiny_diffusers_model(variant)
    cfg_json = dict(model.config)
    cfg_json["scaling_factor"] = 0.123
    cfg = infer_config(model.state_dict(), cfg_json, filename="dc-ae-f64c128-mix-1.0")
    assert cfg.scaling_factor == 0.123
    cfg = infer_config(model.state_dict(), cfg_json, filename="x", variant="dc-ae-f64c128-mix-1.0")
    assert cfg.scaling_factor == SCALING["dc-ae-f64c128-mix-1.0"]


def test_old_config_json_without_1_5_flags_takes_them_from_the_detected_variant():
    model = tiny_diffusers_model("dc-ae-1.5-f64c128")
    cfg_json = {k: v for k, v in model.config.items()
                if k not in ("encoder_out_shortcut", "decoder_in_shortcut", "decoder_conv_act_fn")}
    cfg = infer_config(model.state_dict(), cfg_json, filename="vae")
    assert cfg == tiny_config("dc-ae-1.5-f64c128")


def test_filename_hint_cannot_contradict_the_weights():
    # "1.5" in the name of a 6-stage SANA file is not taken as DC-AE-1.5.
    sd = tiny_diffusers_model("dc-ae-f32c32-sana-1.1").state_dict()
    assert infer_config(sd, filename="sana_1.5_vae.safetensors").variant == "dc-ae-f32c32-sana-1.1"


# ------------------------------------------------------------ bad input

def test_kl_vae_is_rejected_with_a_clear_message(tmp_path):
    path = tmp_path / "ae.safetensors"
    save_file({
        "encoder.down.0.block.0.conv1.weight": torch.zeros(4, 3, 3, 3),
        "decoder.up.0.block.0.conv1.weight": torch.zeros(4, 4, 3, 3),
        "encoder.conv_out.weight": torch.zeros(8, 4, 3, 3),
    }, str(path))
    with pytest.raises(DCGenError) as e:
        load_dcae(str(path))
    msg = str(e.value)
    assert str(path) in msg and "is not a DC-AE" in msg and "encoder.down_blocks" in msg and "KL autoencoder" in msg


def test_diffusers_kl_vae_is_rejected(tmp_path):
    from diffusers import AutoencoderKL

    kl = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    path = tmp_path / "kl.safetensors"
    save_file(kl.state_dict(), str(path))
    with pytest.raises(DCGenError, match="KL autoencoder"):
        load_dcae(str(path))


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(tiny_diffusers_model("dc-ae-lite-f32c32").state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DCGenError, match=re.escape(str(path))):
        load_dcae(str(path))


def test_unknown_variant_lists_known_ones(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file(tiny_diffusers_model("dc-ae-lite-f32c32").state_dict(), str(path))
    with pytest.raises(DCGenError) as e:
        load_dcae(str(path), variant="dc-ae-f16c32")
    assert "dc-ae-f16c32" in str(e.value) and "dc-ae-1.5-f64c128" in str(e.value) and str(path) in str(e.value)


def test_variant_of_another_family_is_rejected(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file(tiny_diffusers_model("dc-ae-lite-f32c32").state_dict(), str(path))
    with pytest.raises(DCGenError, match="7 stages"):
        load_dcae(str(path), variant="dc-ae-1.5-f64c128")


def test_missing_tensors_are_listed(tmp_path):
    sd = dict(tiny_diffusers_model("dc-ae-f32c32-sana-1.1").state_dict())
    sd.pop("decoder.up_blocks.5.0.attn.to_q.weight")
    sd["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "dc-ae-f32c32-sana-1.1.safetensors"
    save_file(sd, str(path))
    with pytest.raises(DCGenError) as e:
        load_dcae(str(path))
    msg = str(e.value)
    assert str(path) in msg and "missing" in msg and "unexpected" in msg and "decoder.extra.weight" in msg


def test_bf16_load_and_decode_runs(tmp_path):
    model = tiny_diffusers_model("dc-ae-f32c32-sana-1.1")
    model.save_pretrained(str(tmp_path / "vae"))
    dcae = load_dcae(str(tmp_path / "vae"), dtype=torch.bfloat16)
    z = torch.randn(1, 8, 4, 4)
    with torch.no_grad():
        out, ref = dcae.decode(z), model.decode(z).sample
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.05
