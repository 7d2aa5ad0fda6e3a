"""`spillover run` as users call it: the installed console script, in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

EXE = shutil.which("spillover") or f"{sys.executable} -m spillover.cli.main"


def spillover(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*EXE.split(), *args], input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


def test_prompt_answers_once_stdout_only_the_answer():
    r = spillover("run", "-p", "What is the capital of France?", "--max-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert r.stdout.strip().startswith("The capital")
    assert "device map" not in r.stdout


def test_verbose_prints_timings_on_stderr():
    r = spillover("run", "-p", "Hi", "--max-tokens", "8", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "device map: cpu" in r.stderr and "(Q4_1)" in r.stderr  # the map line names the quantization
    timings = next(line for line in r.stderr.splitlines() if line.startswith("timings:"))
    assert "prompt: " in timings and "generation: " in timings and "tok/s" in timings and "load: " in timings


def test_interactive_session_runs_and_exits():
    r = spillover(
        "run", "-i", "--max-tokens", "12", "--temperature", "0",
        stdin='Hello!\n/clear\n/nonsense\n"""\nHi\nagain\n"""\n/exit\n',
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(">>>") == 5 and "conversation cleared" in r.stderr
    assert "unknown command /nonsense" in r.stderr and "/clear" in r.stderr  # the help


def test_interactive_history_and_clear(monkeypatch, capsys):
    """The conversation so far goes to every turn; /clear forgets it. (Checked on what reaches llm.chat.)"""
    import argparse

    from spillover.cli import run as run_cmd
    from spillover.engine.output import RequestOutput

    seen: list[list[dict]] = []

    class FakeStream:
        def __init__(self, text):
            self.items = iter([RequestOutput("r", text, [1], [], "stop")])

        def __iter__(self):
            return self.items

        def close(self):
            pass

    class FakeLLM:
        class source:
            name = "fake"

        class device_map:
            @staticmethod
            def summary():
                return "cpu"

        def chat(self, messages, params, stream):
            seen.append([dict(m) for m in messages])
            return FakeStream(f"answer {len(seen)}")

    lines = iter(["first", "second", "/clear", "third", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    args = argparse.Namespace(system="be brief", max_tokens=8, temperature=None, top_k=0, top_p=1.0, min_p=0.0,
                              repetition_penalty=1.0, seed=None, stop=[], verbose=False)  # fmt: skip
    assert run_cmd._interactive(FakeLLM(), args) == 0
    assert [m["content"] for m in seen[1]] == ["be brief", "first", "answer 1", "second"]
    assert [m["content"] for m in seen[2]] == ["be brief", "third"]
    assert "answer 3" in capsys.readouterr().out


@pytest.mark.parametrize("flag", [["--dtype", "f99"], ["--nonsense"]])
def test_bad_flags_exit_2(flag):
    r = spillover("run", *flag)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


def test_one_prompt_run_imports_only_what_it_needs():
    """Start-up (issue 14): a one-token answer on the CPU imports no compiler stack, server, GPU kernels,
    reference libraries or other model classes (torch._dynamo alone: 1.3 s and 150 MiB of RSS)."""
    heavy = (
        "torch._dynamo",
        "triton",
        "transformers",
        "gguf",
        "starlette",
        "uvicorn",
        "spillover.models.mllama",
    )
    code = (
        "import sys\nfrom spillover.cli.main import main\n"
        "main(['run', '-p', 'Hi', '--max-tokens', '1'])\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)"
    )
    env = {
        k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"
    }  # (conftest sets it for kernel tests)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "[]"
