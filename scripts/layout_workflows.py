"""Lay out the shipped workflows and draw their thumbnails.

    python scripts/layout_workflows.py [--check]

For each workflow in workflows/: nodes go into labelled groups, one per stage, left to right
(columns of nodes inside a group), sized for their slots and widgets so that none overlaps
another; the explanatory note sits at the top left, inside the view the editor opens with;
each workflow gets its own id; each loader's `properties.models` (the editor's missing-models
dialog and download buttons) comes from the model table in dcgen_core/tools/models.py. Then `<workflow>.jpg` is drawn beside it: a diagram of the
stages, nodes and links (the template browser shows it on the workflow's card). Widget values
and links are kept as they are. `--check` exits 1 when a file would change.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(ROOT, "workflows")
sys.path.insert(0, ROOT)
from dcgen_core.tools.models import JOBS, job_files, lookup, properties_models, readme_table, workflow_file_names  # noqa: E402 (torch-free)
from dcgen_core.tools.workflows import FILE_WIDGETS  # noqa: E402

# stage title -> columns of node ids, left to right; stages are laid left to right
STAGES = {
    "dcgen-flux-1k-t2i.json": [
        ("Load DC-Gen 1K + DC-AE", [[2, 3]]), ("Prompt", [[4, 5], [6, 7]]), ("Sample 1024x1024", [[8, 9]]),
        ("Decode and save", [[10], [11]])],
    "dcgen-flux-1k-from-base-lora.json": [
        ("FLUX.1-Krea + aligned embedding + DC-Gen LoRA", [[2, 3], [4, 5]]), ("Prompt", [[6, 7], [8, 9]]),
        ("Sample 1024x1024", [[10, 11]]), ("Decode and save", [[12], [13]])],
    "dcgen-flux-4k-t2i.json": [
        ("Load DC-Gen 4K + DC-AE-1.5", [[2, 3]]), ("Prompt", [[4, 5]]), ("Sample 4096x4096", [[6]]),
        ("Save", [[7]])],
    "dcgen-flux-4k-nvfp4.json": [
        ("Load DC-Gen 4K (NVFP4) + DC-AE-1.5", [[2, 3]]), ("Prompt", [[4, 5]]), ("Sample 4096x4096", [[6]]),
        ("Save", [[7]])],
    "sana-1k-t2i.json": [
        ("Load SANA + DC-AE + Gemma-2", [[2, 3], [4]]), ("Prompt", [[5, 6]]),
        ("Sample: DPM-Solver++ flow, cfg 4.5", [[7, 8], [9, 10], [11, 12]]), ("Decode and save", [[13], [14]])],
    "dcgen-sana-4k-t2i.json": [
        ("SANA + DC-Gen embedding + LoRA", [[2, 3], [4, 5]]), ("Prompt", [[6], [7, 8]]),
        ("Sample 4096x4096", [[9]]), ("Save", [[10]])],
    "dcgen-flux-1k-upscale-4k-refine.json": [
        ("Prompt", [[4, 5]]), ("1K draft", [[2, 3], [6]]), ("Upscale", [[7, 8], [9]]),
        ("4K refine (img2img)", [[10, 11], [12], [13]]), ("Save", [[14]])],
    "dcgen-qwen-image-edit.json": [
        ("Load DC-Gen-Qwen-Image-Edit + DC-AE + Qwen2.5-VL", [[2, 3], [4]]), ("Image and instruction", [[5], [6]]),
        ("Sample: 30 steps, true CFG 3.5", [[7]]), ("Decode and save", [[8], [9]])],
    "dcgen-wan-t2v.json": [
        ("Load DC-Gen-Wan t2v + DC-AE-V + UMT5", [[2, 3], [4]]), ("Prompt + the authors' negative", [[5, 6]]),
        ("Sample 704x1280 x 81: UniPC, 20 steps, CFG 5", [[7, 8], [9, 10], [11, 12]]),
        ("Decode and save WEBM", [[13], [14]])],
    "dcgen-wan-i2v.json": [
        ("Load DC-Gen-Wan i2v + DC-AE-V + UMT5", [[2, 3], [4]]), ("Start image + CLIP vision", [[7], [8, 9]]),
        ("Prompt + the authors' negative", [[5, 6]]), ("Image-to-video condition", [[10]]),
        ("Sample: UniPC, 20 steps, CFG 5", [[11, 12], [13, 14], [15]]), ("Decode and save WEBM", [[16], [17]])],
    "dcgen-flux-controlnet-chain.json": [
        ("Prompt", [[4, 5]]), ("DC-Gen 1K draft", [[2, 3], [6]]), ("ControlNet hint", [[7, 8, 9], [10, 11, 12]]),
        ("FLUX.1 + ControlNet", [[13, 14], [15]]), ("Decode and save", [[16], [17]])],
}
TITLES = {  # node titles where the type alone does not say the node's role
    "dcgen-flux-1k-upscale-4k-refine.json": {6: "DC-Gen Sampler: 1K draft", 13: "DC-Gen Sampler: 4K refine",
                                             3: "DC-Gen 1K model", 11: "DC-Gen 4K model"},
    "dcgen-flux-controlnet-chain.json": {6: "DC-Gen Sampler: 1K draft", 15: "KSampler: FLUX.1 + ControlNet"},
    "sana-1k-t2i.json": {5: "CLIP Text Encode (positive)", 6: "CLIP Text Encode (negative)"},
    "dcgen-sana-4k-t2i.json": {7: "CLIP Text Encode (positive)", 8: "CLIP Text Encode (negative)"},
    "dcgen-wan-t2v.json": {5: "CLIP Text Encode (positive)", 6: "CLIP Text Encode (negative)"},
    "dcgen-wan-i2v.json": {5: "CLIP Text Encode (positive)", 6: "CLIP Text Encode (negative)"},
}
GROUP_COLORS = ["#3f789e", "#8a6d3b", "#3f7f5f", "#7e5a9b", "#a1583f"]

TITLE_H, SLOT_H, WIDGET_H, PAD = 36, 24, 30, 16
TITLE_BAR = 30  # the editor draws a node's title bar above its pos
GAP_X, GAP_Y, GROUP_PAD, GROUP_TITLE, STAGE_GAP = 40, 30 + TITLE_BAR, 20, 50 + TITLE_BAR, 60
NOTE_W = 640
# the editor's initial view: screen = (canvas + offset) * scale; the offset clears the side bar and the floating
# toolbar that the editor draws over the canvas (title bars sit 30 px above a node's pos)
VIEW = {"scale": 0.65, "offset": [120, 190]}

MULTILINE = {"CLIPTextEncode": 140, "Note": 0, "MarkdownNote": 0}
MIN_SIZE = {"SaveImage": (420, 440), "PreviewImage": (420, 440)}


def node_size(node: dict) -> list[int]:
    if node["type"] in ("Note", "MarkdownNote"):
        lines = sum(max(1, len(line) // 80 + 1) for line in str(node["widgets_values"][0]).splitlines())
        return [NOTE_W, 40 + 22 * lines]
    slots = max(len(node.get("inputs", [])), len(node.get("outputs", [])))
    widgets = len(node.get("widgets_values") or [])
    h = TITLE_H + SLOT_H * slots + WIDGET_H * widgets + PAD + MULTILINE.get(node["type"], 0)
    w = 360 if widgets or slots > 2 else 300
    mw, mh = MIN_SIZE.get(node["type"], (0, 0))
    return [max(w, mw), max(h, mh)]


def set_model_properties(wf: dict) -> None:
    """Each loader's ``properties.models`` from the pack's model table (dcgen_core/tools/models.py): name, direct URL
    and folder of every published single file it names, the form the editor's missing-models dialog reads."""
    for n in wf["nodes"]:
        folders = [kind for (cls, _), kind in FILE_WIDGETS.items() if cls == n["type"]]
        files = [(kind, v) for v in n.get("widgets_values") or [] if isinstance(v, str) for kind in folders]
        models = properties_models(files)
        props = n.setdefault("properties", {})
        if models:
            props["models"] = models
        else:
            props.pop("models", None)


