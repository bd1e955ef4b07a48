"""Every code block in README.md and docs/*.md runs as written, or says why it cannot here.

A fenced block tagged python or bash runs unless the line just before its fence is an HTML
comment `<!-- skip: reason -->` (weights or data it needs, a server, the suite itself); the
test of a skipped block reports that reason. Python blocks run each in a fresh namespace,
bash blocks in a scratch folder that links the repository's scripts/, so a relative
`output_dir=out/` lands there. Untagged blocks are text (diagrams, trees) and not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^<!--\s*skip:\s*(?P<reason>.+?)\s*-->\s*$")
RUN = ("python", "bash", "sh", "shell")


def code_blocks(text: str) -> list[tuple[int, str, str, str | None]]:
    """(line number of the opening fence, language, code, skip reason or None) of every fenced block."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, language = i, match.group(1).lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None:
            raise ValueError(f"line {start + 1}: a code fence that is never closed")
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.match(previous.strip())
        blocks.append((start + 1, language, "\n".join(lines[start + 1 : end]) + "\n",
                       skip.group("reason") if skip else None))
        i = end + 1
    return blocks


def _cases():
    for page in PAGES:
        for line, language, code, reason in code_blocks(page.read_text(encoding="utf-8")):
            if language in RUN:
                yield pytest.param(language, code, reason, id=f"{page.relative_to(ROOT)}:{line}")


def test_blocks_are_found():
    """The extraction sees the README's blocks, tagged and skipped as written (guards the parser)."""
    blocks = code_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    languages = [b[1] for b in blocks]
    assert "python" in languages and "bash" in languages
    assert any(b[3] for b in blocks) and any(b[3] is None and b[1] == "python" for b in blocks)
    demo = [b for b in code_blocks("<!-- skip: needs weights -->\n```bash\nx\n```\n```python\ny\n```\n")]
    assert demo == [(2, "bash", "x\n", "needs weights"), (5, "python", "y\n", None)]


@pytest.mark.parametrize("language,code,reason", list(_cases()))
def test_code_block_runs(language, code, reason, tmp_path, monkeypatch):
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)
    if language == "python":
        exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})
        return
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def test_ci_installs_and_tests_as_the_readme_says():
    """.ci/run runs the README's install command (its && steps, in order) and then its test command."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install = readme[readme.index("## Install"):readme.index("## Test")]
    test = readme[readme.index("## Test"):readme.index("## Quick start")]
    (_, _, install_code, _), = [b for b in code_blocks(install) if b[1] == "bash"]
    (_, _, test_code, _), = [b for b in code_blocks(test) if b[1] == "bash"]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    steps = [step.strip() for step in install_code.strip().split("&&")]
    positions = [ci.index(step) for step in steps]
    assert positions == sorted(positions)
    assert ci[-1] == test_code.strip()
