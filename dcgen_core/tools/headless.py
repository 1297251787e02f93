"""Run ComfyUI workflows headless, in-process, through ComfyUI's own executor.

Used by the test-suite, the benchmarks and ``python -m dcgen_core.headless``.
ComfyUI itself is found through ``COMFYUI_PATH`` (default ``~/ComfyUI``); it is
imported only when :func:`boot` is called.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import sys
import uuid

from ..shared.comfy_compat import prompt_executor
from .workflows import workflow_to_prompt


DEFAULT_COMFYUI_PATH = os.path.expanduser("~/ComfyUI")
PACK_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_MODULE = "comfyui_dc_gen"


def enclosing_comfyui(pack_dir: str = PACK_DIR) -> str | None:
    """The ComfyUI this pack is installed in (``<ComfyUI>/custom_nodes/<pack>``), if it is."""
    parent = os.path.dirname(os.path.abspath(pack_dir))
    if os.path.basename(parent) == "custom_nodes" and comfyui_available(os.path.dirname(parent)):
        return os.path.dirname(parent)
    return None


def comfyui_path() -> str:
    """``$COMFYUI_PATH``, else the ComfyUI whose custom_nodes holds this pack, else ``~/ComfyUI``."""
    return os.environ.get("COMFYUI_PATH") or enclosing_comfyui() or DEFAULT_COMFYUI_PATH


def comfyui_paths() -> list[str]:
    """Every ComfyUI checkout to test against: ``$COMFYUI_PATHS`` (separated by ``os.pathsep``) when set, else
    ``$COMFYUI_PATH`` (default ``~/ComfyUI``) followed by the ``~/ComfyUI-*`` checkouts beside it (e.g.
    ``~/ComfyUI-0.33``). Only folders that hold a ComfyUI are returned."""
    listed = os.environ.get("COMFYUI_PATHS")
    if listed:
        candidates = [p for p in listed.split(os.pathsep) if p]
    else:
        home = os.path.dirname(DEFAULT_COMFYUI_PATH)
        others = sorted(os.path.join(home, d) for d in os.listdir(home) if d.startswith("ComfyUI-")) \
            if os.path.isdir(home) else []
        candidates = [comfyui_path(), *others]
    seen, out = set(), []
    for p in candidates:
        real = os.path.realpath(os.path.expanduser(p))
        if real not in seen and comfyui_available(real):
            seen.add(real)
            out.append(os.path.expanduser(p))
    return out


def comfyui_version_at(path: str) -> str:
    """The version a ComfyUI checkout declares (``comfyui_version.py``), without importing it."""
    try:
        with open(os.path.join(path, "comfyui_version.py"), encoding="utf-8") as f:
            for line in f:
                if line.startswith("__version__"):
                    return line.split("=", 1)[1].strip().strip("\"'")
    except OSError:
        pass
    return "unknown"


def comfyui_available(path: str | None = None) -> bool:
    path = path or comfyui_path()
    return os.path.isfile(os.path.join(path, "nodes.py")) and os.path.isdir(os.path.join(path, "comfy"))


class PromptRejected(RuntimeError):
    """ComfyUI's validation refused the prompt (missing models, unknown nodes, bad values)."""

    def __init__(self, message: str, error=None, node_errors=None):
        super().__init__(message)
        self.error, self.node_errors = error, node_errors or {}


class Interrupted(RuntimeError):
    """The prompt was cancelled (Ctrl-C in the headless runner, ``ComfyRuntime.interrupt``)."""


#: Called with (node_id, step, total) on every progress step; set by the headless runner to print progress.
progress_listeners: list = []


def _install_progress_hook():
    """ComfyUI's progress hook, as its server installs it: every progress step (sampler steps, DC-AE tiles) checks
    for an interrupt, so Cancel / Ctrl-C stops a long run between steps, and reports to ``progress_listeners``."""
    import comfy.model_management
    import comfy.utils

    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        def get_executing_context():
            return None

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        context = get_executing_context()
        if node_id is None and context is not None:
            node_id = context.node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        for listener in list(progress_listeners):
            listener(node_id, value, total)

    comfy.utils.set_progress_bar_global_hook(hook)