NOTE_FILES = "Get the files the editor cannot download (in ComfyUI's folder; python -m dcgen_core.doctor checks them):"


def set_note_files(wf: dict) -> None:
    """The note ends with how to get each file the editor cannot offer for download (a diffusers folder, a file the
    user makes, an unpublished one), from the model table, unless the note's own text already gives that command."""
    note = next((n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")), None)
    if note is None:
        return
    base = str(note["widgets_values"][0]).split("\n" + NOTE_FILES)[0]
    lines = []
    for folder, name in workflow_file_names(wf, FILE_WIDGETS):
        m = lookup(folder, name)
        if m.url or (m.get and all(part in base for part in m.get.split(" && "))):
            continue
        how = m.get if m.get else f"{m.what} ({m.page})"
        lines.append(f"models/{m.folder}/{m.name}: {how}")
    note["widgets_values"][0] = base + ("\n" + NOTE_FILES + "\n" + "\n".join(lines) if lines else "")


def layout(name: str, wf: dict) -> dict:
    set_model_properties(wf)
    set_note_files(wf)
    nodes = {n["id"]: n for n in wf["nodes"]}
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    placed = {n["id"] for n in notes}
    for n in notes:
        n["pos"], n["size"] = [0, 0], node_size(n)
    top = max((n["size"][1] for n in notes), default=0) + STAGE_GAP
    x, groups = 0, []
    for i, (title, columns) in enumerate(STAGES[name]):
        gx, col_x, bottom = x, x + GROUP_PAD, top
        for column in columns:
            y, width = top + GROUP_TITLE, 0
            for node_id in column:
                n = nodes[node_id]
                n["size"] = node_size(n)
                n["pos"] = [col_x, y]
                y += n["size"][1] + GAP_Y
                width = max(width, n["size"][0])
                placed.add(node_id)
            bottom = max(bottom, y - GAP_Y)
            col_x += width + GAP_X
        right = col_x - GAP_X + GROUP_PAD
        groups.append({"id": i + 1, "title": title, "bounding": [gx, top, right - gx, bottom - top + GROUP_PAD],
                       "color": GROUP_COLORS[i % len(GROUP_COLORS)], "font_size": 24, "flags": {}})
        x = right + STAGE_GAP
    missing = sorted(set(nodes) - placed)
    if missing:
        raise SystemExit(f"{name}: nodes {missing} are in no stage of STAGES")
    for node_id, title in TITLES.get(name, {}).items():
        nodes[node_id]["title"] = title
    wf["groups"] = groups
    wf["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-dc-gen/workflows/{name}"))
    wf.setdefault("extra", {})["ds"] = {"scale": VIEW["scale"], "offset": list(VIEW["offset"])}
    return wf


def display_name(node_type: str) -> str:
    """What the editor calls a node: the pack's display names, else the class name split into words."""
    ours = {}
    for name in os.listdir(os.path.join(ROOT, "nodes")):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "nodes", name), encoding="utf-8") as f:
                ours.update(re.findall(r'"(DCGen\w+)": \(\w+, "([^"]+)"\)', f.read()))
    if node_type in ours:
        return ours[node_type]
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", node_type)


