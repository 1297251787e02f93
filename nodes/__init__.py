"""ComfyUI nodes of the DC-Gen pack. Each node is inputs, outputs, tooltips and one call into dcgen_core."""

from .latent import LATENT_NODES
from .loaders import LOADER_NODES
from .qwen_edit import QWEN_EDIT_NODES
from .sampler import SAMPLER_NODES
from .vae import VAE_NODES
from .video import VIDEO_NODES

_NODES = {**LOADER_NODES, **QWEN_EDIT_NODES, **LATENT_NODES, **SAMPLER_NODES, **VAE_NODES, **VIDEO_NODES}

NODE_CLASS_MAPPINGS = {name: cls for name, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {name: display for name, (_, display) in _NODES.items()}
