"""Every Python block in the README and docs/ runs as shown: each in a fresh process and a fresh
working directory (so its ./.capsule state lands there), exit code 0.

A block is a whole program, unless its first line is ``# continues the block above``: then it is
run after the block before it in the same file, as one program. A block that defines ``test_``
functions is run with pytest, as its first line says.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

CONTINUES = "# continues the block above"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def programs(path: Path) -> list[tuple[int, str]]:
    """(line of the block, the program it ends) for every Python block of ``path``."""
    text = path.read_text()
    out: list[tuple[int, str]] = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        code = match.group(1)
        if code.startswith(CONTINUES):
            assert out, f"{path.name}:{line}: '{CONTINUES}', but no block comes before it"
            code = out[-1][1] + "\n" + code
        out.append((line, code))
    return out


CASES = [(path, line, code) for path in DOCS for line, code in programs(path)]


def test_the_readme_and_the_docs_have_python_blocks():
    names = {path.name for path, _, _ in CASES}
    assert {"README.md", "ui.md", "schedules.md"} <= names, names
    assert len([c for c in CASES if c[0].name == "README.md"]) >= 4


@pytest.mark.parametrize(("path", "line", "code"), CASES,
                         ids=[f"{path.name}:{line}" for path, line, _ in CASES])
def test_every_python_block_runs_as_shown(path, line, code, tmp_path):
    script = tmp_path / ("test_block.py" if re.search(r"^def test_", code, re.M) else "block.py")
    script.write_text(code)
    command = [sys.executable, str(script)]
    if script.name.startswith("test_"):
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(script)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for name in ("CAPSULE_STATE_DIR", "CAPSULE_STORE", "CAPSULE_CONNECT", "CAPSULE_KEYS"):
        env.pop(name, None)
    try:
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{path.name}:{line} did not finish within 150 s; stdout: {exc.stdout!r}")
    assert proc.returncode == 0, (
        f"{path.name}:{line} exited {proc.returncode}\n{code}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
