"""ComfyUI-DC-Gen: DC-Gen (arXiv 2509.25180) for ComfyUI."""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported as a plain module, e.g. by pytest setting up a checkout folder whose name is no identifier
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

# the editor's node help: web/docs/<NodeId>.md, served at /extensions/<this folder>/docs/<NodeId>.md
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
