"""SANA's text encoder (Gemma-2-2B) as a core ComfyUI CLIP, on ComfyUI's own Gemma-2 module.

What the official diffusers ``SanaPipeline`` does, and this module reproduces:

* the prompt is lower-cased and stripped (``_text_preprocessing``, ``clean_caption=False``);
* the *complex human instruction* (:data:`COMPLEX_HUMAN_INSTRUCTION`, joined with newlines) is prepended to a
  positive prompt; the text is tokenized with BOS, padded on the right with ``<pad>`` (id 0) and truncated to
  ``max_length = 300 + (instruction token count, BOS included) - 2``;
* Gemma-2 runs with the padding mask; its FINAL hidden state after the final norm is the embedding (ComfyUI's
  Lumina 2 path reads the penultimate layer instead);
* the embeddings and the mask kept are token 0 plus the last 299 (``select_index = [0] + range(-299, 0)``);
* the negative prompt is encoded without the instruction, to 300 tokens.

The attention mask travels in the conditioning as ``"attention_mask"`` (shape (1, 300), like the masks of
ComfyUI's other masked text encoders), for the SANA model's cross-attention.

HF Gemma-2 caps its attention logits (``attn_logit_softcapping`` = 50: ``tanh(s / 50) * 50``); ComfyUI's Gemma-2
(v0.3.64 and v0.33) has no soft-capping, so this module hooks a soft-capped attention into ComfyUI's attention
layers (``SANA_GEMMA2_CONFIG["attn_logit_softcapping"]``; None gives ComfyUI's own attention). The final-logit
soft-capping only touches the LM head's logits, which a text encoder never computes.

Tokenizer options (``clip.set_tokenizer_option(name, value)`` on a clone, or ``tokenizer_options=``):

* ``"sana_instruction"``: None (default) = the official instruction; ``False`` or ``""`` = none (the official
  negative-prompt encoding); a string = that instruction text instead.
* ``"sana_negative"``: True encodes the text as the official pipeline encodes the negative prompt (no
  instruction). An empty (or blank) prompt is always encoded that way, as the official default negative ``""`` is.

Prompt weighting ``(word:1.2)`` and ``embedding:`` names are not parsed: the text goes to the tokenizer as the
official pipeline sends it.

ComfyUI is imported inside the functions that need it; this module imports with torch alone.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import types

import torch

from ..shared.errors import DCGenError

SANA_TEXT_WIDTH = 2304
SANA_MAX_SEQUENCE_LENGTH = 300
GEMMA_PAD_ID = 0
GEMMA_BOS_ID = 2

# diffusers SanaPipeline.__call__(complex_human_instruction=...) default, verbatim.
COMPLEX_HUMAN_INSTRUCTION = [
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
    "User Prompt: ",
]
DEFAULT_INSTRUCTION_TEXT = "\n".join(COMPLEX_HUMAN_INSTRUCTION)

# google/gemma-2-2b(-it) config.json, as SANA uses it (text_encoder of the SANA diffusers repos).
SANA_GEMMA2_CONFIG = {
    "vocab_size": 256000,
    "hidden_size": SANA_TEXT_WIDTH,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "query_pre_attn_scalar": 256,
    "attn_logit_softcapping": 50.0,
}

TOKEN_KEY = "gemma2_2b"  # the tokenizer / encoder name, as ComfyUI's Lumina 2 Gemma uses


# ----------------------------------------------------------------------------------------------- tokenization

def preprocess_prompt(text: str) -> str:
    """diffusers ``SanaPipeline._text_preprocessing(text, clean_caption=False)``."""
    return text.lower().strip()


def sana_token_ids(encode, text: str, instruction: str | None, max_sequence_length: int = SANA_MAX_SEQUENCE_LENGTH):
    """Token ids and mask exactly as ``SanaPipeline._get_gemma_prompt_embeds`` builds them (one prompt).

    ``encode(str) -> list[int]`` must add BOS and no EOS (Gemma's tokenizer). ``instruction`` None or "" means
    none. Returns (ids, mask), both of length ``max_length``.
    """
    prompt = preprocess_prompt(text)
    if instruction:
        max_length = len(encode(instruction)) + max_sequence_length - 2
        prompt = instruction + prompt
    else:
        max_length = max_sequence_length
    ids = list(encode(prompt))[:max_length]
    mask = [1] * len(ids) + [0] * (max_length - len(ids))
    ids = ids + [GEMMA_PAD_ID] * (max_length - len(ids))
    return ids, mask


def select_index(length: int, max_sequence_length: int = SANA_MAX_SEQUENCE_LENGTH) -> list[int]:
    """``SanaPipeline.encode_prompt``'s ``[0] + range(-299, 0)``, as absolute indices into ``length`` tokens."""
    if length <= max_sequence_length:
        return list(range(length))
    return [0] + list(range(length - max_sequence_length + 1, length))


def _instruction_for(text: str, options: dict) -> str | None:
    if options.get("sana_negative", False) or not text.strip():
        return None
    instruction = options.get("sana_instruction", None)
    if instruction is None:
        return DEFAULT_INSTRUCTION_TEXT
    if instruction is False:
        return None
    if isinstance(instruction, (list, tuple)):
        instruction = "\n".join(instruction)
    return str(instruction) or None


# --------------------------------------------------------------------------------- soft-capped eager attention

def softcap_attention(q, k, v, heads, mask=None, skip_reshape=True, skip_output_reshape=False, scale=None,
                      softcap=None, **kwargs):
    """HF Gemma-2's eager attention, in ComfyUI's attention-function signature (``skip_reshape`` layout).

    q: (B, H, S, D); k, v: (B, H or KV heads, S, D) (ComfyUI v0.3.64 repeats the KV heads itself, v0.33 asks
    for ``enable_gqa``); mask: additive, broadcastable to (B, H, S, S).
    """
    if not skip_reshape:
        b, s, _ = q.shape
        q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    b, h, s, d = q.shape
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)
        v = v.repeat_interleave(h // v.shape[1], dim=1)
    if scale is None:
        scale = d ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask.to(scores.dtype)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(b, s, h * d)


def _install_softcap(llama_model, config) -> int:
    """Make every attention layer of a ComfyUI ``Llama2_`` (Gemma-2) use :func:`softcap_attention`.

    ComfyUI's Gemma-2 blocks call ``self_attn(..., optimized_attention=fn, ...)`` with keywords (v0.3.64 and
    v0.33); a forward pre-hook swaps ``fn``. Returns the number of layers hooked (0 when nothing to change).
    """
    softcap = getattr(config, "attn_logit_softcapping", None)
    head_dim = config.head_dim
    scalar = getattr(config, "query_pre_attn_scalar", None) or head_dim
    if softcap is None and scalar == head_dim:
        return 0  # ComfyUI's own attention is exact
    scale = float(scalar) ** -0.5

    def attention(q, k, v, heads, mask=None, **kw):
        kw.pop("enable_gqa", None)
        return softcap_attention(q, k, v, heads, mask=mask, scale=scale, softcap=softcap, **kw)

    def hook(module, args, kwargs):
        if "optimized_attention" not in kwargs:
            raise RuntimeError("this ComfyUI's Gemma-2 attention is not called as expected "
                               "(no optimized_attention keyword); SANA's soft-capping cannot be installed")
        kwargs["optimized_attention"] = attention
        return args, kwargs

    n = 0
    for layer in llama_model.layers:
        layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
        n += 1
    return n


# ------------------------------------------------------------------------------------- ComfyUI classes (lazy)

_CLASSES = None


def _comfy_classes():
    """Build (once) the ComfyUI subclasses: they derive from classes ComfyUI defines at import time."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    from comfy import sd1_clip
    from comfy.text_encoders import llama, lumina2

    class SanaGemma2(llama.Gemma2_2B):
        """ComfyUI's Gemma2_2B with a configurable shape (any key of the config, incl. head_dim) and SANA's
        soft-capped attention."""

        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            fields = {f.name for f in dataclasses.fields(llama.Gemma2_2B_Config)}
            config = llama.Gemma2_2B_Config(**{k: v for k, v in config_dict.items() if k in fields})
            for k, v in config_dict.items():
                if k not in fields:
                    setattr(config, k, v)
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.dtype = dtype
            self.softcapped_layers = _install_softcap(self.model, config)

    class SanaGemma2ClipModel(sd1_clip.SDClipModel):
        """Final normed hidden state, padding mask to the model and back in the conditioning."""

        def __init__(self, device="cpu", dtype=None, model_options=None, config=None):
            super().__init__(device=device, layer="last", layer_idx=None, textmodel_json_config=dict(config),
                             dtype=dtype, special_tokens={"start": GEMMA_BOS_ID, "pad": GEMMA_PAD_ID},
                             layer_norm_hidden_state=False, model_class=SanaGemma2, enable_attention_masks=True,
                             return_attention_masks=True, model_options=model_options or {})

    class SanaTextEncoder(sd1_clip.SD1ClipModel):
        """The CLIP's ``cond_stage_model``: encodes, then keeps token 0 plus the last 299 (and their mask)."""

        def __init__(self, device="cpu", dtype=None, model_options=None, config=None):
            config = dict(config or SANA_GEMMA2_CONFIG)

            def clip_model(**kw):
                return SanaGemma2ClipModel(config=config, **kw)

            super().__init__(device=device, dtype=dtype, name=TOKEN_KEY, clip_model=clip_model,
                             model_options=model_options or {})

        def encode_token_weights(self, token_weight_pairs):
            out = super().encode_token_weights(token_weight_pairs)
            cond, pooled = out[0], out[1]
            extra = dict(out[2]) if len(out) > 2 else {}
            index = select_index(cond.shape[1])
            if len(index) != cond.shape[1]:
                index_t = torch.tensor(index, device=cond.device)
                cond = cond.index_select(1, index_t)
                if "attention_mask" in extra:
                    mask = extra["attention_mask"]
                    extra["attention_mask"] = mask.index_select(mask.ndim - 1, index_t.to(mask.device))
            return cond, pooled, extra

    class SanaTokenizer(sd1_clip.SD1Tokenizer):
        """ComfyUI's Gemma tokenizer (SentencePiece model from the file's ``spiece_model``), SANA's text rules."""

        def __init__(self, embedding_directory=None, tokenizer_data=None):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data or {},
                             name=TOKEN_KEY, tokenizer=lumina2.Gemma2BTokenizer)

        def _encode(self, text):
            # the SentencePiece processor itself: BOS, no EOS, no splitting of the prompt (as HF's tokenizer)
            return getattr(self, self.clip).tokenizer.tokenizer.encode(text, add_bos=True, add_eos=False)

        def tokenize_with_weights(self, text, return_word_ids=False, tokenizer_options=None, **kwargs):
            options = dict(tokenizer_options or {})
            ids, _ = sana_token_ids(self._encode, text, _instruction_for(text, options))
            if return_word_ids:
                batch = [(t, 1.0, 0) for t in ids]
            else:
                batch = [(t, 1.0) for t in ids]
            return {self.clip_name: [batch]}

    _CLASSES = {"SanaGemma2": SanaGemma2, "SanaGemma2ClipModel": SanaGemma2ClipModel,
                "SanaTextEncoder": SanaTextEncoder, "SanaTokenizer": SanaTokenizer}
    return _CLASSES


