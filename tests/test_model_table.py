"""One table of model files (dcgen_core/tools/models.py) behind the workflows' properties.models, the doctor and the
README; node help pages, output tooltips, short descriptions and display names users can find."""

import glob
import json
import os
import re

from dcgen_core.tools import models
from dcgen_core.tools.workflows import FILE_WIDGETS, _published, prompt_files, workflow_to_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _note(wf):
    return "\n".join(str(n["widgets_values"][0]) for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote"))


def test_every_workflow_model_widget_is_in_the_table_and_offered_for_download(comfyui):
    """Every file a shipped workflow's loader widgets name (read through the node definitions, as ComfyUI does) is in
    the table; each published single file is in that node's properties.models (name, url, directory, as the official
    templates write them); each file the user makes is named in the note with the command that makes it."""
    classes = comfyui.runtime.node_classes
    assert WORKFLOWS
    for path in WORKFLOWS:
        wf = _load(path)
        name = os.path.basename(path)
        prompt = workflow_to_prompt(wf, classes)
        files = prompt_files(prompt)
        assert files, name
        nodes = {str(n["id"]): n for n in wf["nodes"]}
        for kind, file, node_id, cls in files:
            entry = models.lookup(kind, file)
            assert entry is not None, f"{name}: {kind}/{file} (node {node_id} {cls}) is not in dcgen_core/tools/models.py"
            assert "not known" not in _published(file, kind)
            offered = nodes[node_id].get("properties", {}).get("models", [])
            if entry.url:
                assert {"name": file, "url": entry.url, "directory": entry.folder} in offered, (name, file)
                assert entry.url.startswith("https://huggingface.co/") and entry.url.endswith(".safetensors")
            else:
                assert all(m["name"] != file for m in offered), (name, file)
            if entry.made:
                assert entry.get in _note(wf), f"{name}: the note should give the command that makes {file}"
            if not entry.url:  # the editor cannot offer it: the note says how to get it
                assert file in _note(wf) and all(p in _note(wf) for p in entry.get.split(" && ")), (name, file)
        # nothing offered that the workflow does not name
        named = {(k, f) for k, f, _, _ in files}
        for n in wf["nodes"]:
            for m in n.get("properties", {}).get("models", []):
                assert (m["directory"], m["name"]) in named, (name, m)


def test_table_entries_are_complete_and_used():
    used = set()
    for path in WORKFLOWS:
        used.update(models.workflow_file_names(_load(path), FILE_WIDGETS))
    for m in models.MODELS:
        assert (m.folder, m.name) in used, f"{m.name}: in the table but no shipped workflow names it"
        assert m.page and m.what and m.folder
        assert m.url or m.get or m.page.startswith("https://"), m.name
        assert not m.size or re.fullmatch(r"[0-9.]+ [KMG]B", m.size), m.size
        assert not m.sha256 or re.fullmatch(r"[0-9a-f]{64}", m.sha256), m.sha256
    assert len({(m.folder, m.name) for m in models.MODELS}) == len(models.MODELS)
    # the doctor's pointers (the table's pages, the name patterns' sources) name files that exist
    from dcgen_core.tools.workflows import PUBLISHED

    pointers = [m.page for m in models.MODELS] + [m.get for m in models.MODELS] + [src for _, src in PUBLISHED]
    for ref in re.findall(r"(?<![\w/.])((?:docs/[\w.-]+\.md)|README\.md)", " ".join(pointers)):
        assert os.path.isfile(os.path.join(ROOT, ref)), ref
    assert not re.search(r"README, ", " ".join(pointers)), "point at a file (docs/<page>.md), not a README section name"
    in_jobs = {w for _, _, files in models.JOBS for w in files}
    assert in_jobs == {os.path.basename(p) for p in WORKFLOWS}, "each workflow belongs to one README quick-start job"


def test_readme_model_tables_come_from_the_table():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for job, _, _ in models.JOBS:
        block = readme.split(f"<!-- models:{job} -->", 1)[1].split(f"<!-- /models:{job} -->", 1)[0]
        files = models.job_files(job, lambda n: _load(os.path.join(ROOT, "workflows", n)), FILE_WIDGETS)
        assert block.strip() == models.readme_table(files), f"README model table '{job}': run scripts/layout_workflows.py"
        for m in files:
            assert f"`{m.name}`" in block and f"`models/{m.folder}`" in block


def test_help_page_output_tooltips_description_and_name_of_every_node(comfyui):
    pack = comfyui.pack
    assert pack.WEB_DIRECTORY == "./web"
    shown = {}
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        page = os.path.join(ROOT, "web", "docs", f"{node_id}.md")
        assert os.path.isfile(page), f"no help page web/docs/{node_id}.md"
        with open(page, encoding="utf-8") as f:
            text = f.read()
        display = pack.NODE_DISPLAY_NAME_MAPPINGS[node_id]
        assert text.startswith(f"# {display}\n"), node_id
        for heading in ("## Where it sits", "## Inputs", "## Outputs", "## Errors and fixes"):
            assert heading in text, (node_id, heading)
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name in spec.get(section, {}):
                assert f"| `{name}`" in text, (node_id, name)
        tips = getattr(cls, "OUTPUT_TOOLTIPS", ())
        assert len(tips) == len(cls.RETURN_TYPES) and all(tips), f"{node_id}: a tooltip for every output"
        for tip in tips:
            assert tip.replace("|", "\\|") in text, (node_id, tip)
        sentences = re.findall(r"[.!?](?:\s|$)", cls.DESCRIPTION.replace("e.g.", "eg"))
        assert 1 <= len(sentences) <= 3 and len(cls.DESCRIPTION) <= 300, f"{node_id}: description of 1-2 sentences"
        # one scheme: "DC-Gen <what it does>", short enough for the node library, distinct in what it shows
        assert display.startswith("DC-Gen ") and len(display) <= 20, display
        assert display not in shown, display
        shown[display] = node_id
        aliases = getattr(cls, "SEARCH_ALIASES", [])
        assert "dcgen" in aliases, node_id

