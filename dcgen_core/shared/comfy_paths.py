"""Model files through ComfyUI's ``folder_paths`` (the only way node inputs name files).

DC-Gen files live in the standard folders: DC-AE in ``vae``, transformers in
``diffusion_models`` (single files or diffusers folders), LoRAs in ``loras``,
aligned embeddings in ``dcgen_embeddings`` (registered here) or ``loras``.
"""

from __future__ import annotations

import os

from .checkpoints import is_shard

EMBEDDINGS = "dcgen_embeddings"
_WEIGHT_EXTENSIONS = {".safetensors", ".sft"}


def register_folders():
    import folder_paths

    if EMBEDDINGS not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[EMBEDDINGS] = (
            [os.path.join(folder_paths.models_dir, EMBEDDINGS)], set(_WEIGHT_EXTENSIONS))


def _is_diffusers_folder(folder: str, names: list[str]) -> bool:
    has_weights = any(os.path.splitext(n)[1] in _WEIGHT_EXTENSIONS for n in names)
    return any(n.endswith(".safetensors.index.json") for n in names) or ("config.json" in names and has_weights)


def _diffusers_folders(kind: str) -> list[str]:
    import folder_paths

    register_folders()
    found = []
    for base in folder_paths.get_folder_paths(kind):
        if not os.path.isdir(base):
            continue
        for root, dirs, files in os.walk(base, followlinks=True):
            if root[len(base):].count(os.sep) >= 3:
                dirs[:] = []
            if root != base and _is_diffusers_folder(root, files):
                found.append(os.path.relpath(root, base).replace(os.sep, "/"))
                dirs[:] = []
    return found


def weight_files(kind: str) -> list[str]:
    """What a loader offers: safetensors files and diffusers folders (listed once, not shard by shard, also when
    they sit deeper than the folder scan goes)."""
    import folder_paths

    folders = _diffusers_folders(kind)
    files = set()
    for n in folder_paths.get_filename_list(kind):
        name = n.replace(os.sep, "/")
        if os.path.splitext(n)[1] not in _WEIGHT_EXTENSIONS or any(name.startswith(f + "/") for f in folders):
            continue
        full = folder_paths.get_full_path(kind, n) if "/" in name else None
        files.add(name.rsplit("/", 1)[0] if full and is_shard(full) else n)
    return sorted(files | set(folders))


def embedding_files() -> list[str]:
    return sorted(set(weight_files(EMBEDDINGS)) | set(weight_files("loras")))


def full_path(kind: str, name: str) -> str:
    """Resolve a widget value (file or diffusers folder) to a path; embeddings are also searched in ``loras``."""
    import folder_paths

    register_folders()
    kinds = [kind, "loras"] if kind == EMBEDDINGS else [kind]
    for k in kinds:
        path = folder_paths.get_full_path(k, name)
        if path:
            return path
        for base in folder_paths.get_folder_paths(k):
            candidate = os.path.join(base, name)
            if os.path.isdir(candidate) and os.path.commonpath([os.path.abspath(base), os.path.abspath(candidate)]) \
                    == os.path.abspath(base):
                return candidate
    searched = ", ".join(p for k in kinds for p in folder_paths.get_folder_paths(k))
    raise FileNotFoundError(f"{name}: expected a file or diffusers folder in the '{kind}' model folder "
                            f"({searched}), found none.")
