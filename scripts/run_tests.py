"""Run the test-suite once per ComfyUI checkout present, and print one summary line per version.

    python scripts/run_tests.py [pytest arguments]

The checkouts are ``$COMFYUI_PATHS`` (separated by ':') when set, else ``$COMFYUI_PATH``
(default ``~/ComfyUI``) and the ``~/ComfyUI-*`` checkouts beside it. ComfyUI is imported
into the test process, so each version runs in a pytest process of its own. With no
ComfyUI present the suite runs once and the ComfyUI tests skip with the reason printed.
Exits non-zero when any run fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dcgen_core.tools.headless import comfyui_path, comfyui_paths, comfyui_version_at  # noqa: E402

_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def _run(label: str, env: dict, pytest_args: list[str]) -> tuple[int, dict, float, str]:
    print(f"\n===== {label} =====", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", *pytest_args], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = ""
    for line in proc.stdout:
        sys.stdout.write(line)
        if _COUNTS.search(line) and (" in " in line or "no tests ran" in line):
            last = line.strip().strip("=").strip()
    rc = proc.wait()
    counts: dict[str, int] = {}
    for n, kind in _COUNTS.findall(last):
        kind = "errors" if kind.startswith("error") else kind
        counts[kind] = counts.get(kind, 0) + int(n)
    return rc, counts, time.monotonic() - start, last


def main(argv: list[str]) -> int:
    paths = comfyui_paths()
    runs = []
    if not paths:
        print(f"note: no ComfyUI found (looked at {comfyui_path()} and $COMFYUI_PATHS); the ComfyUI tests will skip.")
        env = {**os.environ, "COMFYUI_PATH": os.environ.get("COMFYUI_PATH") or comfyui_path()}
        env.pop("COMFYUI_PATHS", None)
        runs.append(("no ComfyUI", *_run("without ComfyUI", env, argv)))
    for path in paths:
        label = f"ComfyUI {comfyui_version_at(path)} ({path})"
        env = {**os.environ, "COMFYUI_PATH": path, "DCGEN_REQUIRE_COMFYUI": "1"}
        runs.append((label, *_run(label, env, argv)))

    print("\n===== summary =====")
    total: dict[str, int] = {}
    worst = 0
    for label, rc, counts, seconds, last in runs:
        print(f"{label}: {last or f'pytest exited {rc} without a summary'} (exit {rc}, {seconds:.0f} s)")
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
        if rc not in (0,):
            worst = rc or 1
    failed = total.get("failed", 0) + total.get("errors", 0)
    line = f"{total.get('passed', 0)} passed, {failed} failed"
    if total.get("skipped"):
        line += f", {total['skipped']} skipped"
    print(f"total: {line}")
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