def sana_clip_target(config=None):
    """A ``comfy.supported_models_base.ClipTarget``-like object for ``comfy.sd.CLIP``."""
    classes = _comfy_classes()
    config = dict(config or SANA_GEMMA2_CONFIG)

    class SanaTextEncoderForCLIP(classes["SanaTextEncoder"]):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            super().__init__(device=device, dtype=dtype, model_options=model_options, config=config)

    return types.SimpleNamespace(params={}, clip=SanaTextEncoderForCLIP, tokenizer=classes["SanaTokenizer"])


# ---------------------------------------------------------------------------------------------------- loading

_SPIECE_KEY = "spiece_model"
_KNOWN_NAMES = {
    "CLIP_L": "a CLIP-L text encoder", "CLIP_H": "a CLIP-H text encoder", "CLIP_G": "a CLIP-G text encoder",
    "T5_XXL": "a T5-XXL text encoder", "T5_XL": "a T5-XL text encoder", "T5_BASE": "a T5 text encoder",
    "T5_XXL_OLD": "a T5-XXL text encoder", "LLAMA3_8": "a Llama-3 text encoder",
    "GEMMA_3_4B": "a Gemma-3 text encoder", "QWEN25_3B": "a Qwen2.5 text encoder",
    "QWEN25_7B": "a Qwen2.5-VL text encoder",
}


