"""The everyday conventions of a command-line tool, and no traceback anywhere (issue 12)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest

from spillover.cli import run as run_cmd
from spillover.cli.main import main


def _stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_piped_prompt_is_answered_once(monkeypatch, capsys):
    _stdin(monkeypatch, b"What is the capital of France?\n")
    assert main(["run", "--max-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out and ">>>" not in out


def test_prompt_dash_and_prompt_file_and_bad_bytes(monkeypatch, capsys, tmp_path):
    _stdin(monkeypatch, b"\xff\xfe What is the capital of France?")  # not UTF-8
    assert main(["run", "-p", "-", "--max-tokens", "3"]) == 0
    f = tmp_path / "q.txt"
    f.write_bytes(b"What is the capital of France?\n")
    assert main(["run", "--prompt-file", str(f), "--max-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out
    # undecodable argv bytes reach Python as lone surrogates (surrogateescape)
    assert main(["run", "-p", "\udcff\udcfe hi", "--max-tokens", "3"]) == 0


@pytest.mark.parametrize("argv, stdin", [(["-p", ""], b""), (["-p", "   "], b""), (["-p", "-"], b"\n")])
def test_empty_prompt_is_refused(monkeypatch, capsys, argv, stdin):
    _stdin(monkeypatch, stdin)
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the prompt is empty") and "Traceback" not in err


def test_broken_pipe_is_quiet():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["src", os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "spillover.cli.main", "run", "-p", "Count from 1 to 100.", "--max-tokens", "200",
           "--temperature", "0"]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.read(5)
    p.stdout.close()  # like `| head -c 5`
    err = p.stderr.read().decode()
    assert p.wait(120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_log_level_and_version_before_or_after_the_subcommand(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["--log-level", "foo", "run"])
    assert e.value.code == 2 and "not a log level" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["run", "--log-level", "loud"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["plan", "--version"])
    assert e.value.code == 0 and "spillover" in capsys.readouterr().out
    from spillover.cli.main import build_parser

    assert build_parser().parse_args(["plan", "--log-level", "debug"]).log_level == "DEBUG"
    assert build_parser().parse_args(["--log-level", "error", "plan"]).log_level == "ERROR"


def test_read_message_multiline():
    def reader(lines):
        it = iter(lines)

        def read(prompt=""):
            for line in it:
                return line
            raise EOFError

        return read

    assert run_cmd.read_message(reader(["one line"])) == "one line"
    assert run_cmd.read_message(reader(['"""', "a", "b", '"""'])) == "a\nb"
    assert run_cmd.read_message(reader(['"""first', "second", 'third"""'])) == "first\nsecond\nthird"
    assert run_cmd.read_message(reader(["a \\", "b"])) == "a \nb"
    with pytest.raises(EOFError):
        run_cmd.read_message(reader([]))


def test_generation_config_sampling_defaults(tmp_path):
    import argparse

    from spillover.loading.generation_config import model_sampling_defaults

    model = model_sampling_defaults({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                     "max_new_tokens": 99, "eos_token_id": 2})  # fmt: skip
    assert model == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 99}
    assert model_sampling_defaults({"do_sample": False, "temperature": 0.6})["temperature"] == 0.0
    assert model_sampling_defaults({"temperature": "hot", "top_k": -3}) == {}
    flags = dict(max_tokens=None, temperature=None, top_k=None, top_p=None, min_p=None, repetition_penalty=None,
                 seed=None, stop=[])  # fmt: skip
    p = run_cmd.sampling_from_args(argparse.Namespace(**flags), 0.7, model)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.min_p) == (0.6, 0.9, 20, 99, 0.0)
    p = run_cmd.sampling_from_args(
        argparse.Namespace(**{**flags, "temperature": 0.0, "top_k": 5}), 0.7, model
    )
    assert (p.temperature, p.top_k) == (0.0, 5)  # flags win
    assert run_cmd.sampling_from_args(argparse.Namespace(**flags), 0.7, {}).temperature == 0.7


def test_sdk_defaults_follow_the_model(smollm2):
    """No SamplingParams: the model's defaults, greedy where it sets none (the README's example)."""
    from spillover import LLM

    llm = LLM(smollm2, progress=False)
    p = llm.default_params()
    assert p.temperature == 0.0 and p.greedy
    llm.source.generation_config = {"do_sample": True, "temperature": 0.3}
    assert llm.default_params().temperature == 0.3
    llm.source.generation_config = {}
    assert "Paris" in llm.chat([{"role": "user", "content": "What is the capital of France?"}]).text


def test_clean_model_names(smollm2):
    from types import SimpleNamespace

    from spillover.server.names import clean_model_name, model_aliases

    gguf = SimpleNamespace(kind="gguf", path=smollm2, name="Smollm2 135M 8k Lc100K Mix1 Ep2")
    assert clean_model_name(gguf) == "SmolLM2-135M-Instruct.Q4_1"
    snap = "/c/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/0123abcd"
    hub = SimpleNamespace(kind="safetensors", path=snap, name="0123abcd")
    assert clean_model_name(hub) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    aliases = model_aliases(hub, "served")
    assert {"served", "HuggingFaceTB/SmolLM2-135M-Instruct", snap, "SmolLM2-135M-Instruct"} <= aliases
    d = SimpleNamespace(kind="safetensors", path="/models/my-llama", name="x")
    assert clean_model_name(d) == "my-llama"


def test_offline_hub_id_fails_fast(monkeypatch, capsys, tmp_path):
    import time

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for argv in (["plan", "-m", "org/model"], ["run", "-m", "org/model", "-p", "hi"]):
        t = time.monotonic()
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("error: ") and "not reachable" in err and "Traceback" not in err
        assert time.monotonic() - t < 10
    from spillover.cli.doctor import hub_check

    c = hub_check()
    assert c.name == "hub" and "not reachable" in c.message


def test_plan_max_seq_len_beyond_context_warns(smollm2, capsys):
    assert main(["plan", "-m", smollm2, "--max-seq-len", "9000", "--cpu", "64GiB"]) == 0
    assert "beyond this model's context of 8192" in capsys.readouterr().err
    assert main(["plan", "-m", smollm2, "--cpu", "64GiB"]) == 0  # the default does not warn
    assert "beyond" not in capsys.readouterr().err


def test_serve_key_sources_limits_and_exposure_warning(tmp_path, monkeypatch, caplog):
    import argparse

    from spillover.cli import serve
    from spillover.errors import ConfigError

    ns = dict(api_key=None, api_key_file=None, max_body_size="1MiB", max_seqs_per_request=4, max_queued=9,
              allow_remote_images=False)  # fmt: skip
    f = tmp_path / "key"
    f.write_text("from-file\n")
    monkeypatch.setenv("SPILLOVER_API_KEY", "from-env")
    assert serve.api_key(argparse.Namespace(**{**ns, "api_key_file": str(f)})) == "from-file"
    assert serve.api_key(argparse.Namespace(**ns)) == "from-env"
    monkeypatch.delenv("SPILLOVER_API_KEY")
    assert serve.api_key(argparse.Namespace(**ns)) is None
    with pytest.raises(ConfigError):
        serve.api_key(argparse.Namespace(**{**ns, "api_key_file": str(tmp_path / "missing")}))
    lim = serve.server_limits(argparse.Namespace(**ns))
    assert (lim.max_body_bytes, lim.max_seqs_per_request, lim.max_queued_seqs) == (1 << 20, 4, 9)
    with pytest.raises(ConfigError):
        serve.server_limits(argparse.Namespace(**{**ns, "max_queued": 0}))
    with caplog.at_level(logging.WARNING):
        serve.warn_if_exposed("0.0.0.0", None)
        serve.warn_if_exposed("127.0.0.1", None)
        serve.warn_if_exposed("0.0.0.0", "k")
    assert [r.getMessage().split(" ")[1] for r in caplog.records] == ["0.0.0.0"]


def test_serve_logs_start_up_at_info():
    from spillover.cli.main import build_parser, log_level

    assert log_level(build_parser().parse_args(["serve"])) == "INFO"
    assert log_level(build_parser().parse_args(["run"])) == "WARNING"
    assert log_level(build_parser().parse_args(["serve", "--log-level", "error"])) == "ERROR"