class _HeadlessServer:
    """The parts of PromptServer that the executor touches."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"node": node_id, "text": text}))


def _install_headless_server() -> _HeadlessServer:
    """``server.PromptServer.instance`` for built-in nodes that talk to the server (v0.33's node-replacement
    registry, progress texts) when no real server runs in this process."""
    headless = _HeadlessServer()
    try:
        import server
    except ImportError:
        return headless
    if getattr(server.PromptServer, "instance", None) is None:
        try:
            from app.node_replace_manager import NodeReplaceManager

            headless.node_replace_manager = NodeReplaceManager()
        except ImportError:  # v0.3.64 has no node replacements
            pass
        server.PromptServer.instance = headless
    return server.PromptServer.instance


class ComfyRuntime:
    def __init__(self, path: str, server):
        self.path = path
        import execution
        import nodes

        self.nodes = nodes
        self.execution = execution
        self.server = server
        self.executor = prompt_executor(execution, self.server)
        self.pack = sys.modules.get(PACK_MODULE)

    @property
    def node_classes(self) -> dict:
        return self.nodes.NODE_CLASS_MAPPINGS

    def register(self, mapping: dict):
        """Register extra node classes (tests use this for capture nodes)."""
        self.nodes.NODE_CLASS_MAPPINGS.update(mapping)

    def validate(self, prompt: dict):
        result = asyncio.run(self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        ok, error, outputs, node_errors = result[:4]
        if not ok:
            raise PromptRejected(f"ComfyUI rejected the prompt: {error}\n{json.dumps(node_errors, indent=1, default=str)}",
                                 error, node_errors)
        return outputs

    def interrupt(self):
        """Cancel the running prompt at its next progress step, as the server's Cancel button does."""
        self.nodes.interrupt_processing(True)

    def run(self, prompt: dict) -> dict:
        """Validate and execute an API-format prompt; returns the history outputs."""
        outputs = self.validate(prompt)
        self.server.messages.clear()
        self.nodes.interrupt_processing(False)
        self.executor.execute(prompt, str(uuid.uuid4()), {}, outputs)
        interrupted = [d for e, d in self.executor.status_messages if e == "execution_interrupted"]
        if interrupted:
            d = interrupted[0]
            raise Interrupted(f"interrupted in node {d.get('node_id')} ({d.get('node_type')}); "
                              f"{len(d.get('executed', []))} node(s) had finished.")
        if not self.executor.success:
            errors = [d for e, d in self.executor.status_messages if e == "execution_error"]
            if errors:
                err = errors[0]
                raise RuntimeError(
                    f"ComfyUI failed in node {err.get('node_id')} ({err.get('node_type')}): "
                    f"{err.get('exception_type')}: {err.get('exception_message')}\n"
                    + "".join(err.get("traceback", []))
                )
            raise RuntimeError(f"ComfyUI execution failed: {self.executor.status_messages}")
        return self.executor.history_result.get("outputs", {})


_runtime: ComfyRuntime | None = None


def boot(path: str | None = None, cpu: bool = True, output_dir: str | None = None,
         model_dirs: dict[str, list[str]] | None = None) -> ComfyRuntime:
    """Import ComfyUI from ``path``, load its built-in nodes and this pack (once per process)."""
    global _runtime
    path = path or comfyui_path()
    if _runtime is None:
        if not comfyui_available(path):
            raise RuntimeError(f"ComfyUI not found at {path} (set COMFYUI_PATH).")
        if path not in sys.path:
            sys.path.insert(0, path)
        import comfy.options

        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import args

        args.cpu = cpu
        if cpu:
            args.force_fp32 = True
        aimdo = _init_aimdo(args) if not cpu else None
        import comfy.utils  # noqa: F401  (sets up ComfyUI's torch defaults)
        try:  # before nodes.py puts comfy/ first on sys.path, where "utils" would be comfy/utils.py
            import utils.install_util  # noqa: F401
        except ImportError:
            pass
        import nodes

        if aimdo is not None:
            _enable_dynamic_vram(aimdo, args)
        server = _install_headless_server()
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        _load_pack(nodes, loop)
        _install_progress_hook()
        _runtime = ComfyRuntime(path, server)
    import folder_paths

    if output_dir:
        folder_paths.set_output_directory(output_dir)
    for kind, dirs in (model_dirs or {}).items():
        for d in dirs:
            folder_paths.add_model_folder_path(kind, d, is_default=True)
    return _runtime


MODEL_KINDS = ("diffusion_models", "vae", "loras", "dcgen_embeddings", "text_encoders", "clip", "upscale_models",
               "controlnet", "checkpoints")


def model_dirs_under(roots) -> dict[str, list[str]]:
    """``{kind: [root/kind, ...]}`` for model folders laid out like ComfyUI's ``models/``."""
    dirs: dict[str, list[str]] = {}
    for root in roots:
        for kind in MODEL_KINDS:
            if os.path.isdir(os.path.join(root, kind)):
                dirs.setdefault(kind, []).append(os.path.join(root, kind))
    return dirs