def _describe(sd) -> str:
    """What a state dict looks like, in words, using ComfyUI's own text-encoder detection when available."""
    try:
        import comfy.sd

        te = comfy.sd.detect_te_model(sd)
    except (ImportError, KeyError, AttributeError, IndexError, TypeError):  # fall back to key names
        te = None
    if te is not None and te.name in _KNOWN_NAMES:
        return _KNOWN_NAMES[te.name]
    if te is not None:
        return f"a {te.name} text encoder"
    keys = sorted(sd)[:3]
    return f"{len(sd)} tensors that are no Gemma-2 text encoder (first keys: {keys})"


def _to_comfy_keys(sd: dict) -> dict:
    """ComfyUI (and HF Gemma2ForCausalLM) keys ``model.*``; HF Gemma2Model (diffusers ``text_encoder/``) has none."""
    if "model.embed_tokens.weight" not in sd and "embed_tokens.weight" in sd:
        sd = {(k if k == _SPIECE_KEY or k.startswith("lm_head.") else "model." + k): v for k, v in sd.items()}
    for k in ("lm_head.weight", "model.lm_head.weight"):  # tied to the embedding; a text encoder needs no head
        sd.pop(k, None)
    return sd


def _expected_shapes(config) -> dict:
    h, hd = config["hidden_size"], config["head_dim"]
    q, kv, ff = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd, config["intermediate_size"]
    shapes = {"model.norm.weight": (h,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h), p + "mlp.down_proj.weight": (h, ff),
        })
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            shapes[p + n + ".weight"] = (h,)
    return shapes


