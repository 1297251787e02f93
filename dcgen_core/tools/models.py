"""The one table of model files the pack knows: what each shipped workflow names, where it goes, where it is published.

Everything that tells a user about a model file comes from ``MODELS``: the workflows' ``properties.models``
(the editor's missing-models dialog and its download buttons; written by ``scripts/layout_workflows.py``), the
doctor's "where to get it" (``tools/workflows.py``) and the README's model tables (``readme_table``; kept in step
by ``scripts/layout_workflows.py`` and checked by ``tests/test_model_table.py``).

A file is one of three kinds:

- ``url`` set: a single file the editor can download (a direct Hugging Face ``resolve`` URL);
- ``get`` set to an ``hf download`` command: a diffusers folder (the editor downloads single files only);
- ``get`` set to a pack command: a file the user makes (4-bit, extracted, trained); the workflow's note names it.

``size`` and ``sha256`` are what the publisher's page states; empty where this project could not confirm them
(shown as "unknown", never guessed).
"""

from __future__ import annotations

from dataclasses import dataclass

HF = "https://huggingface.co/"
DCGEN_FLUX = HF + "nvidia/DC-Gen-FLUX.1-Krea-Dev"
SANA_1600M = HF + "Efficient-Large-Model/Sana_1600M_1024px_diffusers"
FLUX_TEXT = HF + "comfyanonymous/flux_text_encoders"
DCAE_15 = "https://github.com/dc-ai-projects/DC-Gen/blob/main/projects/DC-AE-1.5.md"
DC_QWEN_EDIT = HF + "nvidia/DC-Qwen-Image-Edit"
QWEN_IMAGE_TEXT = HF + "Comfy-Org/Qwen-Image_ComfyUI"
_DC_QWEN_GET = "hf download nvidia/DC-Qwen-Image-Edit --local-dir models/diffusion_models/DC-Qwen-Image-Edit"
DC_VIDEOGEN = HF + "nvidia/DC-VideoGen-Wan2.1-14B"
WAN_COMFY = HF + "Comfy-Org/Wan_2.1_ComfyUI_repackaged"


@dataclass(frozen=True)
class ModelFile:
    name: str  # as the loader widget names it (a file, or a diffusers folder relative to the model folder)
    folder: str  # ComfyUI model folder (models/<folder>)
    what: str  # one line: what the file is
    page: str  # the publisher's page
    url: str = ""  # direct download of the single file ("" for a folder or a file the user makes)
    size: str = ""  # as the publisher states it; "" = unknown
    sha256: str = ""  # "" = unknown
    get: str = ""  # the command that downloads a folder or makes the file, when there is no url

    @property
    def made(self) -> bool:
        """A file the user makes with one of the pack's commands (no one publishes it)."""
        return self.get.startswith("python -m dcgen_core")

    @property
    def source(self) -> str:
        """One line for the doctor: where to get the file."""
        if self.url:
            return f"download {self.url} (from {self.page})"
        if not self.get:
            return f"see {self.page}"
        return f"{'make it' if self.made else 'download'}: {self.get}" + ("" if self.made else f" ({self.page})")


def _hf_folder(repo_page: str, include: str, local_dir: str) -> str:
    return f'hf download {repo_page[len(HF):]} --include "{include}" --local-dir {local_dir}'


def _dcgen_flux(res: str) -> list[ModelFile]:
    sub = f"DC-Gen-FLUX.1-Krea-Dev-v1.0-Res{res}"
    dcae = "DC-AE f32c32" if res == "1K" else "DC-AE-1.5 f64c128"
    return [
        ModelFile(f"{sub}/transformer", "diffusion_models", f"DC-Gen-FLUX.1-Krea-Dev {res} transformer (diffusers "
                  "folder, bf16)", DCGEN_FLUX, get=_hf_folder(DCGEN_FLUX, f"{sub}/transformer/*",
                                                              "models/diffusion_models")),
        ModelFile(f"{sub}/vae", "vae", f"its {dcae} (diffusers folder)", DCGEN_FLUX,
                  get=_hf_folder(DCGEN_FLUX, f"{sub}/vae/*", "models/vae")),
    ]


NVFP4_4K = "DC-Gen-FLUX.1-Krea-Dev-v1.0-Res4K-nvfp4.safetensors"