def _init_aimdo(args):
    """Dynamic VRAM, as ComfyUI's main.py sets it up (v0.12+, NVIDIA by default): comfy-aimdo is initialised before
    ComfyUI's model management. None where this ComfyUI or machine has no dynamic VRAM."""
    from comfy import cli_args

    enables = getattr(cli_args, "enables_dynamic_vram", None)
    if enables is None or not enables():
        return None
    try:
        import comfy_aimdo.control as aimdo
    except ImportError:
        return None
    for kwargs in ({"simple_vram_headroom": None, "nvml_pressure": True}, {"simple_vram_headroom": None}, {}):
        try:
            aimdo.init(**kwargs)
            return aimdo
        except TypeError:  # older comfy-aimdo protocols take fewer arguments
            continue
    return None


def _enable_dynamic_vram(aimdo, args) -> bool:
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    if not mm.is_nvidia():
        return False
    devices = mm.get_all_torch_devices()
    try:
        ok = aimdo.init_devices((d.index, int(getattr(args, "vram_headroom", 0) * 1024 ** 3)) for d in devices)
    except TypeError:
        ok = aimdo.init_devices(d.index for d in devices)
    if ok:
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    return bool(ok)


def _load_pack(nodes, loop):
    if PACK_MODULE in sys.modules:
        module = sys.modules[PACK_MODULE]
    else:
        spec = importlib.util.spec_from_file_location(
            PACK_MODULE, os.path.join(PACK_DIR, "__init__.py"), submodule_search_locations=[PACK_DIR]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE] = module
        spec.loader.exec_module(module)
    nodes.NODE_CLASS_MAPPINGS.update(module.NODE_CLASS_MAPPINGS)
    nodes.NODE_DISPLAY_NAME_MAPPINGS.update(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", {}))


def _with_overrides(prompt: dict, items: list[str]) -> dict:
    """``--set NODE.INPUT=JSON`` overrides applied to a copy of the prompt."""
    prompt = json.loads(json.dumps(prompt))
    for item in items:
        key, value = item.split("=", 1)
        node_id, name = key.split(".", 1)
        try:
            prompt[node_id]["inputs"][name] = json.loads(value)
        except json.JSONDecodeError:
            prompt[node_id]["inputs"][name] = value
    return prompt


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run a ComfyUI workflow (UI or API JSON) headless through ComfyUI's executor.")
    parser.add_argument("workflow")
    parser.add_argument("--comfyui", default=None, help="ComfyUI folder (default: $COMFYUI_PATH or ~/ComfyUI)")
    parser.add_argument("--gpu", action="store_true", help="use the GPU (default: --cpu)")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--model-dir", action="append", default=[], metavar="PATH",
                        help="extra model folder laid out like ComfyUI's models/ (diffusion_models/, vae/, loras/, ...)")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=JSON",
                        help="override an input, e.g. --set 3.steps=4 --set 9.unet_name='\"x.safetensors\"'")
    a = parser.parse_args(argv)
    runtime = boot(a.comfyui, cpu=not a.gpu, output_dir=a.output_dir, model_dirs=model_dirs_under(a.model_dir))
    with open(a.workflow, encoding="utf-8") as f:
        wf = json.load(f)
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)  # ComfyUI logs every validation error; the summary below replaces them
    try:
        prompt = _with_overrides(workflow_to_prompt(wf, runtime.node_classes) if "nodes" in wf else wf, a.set)
        runtime.validate(prompt)
    except (KeyError, PromptRejected) as e:
        root.setLevel(level)
        from .workflows import check_workflow

        lines, _ = check_workflow(wf, runtime.node_classes)
        reason = e.error.get("message", "") if isinstance(e, PromptRejected) and isinstance(e.error, dict) else ""
        print(f"{a.workflow}: ComfyUI cannot run this workflow here{': ' + reason if reason else ''}. "
              "What it needs:", file=sys.stderr)
        print("\n".join(lines) or "  (every model file and node type it names is present; "
              f"details: {e})", file=sys.stderr)
        print("python -m dcgen_core.doctor tells more about this install.", file=sys.stderr)
        return 1
    finally:
        root.setLevel(level)
    types = {k: v.get("class_type") for k, v in prompt.items()}

    def show_progress(node_id, step, total):
        print(f"  {types.get(str(node_id), '?')} #{node_id}: {step}/{total}", file=sys.stderr, flush=True)

    progress_listeners.append(show_progress)
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):  # first Ctrl-C cancels like the Cancel button; a second one kills
        print("interrupting at the next step (Ctrl-C again to kill)...", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, previous)
        runtime.interrupt()

    signal.signal(signal.SIGINT, on_sigint)
    try:
        outputs = runtime.run(prompt)
    except Interrupted as e:
        print(f"cancelled: {e}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
        progress_listeners.remove(show_progress)
    print(json.dumps(outputs, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
