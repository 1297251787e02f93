"""The architecture registry: the model families the pack patches, and what the shared nodes ask of them.

DC-Gen Add Embedding and DC-Gen Load LoRA take a MODEL of any family; this module tells which family it is
(each family's ``architecture.ARCHITECTURE``, see shared/family.py) and hands out its embedding patch and LoRA key
map, so neither the nodes nor the shared LoRA code branch on model types. A new family registers in ARCHITECTURES.
"""

from __future__ import annotations

from .flux.architecture import ARCHITECTURE as FLUX
from .qwen_image.architecture import ARCHITECTURE as QWEN_IMAGE
from .sana.architecture import ARCHITECTURE as SANA
from .wan.architecture import ARCHITECTURE as WAN
from .shared.errors import DCGenError
from .shared.family import Architecture
from .shared.lora import lora_patches, read_lora_file, split_quantized


#: Every model family the pack patches (one entry per family; ARCHITECTURE.md, "Adding a model family").
ARCHITECTURES: tuple[Architecture, ...] = (FLUX, SANA, QWEN_IMAGE, WAN)


def architecture_of(model, subject: str = "model") -> Architecture:
    dm = model.get_model_object("diffusion_model")
    for arch in ARCHITECTURES:
        if arch.matches(dm):
            return arch
    expected = " or ".join(arch.expected for arch in ARCHITECTURES)
    raise DCGenError(f"{subject}: expected {expected}, found {type(model.model).__name__} with a "
                     f"{type(dm).__name__} transformer.")


def apply_aligned_embedding(model, emb, vae=None):
    """The embedding patch of ``model``'s architecture, on a clone."""
    return architecture_of(model, subject=emb.source).apply_aligned_embedding(model, emb, vae=vae)


def apply_lora(model, path: str, strength: float = 1.0, vae=None):
    """A clone of ``model`` with the LoRA at ``path`` added as weight patches.

    When the file also carries an aligned embedder/head, the clone gets them too
    (and with them the DC-AE latent space).
    """

    arch = architecture_of(model, subject=path)
    lora_sd, emb = read_lora_file(path)
    if emb is None and not lora_sd:
        raise DCGenError(f"{path}: expected LoRA weights or an aligned embedding, found an empty file.")
    m = model.clone()
    if emb is not None:
        m = arch.apply_aligned_embedding(m, emb, vae=vae, clone=False)
    if lora_sd and strength != 0:
        from .shared.latent_space import logical_weights
        from .shared.quant.ops import add_low_rank_terms, runtime_lora_targets

        patches = lora_patches(m, lora_sd, path, arch)
        weights = logical_weights(m.model)
        terms, patches = split_quantized(patches, weights, strength, runtime_lora_targets(m.model, weights))
        if terms:
            add_low_rank_terms(m, terms)
        applied = set(m.add_patches(patches, strength))
        skipped = [k for k in patches if k not in applied]
        if skipped:
            raise DCGenError(f"{path}: expected every LoRA target to exist in the model, found {len(skipped)} "
                             f"that do not, e.g. {skipped[:3]}.")
    return m
