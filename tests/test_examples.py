"""The examples run as users run them: a fresh process, a fresh working directory (so their
./.capsule state lands there), exit code 0 and the lines that show each feature."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

EXAMPLES = ROOT / "examples"


def run_example(name: str, cwd: Path, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("CAPSULE_STATE_DIR", None)
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def test_demo_runs_and_prints_every_outcome(tmp_path):
    out = run_example("demo.py", tmp_path).stdout
    lines = out.splitlines()
    assert len([line for line in lines if re.search(r"fetch_price\s+attempts=1\s+ok\s+[\d.]+$", line)]) == 3, out
    assert re.search(r"build_report\s+attempts=2\s+ok\s+'report 7 built on attempt 2'", out), out
    total = sum(i * i for i in range(2_000_000))
    assert re.search(rf"crunch\s+attempts=1\s+ok\s+'sum of squares below 2000000 = {total} \(in pid \d+\)'",
                     out), out
    assert "hello ada, working for session 'chat-42'" in out, out
    assert re.search(r"broken\s+attempts=1\s+failed ValueError: this task fails on purpose", out), out
    assert re.search(r"^done in [\d.]+s; task history is kept in .*\.capsule$", lines[-1]), out
    assert (tmp_path / ".capsule" / "capsule.db").exists()

    # ... and that history can be read once the demo (and its supervisor) has ended
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("CAPSULE_STATE_DIR", None)
    tasks = subprocess.run([sys.executable, "-m", "capsule_actors", "tasks"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert tasks.returncode == 0, tasks.stderr
    assert len(tasks.stdout.splitlines()) == 1 + 7 and "broken" in tasks.stdout, tasks.stdout
    assert "no supervisor is running" in tasks.stderr


def test_chat_loop_renders_the_session_events_and_keeps_history(tmp_path):
    out = run_example("chat_loop.py", tmp_path).stdout
    lines = out.splitlines()
    questions = {
        "q1": ("What is the capital of France?", "The capital of France is Paris."),
        "q2": ("How many legs does a spider have?", "A spider has eight legs."),
        "q3": ("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters the most."),
    }
    for label, (question, answer) in questions.items():
        mine = [line for line in lines if line.startswith(f"[{label}] ")]
        assert mine[0] == f"[{label}] you: {question}", out
        assert f"[{label}] bot: Good question! Looking into: {question}" in mine, out
        bars = [line for line in mine if re.match(rf"\[{label}\] \[[#.]{{20}}\]", line)]
        assert bars == [
            f"[{label}] [#####...............]  25% step 1/4",
            f"[{label}] [##########..........]  50% step 2/4",
            f"[{label}] [###############.....]  75% step 3/4",
            f"[{label}] [####################] 100% step 4/4",
        ], out
        chunks = len(answer.split())
        assert f"[{label}] answer: {answer}  ({chunks} chunks)" in mine, out
        assert re.match(rf"\[{label}\] \(success\) answered question #[123] of this session$", mine[-1]), out
        # each question's events come in the order its task sent them
        kinds = ["you" if " you: " in m else "bot" if " bot: " in m else "bar" if m in bars
                 else "answer" if " answer: " in m else "notify" for m in mine]
        assert kinds == ["you", "bot", "bar", "bar", "bar", "bar", "answer", "notify"], out
    assert "history of chat-1 (3 questions, 3 answered):" in lines, out
    history = lines[lines.index("history of chat-1 (3 questions, 3 answered):") + 1:][:3]
    assert sorted(h.split(". ", 1)[1] for h in history) == sorted(q for q, _ in questions.values()), out
    assert lines[-1].startswith("done in "), out

    # a second run in the same directory shows only its own events, and the history grows
    out2 = run_example("chat_loop.py", tmp_path).stdout
    assert "history of chat-1 (6 questions, 6 answered):" in out2.splitlines(), out2
    assert len([line for line in out2.splitlines() if " answer: " in line]) == 3, out2
