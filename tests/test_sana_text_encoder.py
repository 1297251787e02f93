"""SANA's Gemma-2 text encoder as a core ComfyUI CLIP, against diffusers' SanaPipeline.encode_prompt.

A tiny random HF Gemma-2 (2 layers, width 64, the real block structure) and a tiny SentencePiece model trained
here with Gemma's settings (pad 0, eos 1, bos 2, unk 3, byte fallback, no dummy prefix) stand in for
Gemma-2-2B. They are saved in ComfyUI's text-encoder layout (``model.*`` keys plus ``spiece_model``) and in
diffusers' layout (``text_encoder/`` + ``tokenizer/tokenizer.model``); the oracle is diffusers' own
``SanaPipeline.encode_prompt`` with an HF GemmaTokenizer built from the same SentencePiece model.
"""

from __future__ import annotations

import io
import os

import pytest
import torch

from dcgen_core.shared.errors import DCGenError
from dcgen_core.sana import text_encoder as te

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

TINY = {  # a tiny Gemma-2: real structure, few layers, small width
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
}
PROMPT = "A Photo of an astronaut riding a horse on the moon, 4K, detailed "
SHORT_INSTRUCTION = ["Describe the image:", "User Prompt: "]
TOL = 1e-4


def _train_spm() -> bytes:
    corpus = te.COMPLEX_HUMAN_INSTRUCTION + [
        "a cat sleeping on a warm sunny windowsill", "a photo of an astronaut riding a horse on the moon",
        "4k, detailed, red car, city street at dusk", "describe the image", "user prompt: a dog"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=400, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", byte_fallback=True, split_digits=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", user_defined_symbols=["\n"],
        allow_whitespace_only_pieces=True, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    return buf.getvalue()


def _hf_tokenizer(proto: bytes):
    """transformers' GemmaTokenizer from the SentencePiece model (what from_pretrained does, without protobuf)."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import generate_merges

    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = GemmaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True, add_eos_token=False)
    tok.add_tokens([AddedToken("\n", normalized=False, special=False)])
    return tok


def _hf_gemma2(vocab: int, softcap=None, seed=0, qk_gain=1.0):
    from transformers import Gemma2Config, Gemma2Model

    cfg = Gemma2Config(vocab_size=vocab, attn_logit_softcapping=softcap, final_logit_softcapping=None,
                       sliding_window=4096, max_position_embeddings=4096, pad_token_id=0, bos_token_id=2,
                       eos_token_id=1, hidden_activation="gelu_pytorch_tanh", **TINY)
    cfg._attn_implementation = "eager"
    model = Gemma2Model(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.3 if "norm" in name else 0.1
            if qk_gain != 1.0 and ("q_proj" in name or "k_proj" in name):
                std *= qk_gain
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _save_comfy_layout(model, proto: bytes, path: str):
    from safetensors.torch import save_file

    sd = {"model." + k: v.contiguous() for k, v in model.state_dict().items()}
    sd["spiece_model"] = torch.frombuffer(bytearray(proto), dtype=torch.uint8)
    save_file(sd, path)


class Assets:
    def __init__(self, root):
        self.proto = _train_spm()
        self.vocab = spm.SentencePieceProcessor(model_proto=self.proto).get_piece_size()
        self.tokenizer = _hf_tokenizer(self.proto)
        self.model = _hf_gemma2(self.vocab)
        self.comfy_file = os.path.join(root, "gemma2-tiny-comfy.safetensors")
        _save_comfy_layout(self.model, self.proto, self.comfy_file)
        # diffusers pipeline layout: text_encoder/ (Gemma2Model keys, no "model.") and tokenizer/tokenizer.model
        self.diffusers_dir = os.path.join(root, "sana-tiny", "text_encoder")
        self.model.save_pretrained(self.diffusers_dir)
        os.makedirs(os.path.join(root, "sana-tiny", "tokenizer"))
        with open(os.path.join(root, "sana-tiny", "tokenizer", "tokenizer.model"), "wb") as f:
            f.write(self.proto)
        self.root = root

    def pipeline(self, model=None):
        from diffusers import SanaPipeline

        return SanaPipeline(tokenizer=self.tokenizer, text_encoder=model or self.model, vae=None, transformer=None,
                            scheduler=None)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return Assets(str(tmp_path_factory.mktemp("sana-te")))


@pytest.fixture(scope="module")
def clip(comfyui, assets):
    return te.load_sana_text_encoder(assets.comfy_file, config={**TINY, "attn_logit_softcapping": None})


def _oracle(pipe, prompt, instruction, negative=""):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, do_classifier_free_guidance=True, negative_prompt=negative,
                                  device=torch.device("cpu"), complex_human_instruction=instruction)


def _encode(clip, text, **options):
    import nodes

    if options:
        clip = clip.clone()
        for k, v in options.items():
            clip.set_tokenizer_option(k, v)
    (cond,) = nodes.CLIPTextEncode().encode(clip, text)
    assert len(cond) == 1
    return cond[0][0], cond[0][1]


def _assert_same(cond, extra, ref_embeds, ref_mask):
    assert cond.shape == ref_embeds.shape, (cond.shape, ref_embeds.shape)
    mask = extra["attention_mask"]
    assert mask.shape == ref_mask.shape
    assert torch.equal(mask.cpu().long(), ref_mask.cpu().long())
    err = (cond.float().cpu() - ref_embeds.float()).abs().max().item()
    assert err < TOL, err
    return err


# --------------------------------------------------------------------------------------------- without ComfyUI

def test_default_instruction_is_diffusers_default():
    import inspect

    from diffusers import SanaPipeline

    default = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    assert te.COMPLEX_HUMAN_INSTRUCTION == list(default)
    assert te.SANA_TEXT_WIDTH == 2304


def test_token_ids_match_hf_tokenizer(assets):
    """Our ids/mask (SentencePiece, diffusers' rules) equal what _get_gemma_prompt_embeds feeds the model."""
    sp = spm.SentencePieceProcessor(model_proto=assets.proto)

    def encode(s):
        return sp.encode(s, add_bos=True, add_eos=False)

    tok = assets.tokenizer
    tok.padding_side = "right"
    long_prompt = " ".join(["a red car in the city street at dusk"] * 60)
    for instruction in (te.COMPLEX_HUMAN_INSTRUCTION, SHORT_INSTRUCTION, None):
        for prompt in (PROMPT, "", long_prompt, "Two  spaces\nand a newline"):
            chi = "\n".join(instruction) if instruction else None
            ids, mask = te.sana_token_ids(encode, prompt, chi)
            text = (chi or "") + prompt.lower().strip()
            max_length = (len(tok.encode(chi)) + 298) if chi else 300
            ref = tok([text], padding="max_length", max_length=max_length, truncation=True,
                      add_special_tokens=True, return_tensors="pt")
            assert ids == ref.input_ids[0].tolist()
            assert mask == ref.attention_mask[0].tolist()


# ------------------------------------------------------------------------------------------------ with ComfyUI

def test_matches_diffusers_default_instruction(clip, assets):
    pipe = assets.pipeline()
    embeds, mask, neg, neg_mask = _oracle(pipe, PROMPT, te.COMPLEX_HUMAN_INSTRUCTION)
    assert embeds.shape[1] == 300
    cond, extra = _encode(clip, PROMPT)
    _assert_same(cond, extra, embeds, mask)
    # the default negative "" is encoded without the instruction, to 300 tokens, as diffusers does
    cond_n, extra_n = _encode(clip, "")
    _assert_same(cond_n, extra_n, neg, neg_mask)


def test_matches_diffusers_short_instruction_truncation_and_negative(clip, assets):
    pipe = assets.pipeline()
    long_prompt = " ".join(["a red car in the city street at dusk"] * 60)  # > 300 tokens: truncated
    for prompt in (PROMPT, long_prompt):
        embeds, mask, neg, neg_mask = _oracle(pipe, prompt, SHORT_INSTRUCTION, negative="Blurry, low quality")
        cond, extra = _encode(clip, prompt, sana_instruction=SHORT_INSTRUCTION)
        _assert_same(cond, extra, embeds, mask)
        cond_n, extra_n = _encode(clip, "Blurry, low quality", sana_negative=True)
        _assert_same(cond_n, extra_n, neg, neg_mask)
    assert int(mask.sum()) == 300  # the truncated prompt fills every kept position


def test_selection_is_token0_plus_last_299(comfyui, clip, assets):
    """The full _get_gemma_prompt_embeds output (before selection) equals ComfyUI's unselected encoding."""
    pipe = assets.pipeline()
    with torch.no_grad():
        full, _ = pipe._get_gemma_prompt_embeds(PROMPT, torch.device("cpu"), torch.float32,
                                                        complex_human_instruction=te.COMPLEX_HUMAN_INSTRUCTION)
    tokens = clip.tokenize(PROMPT)
    n = len(tokens[te.TOKEN_KEY][0])
    assert n == full.shape[1] > 300
    cond, _ = _encode(clip, PROMPT)
    idx = te.select_index(n)
    assert idx[:2] == [0, n - 299] and idx[-1] == n - 1 and len(idx) == 300
    assert (cond[0] - full[0, idx]).abs().max().item() < TOL


def test_diffusers_folder_layout(comfyui, assets, clip):
    """HF Gemma2Model keys (no "model." prefix) and tokenizer/tokenizer.model beside text_encoder/."""
    clip2 = te.load_sana_text_encoder(assets.diffusers_dir, config={**TINY, "attn_logit_softcapping": None})
    a, ea = _encode(clip, PROMPT)
    b, eb = _encode(clip2, PROMPT)
    assert torch.equal(ea["attention_mask"], eb["attention_mask"])
    assert (a - b).abs().max().item() < 1e-6


def test_softcapping(comfyui, assets, tmp_path):
    """HF Gemma-2's attn_logit_softcapping, reproduced by our attention hook; the deviation without it."""
    model = _hf_gemma2(assets.vocab, softcap=50.0, seed=1, qk_gain=12.0)  # large logits so the cap bites
    path = str(tmp_path / "gemma2-tiny-softcap.safetensors")
    _save_comfy_layout(model, assets.proto, path)
    embeds, mask, _, _ = _oracle(assets.pipeline(model), PROMPT, SHORT_INSTRUCTION)
    capped = te.load_sana_text_encoder(path, config={**TINY, "attn_logit_softcapping": 50.0})
    assert capped.cond_stage_model.gemma2_2b.transformer.softcapped_layers == TINY["num_hidden_layers"]
    cond, extra = _encode(capped, PROMPT, sana_instruction=SHORT_INSTRUCTION)
    err = _assert_same(cond, extra, embeds, mask)
    plain = te.load_sana_text_encoder(path, config={**TINY, "attn_logit_softcapping": None})
    cond_plain, _ = _encode(plain, PROMPT, sana_instruction=SHORT_INSTRUCTION)
    valid = mask[0].bool()
    dev = (cond_plain[0, valid] - embeds[0, valid]).abs().max().item()
    print(f"\nsoftcap 50 on a tiny model with large attention logits: max |diff| with our softcap {err:.2e}, "
          f"with ComfyUI's plain Gemma-2 attention {dev:.3f} (embeddings of unit RMS)")
    assert dev > 100 * TOL  # the cap matters here, so the match above is a real check of it


def test_full_size_config_is_comfyuis_gemma2_2b(comfyui):
    """SANA's default config builds exactly the module (keys, shapes) of ComfyUI's own Lumina 2 Gemma2_2B, so
    ComfyUI's gemma_2_2b files load; its 26 attention layers get the soft-cap hook. Built on the meta device."""
    import comfy.ops
    from comfy.text_encoders import llama

    ours = te._comfy_classes()["SanaGemma2"](dict(te.SANA_GEMMA2_CONFIG), torch.float16, "meta",
                                             comfy.ops.manual_cast)
    core = llama.Gemma2_2B({}, torch.float16, "meta", comfy.ops.manual_cast)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in core.state_dict().items()}
    expected = te._expected_shapes(te.SANA_GEMMA2_CONFIG)
    assert shapes == {**expected, "model.embed_tokens.weight": (256000, te.SANA_TEXT_WIDTH)}
    assert ours.softcapped_layers == 26


def test_conditioning_carries_mask(comfyui, clip):
    cond, extra = _encode(clip, "a dog")
    assert cond.shape == (1, 300, TINY["hidden_size"])
    mask = extra["attention_mask"]
    assert mask.shape == (1, 300)
    n = int(mask.sum())
    assert mask[0, :n].all() and not mask[0, n:].any()
    assert extra.get("pooled_output") is None


def _save(path, tensors):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def test_wrong_files(comfyui, tmp_path, assets):
    z = torch.zeros
    t5 = str(tmp_path / "t5xxl_fp16.safetensors")
    _save(t5, {"encoder.block.0.layer.0.SelfAttention.k.weight": z(4, 4),
               "encoder.block.23.layer.1.DenseReluDense.wi_1.weight": z(8, 4096)})
    clip_l = str(tmp_path / "clip_l.safetensors")
    _save(clip_l, {"text_model.encoder.layers.0.mlp.fc1.weight": z(8, 4)})
    with pytest.raises(DCGenError, match=r"t5xxl_fp16\.safetensors: expected a Gemma-2-2B.*found a T5"):
        te.load_sana_text_encoder(t5)
    with pytest.raises(DCGenError, match=r"clip_l\.safetensors: expected a Gemma-2-2B.*found a CLIP-L"):
        te.load_sana_text_encoder(clip_l)
    # a Gemma-2 of another width (the tiny one, width 64, against SANA's 2304)
    with pytest.raises(DCGenError, match=r"gemma2-tiny-comfy\.safetensors: expected a Gemma-2 of width 2304.*"
                                         r"found a Gemma-2 of width 64"):
        te.load_sana_text_encoder(assets.comfy_file)
    gemma3 = str(tmp_path / "gemma3.safetensors")
    _save(gemma3, {"model.layers.0.post_feedforward_layernorm.weight": z(4),
                   "model.layers.0.self_attn.q_norm.weight": z(4), "model.embed_tokens.weight": z(8, 4)})
    with pytest.raises(DCGenError, match="found a Gemma-3"):
        te.load_sana_text_encoder(gemma3)
    pickled = str(tmp_path / "gemma.ckpt")
    open(pickled, "wb").close()
    with pytest.raises(DCGenError, match=r"gemma\.ckpt: expected a \.safetensors file"):
        te.load_sana_text_encoder(pickled)
    no_tok = str(tmp_path / "notok" / "gemma2.safetensors")
    os.makedirs(os.path.dirname(no_tok))
    _save(no_tok, {"model." + k: v for k, v in assets.model.state_dict().items()})
    with pytest.raises(DCGenError, match="SentencePiece tokenizer"):
        te.load_sana_text_encoder(no_tok, config={**TINY, "attn_logit_softcapping": None})
