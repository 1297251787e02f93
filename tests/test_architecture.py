"""The pack's layout, as ARCHITECTURE.md states it: layers, one-way imports, no cycles, no oversized module.

Reads the source only (``ast``; nothing is imported), counting every import: module-level, function-level and
relative. Layers, lowest first (a module may import its own layer and the layers below, except where noted):

* ``shared``: ``dcgen_core/shared/`` (DC-AE latent space, checkpoints, LoRA files, aligned embeddings, schedules,
  ``dcae/``, the 4-bit formats in ``quant/``); imports nothing else of the pack.
* ``family``: one package per model family, ``dcgen_core/<family>/`` (a package with an ``architecture.py``); never
  imports another family.
* ``registry``: ``dcgen_core/architectures.py``, which lists the families.
* ``tools``: ``dcgen_core/tools/`` (command-line tools and their library code, post-training).
* ``entry``: ``dcgen_core/__init__.py`` and the thin ``python -m dcgen_core.<tool>`` entry points; import tools only,
  and nothing imports them.
* ``nodes``: ``nodes/`` and the pack's ``__init__.py``; may import shared, families and the registry (not tools).
"""

from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Longest a module of the pack may be (physical lines). Split by concern, not by size alone.
MAX_LINES = 500
#: ``python -m dcgen_core.<name>`` entry points (README); each is a thin module importing its tool.
ENTRY_POINTS = ("quantize", "extract", "train", "doctor", "headless", "convert")
#: What a model family package holds besides its own extras (ARCHITECTURE.md, "Adding a model family").
FAMILY_MODULES = ("architecture", "keys", "comfy_model", "dcgen")
ALLOWED = {
    "shared": {"shared"},
    "family": {"shared", "family"},
    "registry": {"shared", "family"},
    "tools": {"shared", "family", "registry", "tools"},
    "entry": {"tools"},
    "nodes": {"shared", "family", "registry", "nodes"},
}


def _pack_files():
    """{module name: path} of every module of the pack ("" is the pack's own ``__init__``)."""
    out = {"": os.path.join(REPO, "__init__.py")}
    for top in ("dcgen_core", "nodes"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, top)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            for f in sorted(filenames):
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), REPO)[: -len(".py")].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(dirpath, f)
    return out


FILES = _pack_files()
PACKAGES = {m for m, p in FILES.items() if os.path.basename(p) == "__init__.py"}
FAMILIES = sorted(m.split(".")[1] for m in FILES
                  if m.count(".") == 2 and m.startswith("dcgen_core.") and m.endswith(".architecture")
                  and f"dcgen_core.{m.split('.')[1]}" in PACKAGES)


def _parse(module):
    with open(FILES[module], encoding="utf-8") as f:
        text = f.read()
    return text, ast.parse(text, FILES[module])


def _join(*parts):
    return ".".join(p for p in parts if p)


def imports_of(module):
    """[(line, imported pack module or unresolved dotted name, resolved, absolute)] of every import in ``module``."""
    _, tree = _parse(module)
    package = module if module in PACKAGES else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "dcgen_core":  # absolute "nodes" is ComfyUI's nodes.py
                    out.append((node.lineno, alias.name, alias.name in FILES, True))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                if node.level - 1 > len(base):
                    out.append((node.lineno, "." * node.level + (node.module or ""), False, False))
                    continue
                base = base[: len(base) - (node.level - 1)]
                target, absolute = _join(".".join(base), node.module or ""), False
            else:
                target, absolute = node.module or "", True
                if target.split(".")[0] != "dcgen_core":
                    continue
            for alias in node.names:
                sub = _join(target, alias.name)
                if sub in FILES:
                    out.append((node.lineno, sub, True, absolute))
                else:
                    out.append((node.lineno, target, target in FILES, absolute))
    return out


def layer_of(module):
    parts = module.split(".")
    if module == "" or parts[0] == "nodes":
        return "nodes"
    if module == "dcgen_core" or (len(parts) == 2 and parts[1] in ENTRY_POINTS):
        return "entry"
    if parts[1] == "shared":
        return "shared"
    if parts[1] == "tools":
        return "tools"
    if module == "dcgen_core.architectures":
        return "registry"
    if parts[1] in FAMILIES:
        return "family"
    return None


def graph():
    return {m: sorted({t for _, t, ok, _ in imports_of(m) if ok and t != m}) for m in FILES}


def _cycles(g):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_checker_reads_the_pack():
    assert "dcgen_core" in FILES and "nodes" in FILES and len(FILES) > 20
    assert FAMILIES, "no model family package (dcgen_core/<family>/architecture.py) found"


def test_every_module_has_a_layer():
    lost = sorted(m for m in FILES if layer_of(m) is None)
    assert not lost, (f"modules outside every layer (shared/, a family package, tools/, the registry, an entry "
                      f"point {ENTRY_POINTS}; see ARCHITECTURE.md): {lost}")


def test_pack_imports_resolve_and_are_relative():
    """ComfyUI loads the pack under another name (comfyui_dc_gen), so its modules import each other relatively."""
    bad = [f"{FILES[m]}:{line}: {target}" + (" (absolute)" if absolute else " (no such module)")
           for m in FILES for line, target, ok, absolute in imports_of(m) if absolute or not ok]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    cycles = _cycles(graph())
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_imports_go_one_way():
    """nodes -> registry / families / tools -> shared -> ComfyUI; families never import each other."""
    bad = []
    for m, targets in graph().items():
        src = layer_of(m)
        for t in targets:
            dst = layer_of(t)
            if src is None or dst is None:
                continue  # reported by test_every_module_has_a_layer
            if dst not in ALLOWED[src]:
                bad.append(f"{m} ({src}) imports {t} ({dst})")
            elif src == dst == "family" and m.split(".")[1] != t.split(".")[1]:
                bad.append(f"{m} imports {t}: a family never imports another family")
            elif dst == "entry":
                bad.append(f"{m} imports the entry point {t}: import the tool instead")
    assert not bad, "\n".join(bad)


def test_every_family_has_the_same_shape():
    registry = set(graph().get("dcgen_core.architectures", ()))
    for family in FAMILIES:
        missing = [name for name in FAMILY_MODULES if f"dcgen_core.{family}.{name}" not in FILES]
        assert not missing, f"dcgen_core/{family}/ lacks {missing} (see ARCHITECTURE.md)"
        _, tree = _parse(f"dcgen_core.{family}.architecture")
        names = {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                 for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        assert "ARCHITECTURE" in names, f"dcgen_core/{family}/architecture.py defines no ARCHITECTURE"
        assert f"dcgen_core.{family}.architecture" in registry, \
            f"dcgen_core/architectures.py does not register the family {family}"


def test_no_module_over_the_limit():
    big = []
    for module in sorted(FILES):
        lines = len(_parse(module)[0].splitlines())
        if lines > MAX_LINES:
            big.append(f"{FILES[module]}: {lines} lines")
    assert not big, f"modules over {MAX_LINES} lines (split them by concern):\n" + "\n".join(big)
