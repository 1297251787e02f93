"""DC-AE-V: the port against the authors' own modules, the chunked runner, weights, and the core video VAE.

Reference: the authors' dc_videogen/dc_ae_v.py (imported by path, tests/authors_dc_gen.py) with their config
strings (chunk 40, feature cache) at tiny widths. Tolerance 1e-5 (float32 on CPU).
"""

import os

import pytest
import torch

import tiny_video
from authors_dc_gen import dc_videogen
from dcgen_core.shared.dcae_v import DCAEV, VARIANTS, DCAEVConfig, decode_video, encode_video, load_dcae_v
from dcgen_core.shared.dcae_v.loader import read_pt_state_dict
from dcgen_core.shared.errors import DCGenError

TOL = 1e-5


@pytest.fixture(scope="module")
def authors():
    return dc_videogen("dc_ae_v")


@pytest.fixture(scope="module")
def pair(authors):
    ref = tiny_video.authors_model(authors)
    mine = DCAEV(DCAEVConfig("tiny", tiny_video.LATENT, tiny_video.WIDTHS, tiny_video.DEPTHS)).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    return ref, mine


@pytest.mark.parametrize("frames", [80, 84, 40, 4], ids=lambda f: f"{f}frames")
def test_encode_decode_match_the_authors(pair, frames):
    """80 frames: two chunks joined by the feature cache; 84: a 4-frame tail chunk (their fallback); 4: only a tail."""
    ref, mine = pair
    x = torch.rand(1, 3, frames, 32, 64, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        ref_z = ref.encode(x)
        z = encode_video(mine, x)
        assert z.shape == ref_z.shape == (1, 32, frames // 4, 1, 2)
        assert (z - ref_z).abs().max().item() <= TOL * max(1.0, ref_z.abs().max().item())
        ref_y = ref.decode(ref_z)
        chunks = []
        y = decode_video(mine, ref_z, progress=lambda done, total: chunks.append((done, total)))
    assert y.shape == ref_y.shape == (1, 3, frames, 32, 64)
    assert (y - ref_y).abs().max().item() <= TOL
    n = -(-frames // 40)
    assert chunks == [(i + 1, n) for i in range(n)]


def test_chunked_equals_one_pass_and_memory_is_per_chunk(pair):
    """Chunk by chunk with the cache = the whole clip in one pass (no cache); the second chunk depends on the first."""
    _, mine = pair
    x = torch.rand(1, 3, 80, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        whole = mine.encoder(x)
        chunked = encode_video(mine, x)
        alone = encode_video(mine, x[:, :, 40:])
    assert (whole - chunked).abs().max().item() <= TOL
    assert (chunked[:, :, 10:] - alone).abs().max().item() > 1e-3  # the cache carried context across the chunks


def test_f64_and_released_variants_have_the_authors_layout(authors):
    """Every released config (c32/c64/c128/c256 f32t4, f64t4c128): same tensor names and shapes as the authors'."""
    names = {"dc-ae-v-f32t4c32": "dc-ae-v-f32t4c32-1.0", "dc-ae-v-f32t4c64": "dc-ae-v-f32t4c64-1.0",
             "dc-ae-v-f32t4c128": "dc-ae-v-f32t4c128-1.0", "dc-ae-v-f32t4c256": "dc-ae-v-f32t4c256-1.0",
             "dc-ae-v-f64t4c128": "dc-ae-v-f64t4c128-1.0"}
    for ours, theirs in names.items():
        fn = authors.dc_ae_v_f64t4_chunk_causal if "f64" in theirs else authors.dc_ae_v_f32t4_chunk_causal
        with torch.device("meta"):
            ref = {k: tuple(v.shape) for k, v in authors.DCAEV(fn(theirs, None)).state_dict().items()}
            mine = {k: tuple(v.shape) for k, v in DCAEV(VARIANTS[ours]).state_dict().items()}
        assert mine == ref, ours
    assert VARIANTS["dc-ae-v-f64t4c128"].spatial_compression == 64
    assert VARIANTS["dc-ae-v-f32t4c32"].scaling_factor == 0.7241


def test_f64_tiny_matches_the_authors(authors):
    widths, depths = (4, 8, 8, 8, 8, 8, 8, 8), (0, 1, 1, 1, 1, 1, 1, 1)
    ref = tiny_video.authors_model(authors, seed=3, name="dc-ae-v-f64t4c128-1.0", widths=widths, depths=depths)
    mine = DCAEV(DCAEVConfig("tiny64", 128, widths, depths)).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(1, 3, 80, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        ref_z, z = ref.encode(x), encode_video(mine, x)
        assert (z - ref_z).abs().max().item() <= TOL * max(1.0, ref_z.abs().max().item())
        assert (decode_video(mine, ref_z) - ref.decode(ref_z)).abs().max().item() <= TOL


def test_spatial_tiles(pair):
    """Tiles as large as the grid change nothing; real tiles run every chunk x tile and blend to the full size."""
    _, mine = pair
    z = torch.randn(1, 32, 20, 3, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = decode_video(mine, z)
        same = decode_video(mine, z, tile=4, overlap=1)
        tiled = decode_video(mine, z, tile=2, overlap=1)
        enc = encode_video(mine, full.clamp(-1, 1), tile=2, overlap=1)
    assert (same - full).abs().max().item() <= TOL
    assert tiled.shape == full.shape and torch.isfinite(tiled).all()
    assert enc.shape == (1, 32, 20, 3, 4) and torch.isfinite(enc).all()


def test_tiles_picked_when_a_chunk_does_not_fit(monkeypatch):
    from dcgen_core.shared.dcae_v import chunked

    cfg = VARIANTS["dc-ae-v-f32t4c32"]
    whole = chunked.estimate_chunk_bytes(cfg, 720, 1280, torch.bfloat16, False)
    monkeypatch.setattr(chunked, "_usable_bytes", lambda device: whole * 2)
    assert chunked.pick_tile(cfg, 720, 1280, torch.bfloat16, "cpu") is None
    monkeypatch.setattr(chunked, "_usable_bytes", lambda device: whole // 8)
    tile = chunked.pick_tile(cfg, 720, 1280, torch.bfloat16, "cpu")
    assert tile is not None and chunked.estimate_chunk_bytes(cfg, tile * 32, tile * 32, torch.bfloat16, False) \
        <= whole // 8


def test_bad_frame_counts_and_shapes(pair):
    _, mine = pair
    with pytest.raises(DCGenError, match="multiple of 4.*found 6.*Use 4 frames"):
        encode_video(mine, torch.zeros(1, 3, 6, 32, 32))
    with pytest.raises(DCGenError, match="multiples of 32, found 48x32"):
        encode_video(mine, torch.zeros(1, 3, 4, 32, 48))
    with pytest.raises(DCGenError, match=r"expected a video latent \(batch, 32"):
        decode_video(mine, torch.zeros(1, 32, 4, 4))


def test_pt_weights_only_and_safetensors_copy(pair, tmp_path):
    """The authors' .pt forms load (weights_only); a pickle with objects is refused naming the file; the convert
    CLI writes a safetensors copy that the loader then prefers."""
    from dcgen_core.tools.convert import main

    ref, _ = pair
    pt = str(tmp_path / "dc-ae-v-tiny.pt")
    tiny_video.save_pt(ref, pt)
    tiny_video.save_pt(ref, str(tmp_path / "plain.pt"), ema=False)
    for path in (pt, str(tmp_path / "plain.pt")):
        model = load_dcae_v(path)
        assert model.config.latent_channels == 32 and model.config.scaling_factor == 0.7241
        for k, v in ref.state_dict().items():
            assert torch.equal(model.state_dict()[k], v.to(torch.bfloat16).float()), k
    evil = str(tmp_path / "evil.pt")
    torch.save({"model_state_dict": {"x": torch.zeros(1)}, "hook": os.system}, evil)
    with pytest.raises(DCGenError, match=r"evil\.pt: expected a torch checkpoint of plain tensors.*weights_only"):
        load_dcae_v(evil)
    assert main([pt]) == 0
    assert os.path.isfile(str(tmp_path / "dc-ae-v-tiny.safetensors"))
    assert main([pt]) == 2  # exists, no --overwrite
    os.remove(pt)  # the loader is given the .pt name but reads the copy beside it
    torch.save({"not": "weights"}, pt)
    model = load_dcae_v(pt)
    assert torch.equal(model.state_dict()["encoder.project_out.conv.weight"],
                       ref.state_dict()["encoder.project_out.conv.weight"].to(torch.bfloat16).float())
    with pytest.raises(DCGenError, match="expected a state dict of tensors"):
        read_pt_state_dict(pt)