def _wrap(draw, text: str, font, width: float) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def draw_thumbnail(wf: dict, path: str, size=(768, 432)):
    """What the workflow does, at card size: its headline, then its stages left to right (the groups of the
    layout), each with the nodes in it, and arrows between stages."""
    from PIL import Image, ImageDraw, ImageFont

    def font(px):
        try:
            return ImageFont.load_default(size=px)
        except TypeError:  # Pillow < 10.1
            return ImageFont.load_default()

    head, title_font, node_font = font(24), font(17), font(14)
    img = Image.new("RGB", size, "#1e1e1e")
    d = ImageDraw.Draw(img)
    note = next((n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")), None)
    headline = str(note["widgets_values"][0]).splitlines()[0] if note else ""
    y = 14
    for line in _wrap(d, headline, head, size[0] - 28)[:2]:
        d.text((14, y), line, fill="#f2f2f2", font=head)
        y += 30
    groups = sorted(wf["groups"], key=lambda g: g["bounding"][0])
    nodes = [n for n in wf["nodes"] if n["type"] not in ("Note", "MarkdownNote")]
    gap, margin = 26, 14
    w = (size[0] - 2 * margin - gap * (len(groups) - 1)) / len(groups)
    top, bottom = y + 16, size[1] - margin
    for i, g in enumerate(groups):
        x = margin + i * (w + gap)
        d.rounded_rectangle([x, top, x + w, bottom], radius=10, fill=g["color"])
        ty = top + 8
        for line in _wrap(d, g["title"], title_font, w - 14):
            d.text((x + 7, ty), line, fill="white", font=title_font)
            ty += 21
        gx, gy, gw, gh = g["bounding"]
        inside = sorted((n for n in nodes if gx <= n["pos"][0] < gx + gw and gy <= n["pos"][1] < gy + gh),
                        key=lambda n: (n["pos"][0], n["pos"][1]))
        ty += 6
        for n in inside:
            label = n.get("title") or display_name(n["type"])
            lines = _wrap(d, label, node_font, w - 26)
            h = 18 * len(lines) + 8
            if ty + h > bottom - 6:
                break
            d.rounded_rectangle([x + 7, ty, x + w - 7, ty + h], radius=5, fill="#2b2b2b")
            for j, line in enumerate(lines):
                d.text((x + 13, ty + 4 + 18 * j), line, fill="#e8e8e8", font=node_font)
            ty += h + 6
        if i:
            ay = (top + bottom) / 2
            d.line([(x - gap + 3, ay), (x - 4, ay)], fill="#dddddd", width=3)
            d.polygon([(x - 3, ay), (x - 11, ay - 6), (x - 11, ay + 6)], fill="#dddddd")
    img.save(path, "JPEG", quality=90)


README = os.path.join(ROOT, "README.md")


def _read_workflow(name: str) -> dict:
    with open(os.path.join(WORKFLOWS, name), encoding="utf-8") as f:
        return json.load(f)


def readme_with_model_tables(text: str) -> str:
    """README.md with each job's model table (between <!-- models:JOB --> and <!-- /models:JOB -->) from the table."""
    for job, _, _ in JOBS:
        start, end = f"<!-- models:{job} -->", f"<!-- /models:{job} -->"
        if start not in text or end not in text:
            raise SystemExit(f"README.md: no '{start}' ... '{end}' block for the quick start of job '{job}'")
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        files = job_files(job, _read_workflow, FILE_WIDGETS)
        text = f"{head}{start}\n{readme_table(files)}\n{end}{tail}"
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="report files that would change, write nothing")
    a = ap.parse_args(argv)
    stale = []
    for name in sorted(STAGES):
        path = os.path.join(WORKFLOWS, name)
        with open(path, encoding="utf-8") as f:
            original = f.read()
        text = json.dumps(layout(name, json.loads(original)), indent=1) + "\n"
        thumb = path[: -len(".json")] + ".jpg"
        if text != original or not os.path.isfile(thumb):
            stale.append(name)
        if not a.check:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            draw_thumbnail(json.loads(text), thumb)
    with open(README, encoding="utf-8") as f:
        readme = f.read()
    tables = readme_with_model_tables(readme)
    if tables != readme:
        stale.append("README.md (model tables)")
        if not a.check:
            with open(README, "w", encoding="utf-8") as f:
                f.write(tables)
    if a.check and stale:
        print("out of date:", ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
