"""SANA text-to-image transformer (linear-attention DiT) built with ComfyUI operations."""