def _check_gemma2(name: str, sd: dict, config: dict) -> dict:
    """Validate a Gemma-2 state dict (ComfyUI keys) against ``config``; returns config with the file's vocab."""
    if "model.layers.0.post_feedforward_layernorm.weight" not in sd or "model.embed_tokens.weight" not in sd:
        raise DCGenError(f"{name}: expected a Gemma-2-2B text encoder (SANA's; keys model.layers.N."
                         f"post_feedforward_layernorm, model.embed_tokens), found {_describe(sd)}. "
                         "Pick the Gemma-2-2B file (e.g. ComfyUI's gemma_2_2b_fp16.safetensors).")
    if "model.layers.0.self_attn.q_norm.weight" in sd:
        raise DCGenError(f"{name}: expected a Gemma-2-2B text encoder, found a Gemma-3 text encoder "
                         "(it has q_norm/k_norm). SANA uses Gemma-2-2B.")
    quant = [k for k in sd if k == "scaled_fp8" or k.endswith((".comfy_quant", ".weight_scale"))]
    if quant:
        raise DCGenError(f"{name}: expected an fp16/bf16/fp32 Gemma-2-2B text encoder, found a quantized file "
                         f"(e.g. {quant[0]}). Use the unquantized Gemma-2-2B file.")
    width = sd["model.embed_tokens.weight"].shape[1]
    if width != config["hidden_size"]:
        raise DCGenError(f"{name}: expected a Gemma-2 of width {config['hidden_size']} (Gemma-2-2B, SANA's text "
                         f"encoder), found a Gemma-2 of width {width}"
                         + (" (Gemma-2-9B)" if width == 3584 else " (Gemma-2-27B)" if width == 4608 else "") + ".")
    layers = len({int(m.group(1)) for k in sd for m in [re.match(r"model\.layers\.(\d+)\.", k)] if m})
    if layers != config["num_hidden_layers"]:
        raise DCGenError(f"{name}: expected a Gemma-2 with {config['num_hidden_layers']} layers, found {layers}.")
    for key, shape in _expected_shapes(config).items():
        if key not in sd:
            raise DCGenError(f"{name}: expected tensor {key} of a Gemma-2-2B text encoder, found it missing.")
        if tuple(sd[key].shape) != shape:
            raise DCGenError(f"{name}: expected {key} of shape {shape}, found {tuple(sd[key].shape)}.")
    return {**config, "vocab_size": sd["model.embed_tokens.weight"].shape[0]}


