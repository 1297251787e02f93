"""Model family Qwen-Image (-Edit) and DC-Gen-Qwen-Image-Edit: core's Qwen-Image transformer on 1x1-patch DC-AE
f32c32 latents, with the edit reference image packed the same way after the noise tokens."""