MODELS: list[ModelFile] = [
    *_dcgen_flux("1K"),
    *_dcgen_flux("4K"),
    ModelFile(NVFP4_4K, "diffusion_models", "the 4K transformer in NVFP4 (4-bit), made once from the bf16 folder",
              "docs/4bit.md",
              get="python -m dcgen_core.quantize models/diffusion_models/DC-Gen-FLUX.1-Krea-Dev-v1.0-Res4K/transformer "
                  f"models/diffusion_models/{NVFP4_4K} --format nvfp4"),
    ModelFile("clip_l.safetensors", "text_encoders", "FLUX text encoder CLIP-L", FLUX_TEXT,
              url=FLUX_TEXT + "/resolve/main/clip_l.safetensors", size="246 MB"),
    ModelFile("t5xxl_fp16.safetensors", "text_encoders", "FLUX text encoder T5-XXL (fp16)", FLUX_TEXT,
              url=FLUX_TEXT + "/resolve/main/t5xxl_fp16.safetensors", size="9.79 GB"),
    ModelFile("flux1-krea-dev.safetensors", "diffusion_models", "FLUX.1-Krea-dev (gated: accept the license first)",
              HF + "black-forest-labs/FLUX.1-Krea-dev",
              url=HF + "black-forest-labs/FLUX.1-Krea-dev/resolve/main/flux1-krea-dev.safetensors"),
    ModelFile("dcgen-flux-krea-1k-embedding.safetensors", "dcgen_embeddings", "DC-Gen 1K aligned embedding, "
              "extracted from the 1K release and FLUX.1-Krea-dev", "docs/training.md",
              get="python -m dcgen_core.extract models/diffusion_models/DC-Gen-FLUX.1-Krea-Dev-v1.0-Res1K/transformer "
                  "models/diffusion_models/flux1-krea-dev.safetensors models/loras/dcgen-flux-krea-1k-lora.safetensors "
                  "--rank 256 --embedding-out models/dcgen_embeddings/dcgen-flux-krea-1k-embedding.safetensors"),
    ModelFile("dcgen-flux-krea-1k-lora.safetensors", "loras", "DC-Gen 1K LoRA, extracted with the embedding",
              "docs/training.md",
              get="python -m dcgen_core.extract models/diffusion_models/DC-Gen-FLUX.1-Krea-Dev-v1.0-Res1K/transformer "
                  "models/diffusion_models/flux1-krea-dev.safetensors models/loras/dcgen-flux-krea-1k-lora.safetensors "
                  "--rank 256 --embedding-out models/dcgen_embeddings/dcgen-flux-krea-1k-embedding.safetensors"),
    ModelFile("4x-UltraSharp.safetensors", "upscale_models", "a 4x upscale model (any 4x model ComfyUI reads works)",
              "https://openmodeldb.info/models/4x-UltraSharp"),
    ModelFile("flux1-dev.safetensors", "diffusion_models", "FLUX.1-dev (gated: accept the license first)",
              HF + "black-forest-labs/FLUX.1-dev",
              url=HF + "black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors"),
    ModelFile("ae.safetensors", "vae", "the FLUX VAE (for the ControlNet hint)",
              HF + "Comfy-Org/Lumina_Image_2.0_Repackaged",
              url=HF + "Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors",
              size="335 MB", sha256="afc8e28272cd15db3919bacdb6918ce9c1ed22e96cb12c4d5ed0fba823529e38"),
    ModelFile("flux-canny-controlnet.safetensors", "controlnet", "a FLUX.1 canny ControlNet (rename yours or pick "
              "it in the node)", HF + "InstantX/FLUX.1-dev-Controlnet-Canny"),
    ModelFile("Sana_1600M_1024px_diffusers/transformer", "diffusion_models", "SANA 1.6B 1024px transformer "
              "(diffusers folder)", SANA_1600M,
              get=_hf_folder(SANA_1600M, "transformer/*", "models/diffusion_models/Sana_1600M_1024px_diffusers")),
    ModelFile("Sana_1600M_1024px_diffusers/vae", "vae", "SANA's DC-AE f32c32 (diffusers folder)", SANA_1600M,
              get=_hf_folder(SANA_1600M, "vae/*", "models/vae/Sana_1600M_1024px_diffusers")),
    ModelFile("gemma_2_2b_fp16.safetensors", "text_encoders", "Gemma-2-2B, SANA's text encoder (ComfyUI's file, as "
              "for Lumina 2)", HF + "Comfy-Org/Lumina_Image_2.0_Repackaged",
              url=HF + "Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/text_encoders/"
                       "gemma_2_2b_fp16.safetensors",
              size="5.23 GB", sha256="29761442862f8d064d3f854bb6fabf4379dcff511a7f6ba9405a00bd0f7e2dbd"),
    ModelFile("dc-ae-1.5-f64c128", "vae", "the DC-AE-1.5 f64c128 your DC-Gen-SANA embedding was trained with "
              "(diffusers folder; the Res4K release's vae folder is one)", DCAE_15,
              get=_hf_folder(DCGEN_FLUX, "DC-Gen-FLUX.1-Krea-Dev-v1.0-Res4K/vae/*", "models/vae")
              + " && ln -s DC-Gen-FLUX.1-Krea-Dev-v1.0-Res4K/vae models/vae/dc-ae-1.5-f64c128"),
    ModelFile("dcgen-sana-4k-embedding.safetensors", "dcgen_embeddings", "DC-Gen-SANA 4K aligned embedding: not "
              "published; make it with python -m dcgen_core.train align / lora --name dcgen-sana-4k (docs/training.md, "
              "DC-Gen-SANA)", "https://github.com/dc-ai-projects/DC-Gen"),
    ModelFile("DC-Qwen-Image-Edit", "diffusion_models", "DC-Gen-Qwen-Image-Edit, the Hub repo as downloaded (its "
              "nested upload/DC-Qwen-Image-Edit/DC-Gen-Qwen-Image-Edit/ is read as it is)", DC_QWEN_EDIT,
              get=_DC_QWEN_GET),
    ModelFile("DC-Qwen-Image-Edit-vae", "vae", "its DC-AE f32c32 (the download's vae folder, linked)", DC_QWEN_EDIT,
              get=_DC_QWEN_GET + " && ln -s ../diffusion_models/DC-Qwen-Image-Edit/upload/DC-Qwen-Image-Edit/"
                                 "DC-Gen-Qwen-Image-Edit/vae models/vae/DC-Qwen-Image-Edit-vae"),
    ModelFile("qwen_2.5_vl_7b_fp8_scaled.safetensors", "text_encoders", "Qwen2.5-VL 7B, Qwen-Image's text encoder "
              "(ComfyUI's file)", QWEN_IMAGE_TEXT,
              url=QWEN_IMAGE_TEXT + "/resolve/main/split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
              size="9.38 GB", sha256="cb5636d852a0ea6a9075ab1bef496c0db7aef13c02350571e388aea959c5c0b4"),
    ModelFile("dc-ae-v-f32t4c32-1.0-bf16.pt", "vae", "DC-AE-V f32t4c32, DC-VideoGen's video autoencoder (a torch "
              "checkpoint, read with weights_only=True; python -m dcgen_core.convert writes the safetensors copy the "
              "loader prefers)", DC_VIDEOGEN,
              get="hf download nvidia/DC-VideoGen-Wan2.1-14B dc-ae-v-f32t4c32-1.0-bf16.pt --local-dir models/vae"),
    *(ModelFile(f"DC-VideoGen-Wan2.1-14B/transformer_{kind}", "diffusion_models", f"DC-Gen-Wan2.1-14B {what} "
                "transformer (diffusers folder, bf16; its scheduler/ beside it)", DC_VIDEOGEN,
                get=f'hf download nvidia/DC-VideoGen-Wan2.1-14B --include "transformer_{kind}/*" "scheduler/*" '
                    "--local-dir models/diffusion_models/DC-VideoGen-Wan2.1-14B")
      for kind, what in (("t2v", "text-to-video"), ("i2v", "image-to-video"))),
    ModelFile("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "text_encoders", "UMT5-XXL, Wan2.1's text encoder "
              "(ComfyUI's file)", WAN_COMFY,
              url=WAN_COMFY + "/resolve/main/split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
    ModelFile("clip_vision_h.safetensors", "clip_vision", "CLIP ViT-H/14, Wan2.1 i2v's image encoder (ComfyUI's "
              "file)", WAN_COMFY, url=WAN_COMFY + "/resolve/main/split_files/clip_vision/clip_vision_h.safetensors"),
    ModelFile("dcgen-sana-4k-lora.safetensors", "loras", "DC-Gen-SANA 4K LoRA: not published; make it with python -m "
              "dcgen_core.train lora --name dcgen-sana-4k (docs/training.md, DC-Gen-SANA)",
              "https://github.com/dc-ai-projects/DC-Gen"),
]

#: README quick-start jobs: (anchor id, title, workflow files) -- the table of a job lists the files its workflows name
JOBS = [
    ("1k", "1K image (DC-Gen-FLUX, 1024x1024)", ["dcgen-flux-1k-t2i.json"]),
    ("4k", "4K image (DC-Gen-FLUX, 4096x4096)", ["dcgen-flux-4k-t2i.json"]),
    ("4bit", "4K in 4 bits (NVFP4)", ["dcgen-flux-4k-nvfp4.json"]),
    ("sana", "SANA and DC-Gen-SANA", ["sana-1k-t2i.json", "dcgen-sana-4k-t2i.json"]),
    ("qwen-edit", "Image editing (DC-Gen-Qwen-Image-Edit)", ["dcgen-qwen-image-edit.json"]),
    ("video", "Video (DC-Gen-Wan2.1-14B on DC-AE-V, 720p)", ["dcgen-wan-t2v.json", "dcgen-wan-i2v.json"]),
    ("chains", "Chains: from a base FLUX, 1K draft + 4K refine, ControlNet",
     ["dcgen-flux-1k-from-base-lora.json", "dcgen-flux-1k-upscale-4k-refine.json", "dcgen-flux-controlnet-chain.json"]),
]

_BY_KEY = {(m.folder, m.name): m for m in MODELS}


def workflow_file_names(workflow: dict, file_widgets: dict) -> list[tuple[str, str]]:
    """(folder, name) of the table's files a UI workflow's loader widgets name, in node order, each once (no ComfyUI
    needed: a widget value counts when the table lists it for a folder that node type loads from; ``file_widgets``
    is tools/workflows.py's FILE_WIDGETS)."""
    out = []
    for n in workflow["nodes"]:
        folders = [kind for (cls, _), kind in file_widgets.items() if cls == n["type"]]
        for v in n.get("widgets_values") or []:
            for kind in folders:
                m = lookup(kind, v) if isinstance(v, str) else None
                if m is not None and (m.folder, m.name) not in out:
                    out.append((m.folder, m.name))
    return out


def job_files(job: str, read_workflow, file_widgets: dict) -> list[ModelFile]:
    """The table's files the workflows of a README job name, each once, in workflow order."""
    names = []
    for wf_name in next(files for j, _, files in JOBS if j == job):
        for key in workflow_file_names(read_workflow(wf_name), file_widgets):
            if key not in names:
                names.append(key)
    return [_BY_KEY[k] for k in names]


def lookup(folder: str, name: str) -> ModelFile | None:
    """The table's entry for a file a loader widget names (embeddings may also sit in loras)."""
    found = _BY_KEY.get((folder, name))
    if found is None and folder in ("loras", "dcgen_embeddings"):
        found = _BY_KEY.get(("dcgen_embeddings" if folder == "loras" else "loras", name))
    return found


def properties_models(files: list[tuple[str, str]]) -> list[dict]:
    """A node's ``properties.models`` (the form of the official templates) for the (folder, name) it names:
    only single files with a direct URL (the editor's download button fetches one file)."""
    out = []
    for folder, name in files:
        m = lookup(folder, name)
        if m is not None and m.url:
            out.append({"name": m.name, "url": m.url, "directory": m.folder})
    return out


def _link(target: str, text: str) -> str:
    return f"[{text}]({target})"


def readme_table(files: list[ModelFile]) -> str:
    """The README table of a job: file, where to get it, size, folder."""
    rows = ["| file | get it | size | folder |", "|---|---|---|---|"]
    for m in files:
        if m.url:
            get = f"{_link(m.url, 'download')} ({_link(m.page, 'page')})"
        elif m.made:
            get = f"make it: `{m.get}` ({_link(m.page, 'how')})"
        elif m.get:
            get = f"`{m.get}` ({_link(m.page, 'page')})"
        else:
            get = _link(m.page, "publisher's page")
        rows.append(f"| `{m.name}` | {get} | {m.size or 'unknown'} | `models/{m.folder}` |")
    return "\n".join(rows)
