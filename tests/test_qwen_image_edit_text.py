"""The text side of DC-Gen-Qwen-Image-Edit without the 7B model: core's QwenImageTokenizer, given the reference image
(as DC-Gen Qwen Edit Encode gives it), produces exactly the token ids of the authors' edit template
(``DCQwenImageEditPipeline.prompt_template_encode``) for the same prompt, and core's Qwen-Image text encoder drops the
same leading tokens as the authors' ``prompt_template_encode_start_idx`` (core cuts after the second
``<|im_start|>`` and ``user\\n``). ComfyUI's Qwen2.5-VL cannot be built small (its vision tower's width and depth
are fixed), so the encoder's numbers themselves are not compared here."""

import os

import torch

import tiny
import tiny_qwen

IMAGE_PAD, IM_START, USER, NEWLINE = 151655, 151644, 872, 198


def test_core_template_and_drop_equal_the_authors(comfyui):
    import comfy.text_encoders.qwen_image as qi
    from transformers import Qwen2Tokenizer

    pipe = tiny_qwen.authors_pipeline(tiny_qwen.tiny_qwen_transformer(), tiny.tiny_dcae())
    prompt = "make the sky a snowy winter evening"
    core = qi.QwenImageTokenizer().tokenize_with_weights(prompt, images=[torch.zeros(1, 64, 64, 3)])
    core_ids = [IMAGE_PAD if isinstance(t, dict) else int(t) for t, *_ in core["qwen25_7b"][0]]
    folder = os.path.join(os.path.dirname(qi.__file__), "qwen25_tokenizer")
    authors_ids = Qwen2Tokenizer.from_pretrained(folder)(pipe.prompt_template_encode.format(prompt))["input_ids"]
    assert core_ids == authors_ids
    assert sum(isinstance(t, dict) for t, *_ in core["qwen25_7b"][0]) == 1  # the image sits at <|image_pad|>
    second_start = [i for i, t in enumerate(core_ids) if t == IM_START][1]
    assert core_ids[second_start + 1: second_start + 3] == [USER, NEWLINE]
    assert second_start + 3 == pipe.prompt_template_encode_start_idx == 64