def _find_tokenizer_model(path: str):
    base = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    for cand in (os.path.join(base, "tokenizer.model"), os.path.join(os.path.dirname(base), "tokenizer", "tokenizer.model")):
        if os.path.isfile(cand):
            with open(cand, "rb") as f:
                return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    return None


def _read_safetensors(path: str) -> dict:
    import safetensors.torch

    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise DCGenError(f"{path}: expected a Gemma-2-2B .safetensors file (or a folder of them), found a folder "
                             "without .safetensors files.")
        sd = {}
        for f in files:
            sd.update(safetensors.torch.load_file(os.path.join(path, f), device="cpu"))
        return sd
    if not os.path.isfile(path):
        raise DCGenError(f"{path}: expected a Gemma-2-2B .safetensors file, found no such file.")
    if not path.lower().endswith((".safetensors", ".sft")):
        raise DCGenError(f"{os.path.basename(path)}: expected a .safetensors file (pickled checkpoints are not "
                         f"loaded), found a {os.path.splitext(path)[1] or 'extension-less'} file.")
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except Exception as e:
        raise DCGenError(f"{os.path.basename(path)}: expected a readable .safetensors file, found an unreadable one "
                         f"({type(e).__name__}: {e}).") from e


def load_sana_text_encoder(path: str, dtype=None, config: dict | None = None, model_options: dict | None = None):
    """Load SANA's Gemma-2-2B text encoder as a ``comfy.sd.CLIP``.

    ``path``: ComfyUI's text-encoder file (``model.*`` keys plus the tokenizer as a ``spiece_model`` tensor,
    e.g. gemma_2_2b_fp16.safetensors for Lumina 2), an HF Gemma-2 checkpoint (``Gemma2Model`` keys without
    ``model.``, or ``Gemma2ForCausalLM`` keys), or a diffusers ``text_encoder/`` folder of safetensors shards;
    without a ``spiece_model`` tensor, a ``tokenizer.model`` beside the file or in ``../tokenizer/`` is used.
    ``dtype``: weight dtype (default: the file's). ``config``: Gemma-2 shape overrides (tests; default
    :data:`SANA_GEMMA2_CONFIG`, soft-capping 50). Raises :class:`DCGenError` for a file that is no such model.
    """
    import comfy.sd
    import comfy.utils

    config = {**SANA_GEMMA2_CONFIG, **(config or {})}
    name = os.path.basename(os.path.normpath(path))
    sd = _to_comfy_keys(_read_safetensors(path))
    spiece = sd.pop(_SPIECE_KEY, None)
    config = _check_gemma2(name, sd, config)
    if spiece is None:
        spiece = _find_tokenizer_model(path)
    if spiece is None:
        raise DCGenError(f"{name}: expected Gemma's SentencePiece tokenizer, as a 'spiece_model' tensor in the file "
                         "(ComfyUI's Gemma-2-2B files carry it) or a tokenizer.model beside it or in ../tokenizer/, "
                         "found neither.")

    if dtype is None:
        file_dtype = sd["model.norm.weight"].dtype
        dtype = file_dtype if file_dtype in (torch.float16, torch.bfloat16, torch.float32) else None
    options = dict(model_options or {})
    if dtype is not None:
        options["dtype"] = dtype
    target = sana_clip_target(config)
    tokenizer_data = {_SPIECE_KEY: spiece}
    parameters = comfy.utils.calculate_parameters(sd)
    if "state_dict" in inspect.signature(comfy.sd.CLIP.__init__).parameters:  # newer ComfyUI loads while building
        clip = comfy.sd.CLIP(target, tokenizer_data=tokenizer_data, parameters=parameters, state_dict=[sd],
                             model_options=options)
    else:
        clip = comfy.sd.CLIP(target, tokenizer_data=tokenizer_data, parameters=parameters, model_options=options)
        missing, _ = clip.load_sd(sd)
        missing = [k for k in missing if not k.endswith("logit_scale")]
        if missing:
            raise DCGenError(f"{name}: expected every Gemma-2 weight, found {len(missing)} missing (e.g. {missing[0]}).")
    return clip


def sana_negative(clip):
    """A clone of a SANA CLIP that encodes every text as the official pipeline encodes the negative prompt."""
    clip = clip.clone()
    clip.set_tokenizer_option("sana_negative", True)
    return clip
