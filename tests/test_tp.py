"""Tensor parallelism in real processes on the CPU (gloo): each rank is its own process, loads only its slices,
and the answers equal the single-process run and transformers (f32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from spillover import LLM, SamplingParams
from spillover.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

PROMPT = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(3)).tolist()
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, prompt_logprobs=True)


@pytest.fixture(autouse=True)
def gloo(monkeypatch):
    monkeypatch.setenv("SPILLOVER_TP_BACKEND", "gloo")


def load(path, tp: int | None = None, **kw) -> LLM:
    return LLM(str(path), dtype="f32", progress=False, max_seq_len=256, tensor_parallel_size=tp, **kw)


def reference_logprobs(path, prompt: list[int]) -> list[float]:
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([prompt])).logits[0].float(), -1)
    return [lp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]


def max_diff(a: list, b: list) -> float:
    return max(abs(x - y) for x, y in zip(a[1:], b[1:] if b[0] is None else b, strict=True))


@pytest.fixture(scope="class")
def llama_pair(tiny_models):
    """The tiny Llama in one process and over two ranks (started once for the module)."""
    os.environ["SPILLOVER_TP_BACKEND"] = "gloo"
    try:
        one, two = load(tiny_models["llama"]), load(tiny_models["llama"], 2)
    finally:
        del os.environ["SPILLOVER_TP_BACKEND"]
    yield one, two
    two.close()


class TestTwoRanks:
    """One 2-rank engine for these tests (one default process group per process: closed at the end)."""

    def test_tp2_equals_one_process_and_transformers(self, llama_pair, tiny_models):
        one, two = llama_pair
        assert two.tp is not None and two.tp.world == 2 and len(two.tp.workers) == 1
        assert two.model.layers[0].self_attn.n_heads == 2  # this rank holds half of the 4 heads
        numel = [sum(p.numel() for p in m.model.parameters()) for m in (one, two)]
        norms = sum(p.numel() for n, p in one.model.named_parameters() if "norm" in n)
        assert numel[1] == (numel[0] - norms) // 2 + norms  # its slices only; norms are replicated
        a, b = one.generate(PROMPT, GREEDY), two.generate(PROMPT, GREEDY)
        assert b.token_ids == a.token_ids
        assert max_diff(a.prompt_logprobs, b.prompt_logprobs) < 1e-5
        assert max_diff(b.prompt_logprobs, reference_logprobs(tiny_models["llama"], PROMPT)) < 1e-4

    def test_tp2_batched_prefix_cached_and_chunked(self, llama_pair):
        """Continuous batching of mixed lengths, a prompt whose prefix is cached, and chunked prefill."""
        one, two = llama_pair
        prompts = [PROMPT, PROMPT[:7], PROMPT + [5, 6, 7], list(range(3, 60))]
        singles = [one.generate(p, GREEDY) for p in prompts]
        two.engine.scheduler.max_batched_tokens = 32  # the long prompts are prefilled in chunks
        try:
            batched = two.generate(prompts, GREEDY)
        finally:
            two.engine.scheduler.max_batched_tokens = one.engine.scheduler.max_batched_tokens
        for s, b in zip(singles, batched, strict=True):
            assert b.token_ids == s.token_ids
            assert max_diff(s.prompt_logprobs, b.prompt_logprobs) < 1e-5
        # without prompt logprobs a prompt takes the cached blocks of an earlier prompt's prefix
        plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
        two.generate(PROMPT, plain)
        state = two.engine.add_request(PROMPT + [5, 6, 7], plain)
        while not state.seq.is_finished:
            two.engine.step()
        assert state.seq.num_cached_prompt >= 32
        assert state.seq.output_ids == singles[2].token_ids

    def test_server_on_tp2_answers_the_openai_client(self, llama_pair):
        """The real server and `openai` client over the 2-rank engine (token-id prompts: the tiny model has
        no tokenizer); the answer and its logprobs equal the one-process run. Last in the class: the
        engine then belongs to the server's thread."""
        import openai
        from test_server import Server

        from spillover.engine.async_engine import AsyncLLM
        from spillover.server.app import create_app

        one, two = llama_pair
        want = one.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0))
        alm = AsyncLLM(two)
        server = Server(create_app(alm, api_key=""))
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
            name = server.server.config.app.state.spillover.model_name
            r = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=0,
                                          extra_body={"ignore_eos": True})  # fmt: skip
        finally:
            server.stop()
            alm.shutdown()
        assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
        got = r.choices[0].logprobs.token_logprobs
        assert max(abs(a.logprob - b) for a, b in zip(want.logprobs, got, strict=True)) < 1e-5


