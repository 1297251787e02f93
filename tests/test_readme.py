"""The README and docs as a new user meets them: the install and doctor commands run as written in a scratch ComfyUI,
every command line names options its tool has, and every link points at something that exists."""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from dcgen_core.tools.headless import comfyui_available, comfyui_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_URL = "https://github.com/dc-gen/ComfyUI-DC-Gen"
PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))),
         *sorted(glob.glob(os.path.join(ROOT, "web", "docs", "*.md")))]


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _code_blocks(text):
    """The indented code blocks of a markdown text (a blank line, then lines indented 4+), as lists of lines;
    backslash continuations joined."""
    blocks, cur, prev_blank = [], None, True
    for line in text.split("\n"):
        if line.strip() and (line.startswith("    ") and (prev_blank or cur is not None)) and not line.lstrip().startswith(("|", "- ")):
            cur = cur if cur is not None else []
            cur.append(line.strip())
        elif line.strip():
            if cur:
                blocks.append(cur)
            cur = None
        prev_blank = not line.strip()
    if cur:
        blocks.append(cur)
    joined = []
    for block in blocks:
        out, acc = [], ""
        for line in block:
            acc += line[:-1].strip() + " " if line.endswith("\\") else line
            if not line.endswith("\\"):
                out.append(acc.strip())
                acc = ""
        joined.append(out)
    return joined


