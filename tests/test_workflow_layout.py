"""The shipped workflows as the editor opens them: no node hides another, the explanatory note is in the first
view, stages are labelled groups, each workflow has its own id and a thumbnail (no ComfyUI needed)."""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
# the canvas a 1280x720 editor window shows: right of the side bar, below the tab bar and floating toolbar
VISIBLE = (60, 90, 1280, 720)
TITLE_BAR = 30  # drawn above a node's pos


def _rect(n):
    """A node as drawn: its title bar sits above its pos."""
    return (n["pos"][0], n["pos"][1] - TITLE_BAR, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("path", ALL, ids=os.path.basename)
def test_no_overlaps_note_in_view_groups(path):
    with open(path, encoding="utf-8") as f:
        wf = json.load(f)
    nodes = wf["nodes"]
    rects = {n["id"]: _rect(n) for n in nodes}
    for a in nodes:
        for b in nodes:
            if a["id"] < b["id"]:
                assert not _overlap(rects[a["id"]], rects[b["id"]]), (a["type"], b["type"])
    groups = [g["bounding"] for g in wf["groups"]]
    assert groups and all(g["title"] for g in wf["groups"])
    for i, g in enumerate(groups):
        for h in groups[i + 1:]:
            assert not _overlap((g[0], g[1], g[0] + g[2], g[1] + g[3]), (h[0], h[1], h[0] + h[2], h[1] + h[3]))
    for n in nodes:  # every node but the note sits inside exactly one group, below its title
        if n["type"] in ("Note", "MarkdownNote"):
            continue
        r = rects[n["id"]]
        assert any(g[0] <= r[0] and g[1] + 40 <= r[1] and r[2] <= g[0] + g[2] and r[3] <= g[1] + g[3] for g in groups), \
            n["type"]
    for n in nodes:
        if n["type"] in ("Note", "MarkdownNote"):
            continue
        r = rects[n["id"]]
        inside = [g for g in groups if g[0] <= r[0] and g[1] <= r[1] and r[2] <= g[0] + g[2] and r[3] <= g[1] + g[3]]
        assert len(inside) == 1, n["type"]
    ds = wf["extra"]["ds"]
    notes = [n for n in nodes if n["type"] in ("Note", "MarkdownNote")]
    assert notes
    for n in notes:
        x0, y0, x1, y1 = rects[n["id"]]
        sx0, sy0 = (x0 + ds["offset"][0]) * ds["scale"], (y0 + ds["offset"][1]) * ds["scale"]
        sx1, sy1 = (x1 + ds["offset"][0]) * ds["scale"], (y1 + ds["offset"][1]) * ds["scale"]
        assert VISIBLE[0] <= sx0 and VISIBLE[1] <= sy0 and sx1 <= VISIBLE[2] and sy1 <= VISIBLE[3], (sx0, sy0, sx1, sy1)


def test_ids_thumbnails_and_layout_up_to_date():
    from PIL import Image

    ids = []
    for path in ALL:
        with open(path, encoding="utf-8") as f:
            ids.append(json.load(f)["id"])
        thumb = path[: -len(".json")] + ".jpg"
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and im.size[0] >= 512
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 64
    assert len(set(ids)) == len(ids)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "layout_workflows.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