def test_tp4_with_fewer_kv_heads_than_ranks(tiny_models):
    """Qwen3 (q/k norms, head_dim 32): 2 kv heads over 4 ranks, each kv head replicated on 2."""
    path = tiny_models["qwen3"]
    a = load(path).generate(PROMPT, GREEDY)
    four = load(path, 4)
    try:
        assert four.model.layers[0].self_attn.n_kv == 1 and len(four.tp.workers) == 3
        b = four.generate(PROMPT, GREEDY)
    finally:
        four.close()
    assert b.token_ids == a.token_ids
    assert max_diff(a.prompt_logprobs, b.prompt_logprobs) < 1e-5


@pytest.mark.parametrize("arch", ["llama-tied", "qwen2", "qwen3"])
def test_tp2_tied_embeddings_qkv_bias_and_qk_norms(tiny_models, arch):
    a = load(tiny_models[arch]).generate(PROMPT, GREEDY)
    two = load(tiny_models[arch], 2)
    try:
        b = two.generate(PROMPT, GREEDY)
    finally:
        two.close()
    assert b.token_ids == a.token_ids
    assert max_diff(a.prompt_logprobs, b.prompt_logprobs) < 1e-5


def test_tp2_with_isq(tiny_models):
    """ISQ quantizes each rank's slices: row-parallel layers get their own per-row scales, so the numbers
    are close to (not equal to) the single-process ISQ run."""
    from spillover.quant.isq import Int8Linear

    a = load(tiny_models["llama"], isq=8).generate(PROMPT, GREEDY)
    two = load(tiny_models["llama"], 2, isq=8)
    try:
        assert isinstance(two.model.layers[0].self_attn.o_proj.linear, Int8Linear)
        assert isinstance(two.model.layers[0].mlp.gate_up_proj, Int8Linear)
        assert isinstance(two.model.lm_head.linear, Int8Linear)  # the rank's vocabulary rows, int8
        b = two.generate(PROMPT, GREEDY)
    finally:
        two.close()
    assert max_diff(a.prompt_logprobs, b.prompt_logprobs) < 0.05


def test_bad_tp_size_is_refused_before_loading(tiny_models):
    import torch.distributed as dist

    with pytest.raises(ConfigError, match="4 attention heads do not divide over 3"):
        load(tiny_models["llama"], 3)
    assert not dist.is_initialized()  # refused by the plan: no process started, no weight read


KILL_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["SPILLOVER_TP_BACKEND"] = "gloo"
    from spillover import LLM, SamplingParams
    llm = LLM(sys.argv[1], dtype="f32", progress=False, max_seq_len=256, tensor_parallel_size=2)
    print(llm.tp.workers[0].pid, flush=True)
    while True:
        llm.generate(list(range(3, 40)), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
""")


def test_a_dead_rank_ends_the_run_with_an_error(tiny_models):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tiny_models["llama"])], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        worker = int(p.stdout.readline())
        time.sleep(0.5)
        os.kill(worker, 9)
        t = time.perf_counter()
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode != 0
    assert time.perf_counter() - t < 15
    assert "rank 1 died" in err


TORCHRUN_SCRIPT = textwrap.dedent("""
    import os, sys, json
    from spillover import LLM, SamplingParams
    llm = LLM(sys.argv[1], dtype="f32", progress=False, max_seq_len=256)  # the size comes from torchrun
    out = llm.generate(list(range(3, 40)), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    print("RESULT", json.dumps([llm.tp.world, out.token_ids]), flush=True)
""")


def test_torchrun_starts_the_ranks(tiny_models, tmp_path):
    """The several-machine path on one: torchrun starts both processes (env:// rendezvous); rank 1 turns into
    a worker inside LLM(...), rank 0 answers as the one-process engine does."""
    script = tmp_path / "tp_script.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "SPILLOVER_TP_BACKEND": "gloo"}
    from spillover.distributed.group import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           str(script), str(tiny_models["llama"])]  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    world, tokens = next(json.loads(ln[7:]) for ln in p.stdout.splitlines() if ln.startswith("RESULT "))
    want = load(tiny_models["llama"]).generate(list(range(3, 40)), SamplingParams(max_tokens=8, temperature=0,
                                                                               ignore_eos=True))  # fmt: skip
    assert world == 2 and tokens == want.token_ids


def test_tp2_gemma3_sliding_window_rings(tiny_models):
    """Gemma 3 over two ranks: sliding-window layers keep their per-sequence rings on every rank; a prompt
    longer than the window (8) and a batch of two equal the single-process run."""
    prompts = [PROMPT, PROMPT[:23]]
    a = load(tiny_models["gemma3"]).generate(prompts, GREEDY)
    two = load(tiny_models["gemma3"], 2)
    try:
        b = two.generate(prompts, GREEDY)
    finally:
        two.close()
    for x, y in zip(a, b, strict=True):
        assert y.token_ids == x.token_ids
        assert max_diff(x.prompt_logprobs, y.prompt_logprobs) < 1e-5