def _slug(heading):
    """GitHub's anchor for a heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(path):
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", _read(path), re.M)}


def test_every_link_resolves():
    """Relative links (and links to this repository's files on GitHub) point at files that exist; #anchors at
    headings that exist."""
    for page in PAGES:
        text = re.sub(r"`[^`\n]*`", "", _read(page))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(REPO_URL + "/blob/main/"):
                target = os.path.relpath(os.path.join(ROOT, target[len(REPO_URL + "/blob/main/"):]), os.path.dirname(page))
            elif target.startswith(REPO_URL + "#"):
                target = os.path.relpath(os.path.join(ROOT, "README.md"), os.path.dirname(page)) + target[len(REPO_URL):]
            if re.match(r"(https?:|mailto:)", target):
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            assert os.path.exists(full), f"{os.path.relpath(page, ROOT)}: link to {target}: no such file"
            if anchor and full.endswith(".md"):
                assert anchor in _anchors(full), f"{os.path.relpath(page, ROOT)}: link to {target}: no such heading"


def _commands(pages):
    for page in pages:
        for block in _code_blocks(_read(page)):
            for line in block:
                yield os.path.relpath(page, ROOT), line


def test_every_tool_line_names_options_the_tool_has():
    """Each `python -m dcgen_core.<tool> ...` and `python scripts|benchmarks/<file> ...` line of the README and docs
    names a tool that exists, a subcommand it has and options its --help lists."""
    seen = 0
    for page, line in _commands(PAGES):
        line = line.split("#")[0].strip()
        m = re.match(r"(?:\w+=\S+ )*python (-m (dcgen_core\.\w+)|(scripts|benchmarks)/\S+\.py)(.*)", line)
        if not m:
            continue
        seen += 1
        cmd = [sys.executable, "-m", m.group(2)] if m.group(2) else [sys.executable, os.path.join(ROOT, m.group(1)[0:])]
        if not m.group(2):
            assert os.path.isfile(os.path.join(ROOT, m.group(1))), f"{page}: {line}"
            if m.group(1) == "scripts/run_tests.py":  # its arguments go to pytest
                continue
        args = m.group(4).split()
        sub = [a for a in args[:1] if re.fullmatch(r"[a-z]+", a)]
        out = subprocess.run(cmd + sub + ["--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{page}: {line}\n{out.stderr[-2000:]}"
        for opt in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m.group(4)):
            assert opt in out.stdout, f"{page}: `{line}`: {opt} is not an option of {' '.join(cmd[1:] + sub)}"
    assert seen >= 8


@pytest.fixture(scope="module")
def scratch_comfyui(tmp_path_factory):
    """A scratch ComfyUI: the real checkout's files linked in, an empty custom_nodes and models."""
    if not comfyui_available():
        pytest.skip(f"no ComfyUI at {comfyui_path()}")
    real = comfyui_path()
    root = tmp_path_factory.mktemp("scratch") / "ComfyUI"
    root.mkdir()
    for name in os.listdir(real):
        if name not in ("custom_nodes", "models", "output", "input", "temp", "user", ".git"):
            os.symlink(os.path.join(real, name), root / name)
    for name in ("custom_nodes", "models", "output", "input"):
        (root / name).mkdir()
    return root


def test_readme_install_and_doctor_run_as_written(scratch_comfyui):
    """The README's git install block and its doctor line, in a scratch ComfyUI: git fetches this repository
    (GitHub replaced by this checkout through git's url.insteadOf; the working tree's files then laid over the
    clone, as they will be published), pip finds the requirements installed (no index: nothing downloaded), and
    `python -m dcgen_core.doctor --smoke` run from the pack's folder finds that ComfyUI and runs every workflow."""
    readme = _read(os.path.join(ROOT, "README.md"))
    install = next(b for b in _code_blocks(readme) if any(REPO_URL in line for line in b))
    assert install == ["cd custom_nodes", f"git clone {REPO_URL}",
                       "python -m pip install -r ComfyUI-DC-Gen/requirements.txt"], install
    env = {**os.environ, "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": f"url.{ROOT}.insteadOf",
           "GIT_CONFIG_VALUE_0": REPO_URL, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("COMFYUI_PATH", None)
    out = subprocess.run(" && ".join(install), shell=True, cwd=scratch_comfyui, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    pack = scratch_comfyui / "custom_nodes" / "ComfyUI-DC-Gen"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for rel in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(os.path.dirname(pack / rel), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), pack / rel)
    doctor = next(line for b in _code_blocks(readme) for line in b if line.startswith("python -m dcgen_core.doctor"))
    assert doctor == "python -m dcgen_core.doctor --smoke"
    out = subprocess.run(doctor.split(), cwd=pack, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"at {pack}: imported" in out.stdout and str(scratch_comfyui) in out.stdout
    n = len(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
    assert f"all {n} workflows ran" in out.stdout, out.stdout[-3000:]
    # without --smoke: every file of every workflow, once, with how to get it (none is in the scratch models/)
    out = subprocess.run([sys.executable, "-m", "dcgen_core.doctor"], cwd=pack, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 1 and "model files (each once" in out.stdout
    assert out.stdout.count("MISSING text_encoders/clip_l.safetensors") == 1
    assert "not known to this pack" not in out.stdout


def test_registry_metadata_validates():
    """What the Comfy Registry reads from pyproject.toml, as comfy-cli parses it, and `comfy node validate` (offline)
    passing without warnings; the icon and the publish workflow exist."""
    pytest.importorskip("comfy_cli", reason="comfy-cli not installed (pip install -e '.[cli]')")
    from comfy_cli.registry.config_parser import extract_node_configuration

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        cfg = extract_node_configuration()
    finally:
        os.chdir(cwd)
    assert cfg.project.urls.repository == REPO_URL and cfg.project.license.file == "LICENSE"
    assert os.path.isfile(os.path.join(ROOT, "LICENSE"))
    assert cfg.project.supported_os and cfg.project.supported_accelerators
    assert cfg.project.supported_comfyui_version.startswith(">=")
    assert cfg.tool_comfy.publisher_id and cfg.tool_comfy.display_name
    icon = cfg.tool_comfy.icon
    assert icon.startswith("https://raw.githubusercontent.com/dc-gen/ComfyUI-DC-Gen/main/")
    assert os.path.isfile(os.path.join(ROOT, icon.split("/main/", 1)[1]))
    workflow = _read(os.path.join(ROOT, ".github", "workflows", "publish.yml"))
    assert "Comfy-Org/publish-node-action" in workflow and "REGISTRY_ACCESS_TOKEN" in workflow and "release" in workflow
    out = subprocess.run(["comfy", "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "validation checks passed" in out.stdout + out.stderr, out.stdout + out.stderr
    assert "Warning" not in out.stdout + out.stderr
