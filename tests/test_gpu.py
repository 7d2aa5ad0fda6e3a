"""GPU-only checks (run on the GPU machine: `pytest -m gpu`)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("lens", [[1], [5, 300], [64, 65, 1000, 7]])
def test_triton_paged_decode_matches_sdpa(lens):
    from spillover.layers import triton_attention

    if not triton_attention.HAVE_TRITON:
        pytest.skip("no triton")
    torch.manual_seed(0)
    B, nh, nkv, hd, S = len(lens), 32, 8, 128, 4096
    q = torch.randn(B, nh, hd, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(S, nkv, hd, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn(S, nkv, hd, device="cuda", dtype=torch.bfloat16)
    L = max(lens)
    slots = torch.stack([torch.randperm(S, device="cuda")[:L] for _ in lens])  # scattered slots
    out = triton_attention.paged_decode(
        q, kc, vc, slots, torch.tensor(lens, device="cuda", dtype=torch.int32), hd**-0.5
    )
    for b, n in enumerate(lens):
        k = kc[slots[b, :n]].transpose(0, 1).float()  # [nkv, n, hd]
        v = vc[slots[b, :n]].transpose(0, 1).float()
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[b].float()[:, None, :], k, v, scale=hd**-0.5, enable_gqa=True
        )[:, 0]
        assert (out[b].float() - ref).abs().max() < 2e-2


@pytest.mark.parametrize("past", [1, 100, 2047])
def test_prefill_chunk_with_a_past_matches_the_masked_reference(past):
    """A chunk with a past runs flash attention with a bottom-right causal bias on a GPU (no mask, no K/V
    expanded to every head); it must equal the masked attention of the CPU path on the same cache."""
    from spillover.layers.attention import AttnMeta, PrefillSlice, paged_attention

    torch.manual_seed(past)
    nh, nkv, hd, S, q_len = 32, 8, 128, 4096, 300
    ctx = past + q_len
    q = torch.randn(q_len, nh, hd, dtype=torch.bfloat16)
    k, v = (torch.randn(q_len, nkv, hd, dtype=torch.bfloat16) for _ in range(2))
    kc, vc = (torch.randn(S, nkv, hd, dtype=torch.bfloat16) for _ in range(2))
    slots = torch.randperm(S)[:ctx]  # the sequence's slots, scattered; the chunk's own are the last q_len
    mask = torch.arange(ctx)[None, :] <= torch.arange(past, ctx)[:, None]  # the runner's lower-right mask

    def run(dev: str) -> torch.Tensor:
        d = lambda t: t.to(dev)  # noqa: E731
        meta = AttnMeta(d(slots[past:]), None, None, None, [PrefillSlice(0, q_len, ctx, d(slots), d(mask))])
        return paged_attention(d(q), d(k), d(v), d(kc.clone()), d(vc.clone()), meta, hd**-0.5).float().cpu()

    ref = run("cpu")
    assert (run("cuda") - ref).abs().max() < 2e-2


@pytest.mark.parametrize("dtype", ["bf16", "f32"])  # f32: the SDPA fallback inside the graph
def test_cuda_graph_decode_equals_eager(dtype):
    """Graph replay computes what the eager path computes. A random tiny model has near-ties that different
    GEMM shapes (graph batches are padded to a power of two) can flip, so tokens are compared for one
    sequence (batch bucket 1: the same shapes as eager); a batch is checked to run through the graphs."""
    from spillover import LLM, SamplingParams
    from spillover.loading.source import random_source

    cfg = dict(model_type="llama", vocab_size=2000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    prompts = [list(range(10, 30)), list(range(50, 53)), list(range(100, 400))]
    graphs = LLM(random_source(cfg), dtype=dtype, device_map="cuda", max_batch_size=4, progress=False)
    eager = LLM(
        random_source(cfg),
        dtype=dtype,
        device_map="cuda",
        max_batch_size=4,
        cuda_graphs=False,
        progress=False,
    )
    assert graphs.generate(prompts[0], params).token_ids == eager.generate(prompts[0], params).token_ids
    outs = graphs.generate(prompts, params)
    assert [len(o.token_ids) for o in outs] == [40, 40, 40]
    assert sum(len(g.graphs) for g in graphs.engine.runner.graphs.values()) >= 2


def test_decode_graphs_share_one_capture_stream_and_its_cublas_workspace():
    """cuBLAS keeps a workspace per stream (32 MiB on Hopper) inside torch's allocator: all decode graphs of a
    GPU are captured on one stream, so 16 graphs add one workspace, not 16 (the plan counts no more)."""
    from spillover import LLM, SamplingParams
    from spillover.loading.source import random_source

    cfg = dict(model_type="llama", vocab_size=2000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
    llm = LLM(random_source(cfg), dtype="bf16", device_map="cuda", max_batch_size=8, max_seq_len=2048,
              cuda_graphs=False, progress=False)  # fmt: skip
    runner = llm.engine.runner
    llm.generate(
        list(range(10, 40)), SamplingParams(max_tokens=2, ignore_eos=True)
    )  # main stream's workspace
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    from spillover.engine.graphs import DecodeGraphs

    graphs = DecodeGraphs(runner, ("cuda:0", 0, cfg["num_hidden_layers"]))
    assert graphs.capture_all(8, 2048) == 16  # batches 1..8 x contexts 256..2048
    torch.cuda.synchronize()
    assert len(runner.graph_streams) == 1
    assert torch.cuda.memory_allocated() - before < 48 << 20


def test_graph_batch_and_overlap_match_eager_logprobs():
    """A padded batch through the graphs, with overlapped steps, gives the eager synchronous batch: in f32 the
    greedy tokens are equal and the logprobs agree closely."""
    from spillover import LLM, SamplingParams
    from spillover.loading.source import random_source

    cfg = dict(model_type="llama", vocab_size=2000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    prompts = [list(range(10, 30)), list(range(50, 53)), list(range(100, 400))]
    fast = LLM(random_source(cfg), dtype="f32", device_map="cuda", max_batch_size=4, progress=False)
    slow = LLM(random_source(cfg), dtype="f32", device_map="cuda", cuda_graphs=False, progress=False)
    slow.engine.overlap = False
    assert fast.engine.overlap
    fast_out, slow_out = fast.generate(prompts, params), slow.generate(prompts, params)
    assert [o.token_ids for o in fast_out] == [o.token_ids for o in slow_out]
    for f, s in zip(fast_out, slow_out, strict=True):
        assert max(abs(a.logprob - b.logprob) for a, b in zip(f.logprobs, s.logprobs, strict=True)) < 1e-3
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)  # no logprobs: deferred steps
    assert [o.token_ids for o in fast.generate(prompts, greedy)] == [o.token_ids for o in slow_out]
    assert sum(len(g.graphs) for g in fast.engine.runner.graphs.values()) >= 1


def test_graphs_captured_up_front_serve_every_step():
    from spillover import LLM, SamplingParams
    from spillover.loading.source import random_source

    cfg = dict(model_type="llama", vocab_size=2000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
    llm = LLM(random_source(cfg), dtype="bf16", device_map="cuda", max_batch_size=4, max_seq_len=1024,
              progress=False)  # fmt: skip
    runner = llm.engine.runner
    # LLM() captured every bucket of the mapping sizes: batch 1, 2, 4 x context 256, 512, 1024
    assert llm.graphs_captured == 3 * 3
    assert sum(len(g.graphs) for g in runner.graphs.values()) == 9
    assert runner.capture_graphs(4, 1024) == 0
    prompts = [list(range(10, 10 + n)) for n in (5, 200, 300)]
    llm.generate(prompts, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    assert sum(len(g.graphs) for g in runner.graphs.values()) == 9  # nothing captured on the way


def test_steps_past_the_planned_buckets_run_eagerly_and_capture_nothing():
    """Five sequences on a plan for two (the scheduler admits them while the KV pool has room): the steps of
    3-5 sequences run eagerly instead of capturing graphs the pool was not planned for, with the tokens of a
    run without graphs (f32); and their logits come in slices of the plan's rows."""
    from spillover import LLM, SamplingParams
    from spillover.loading.source import random_source

    cfg = dict(model_type="llama", vocab_size=2000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
    llm = LLM(
        random_source(cfg), dtype="f32", device_map="cuda", max_batch_size=2, max_seq_len=512, progress=False
    )
    eager = LLM(random_source(cfg), dtype="f32", device_map="cuda", max_batch_size=2, max_seq_len=512,
                cuda_graphs=False, progress=False)  # fmt: skip
    runner = llm.engine.runner
    assert llm.graphs_captured == 2 * 2  # batch 1, 2 x context 256, 512
    runner.sampler_rows = 2  # the plan's slices are 64 / 8 rows: make five sequences span several
    prompts = [list(range(10 + i, 30 + 7 * i)) for i in range(5)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert sum(len(g.graphs) for g in runner.graphs.values()) == 4
    assert all(g.top == (2, 512) for g in runner.graphs.values())
    assert got == [o.token_ids for o in eager.generate(prompts, params)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpu_layer_split_with_overlap_matches_one_gpu():
    """Layers split over two GPUs (head on the second): hops, graphs per segment and overlapped steps give the
    one-GPU tokens (f32, where padding and device differences stay far below the gaps between logits)."""
    from spillover import LLM, SamplingParams
    from spillover.loading.source import random_source
    from spillover.placement.device_map import DeviceMap

    cfg = dict(model_type="llama", vocab_size=2000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)  # fmt: skip
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = [list(range(10, 30)), list(range(50, 53)), list(range(100, 400))]
    one = LLM(random_source(cfg), dtype="f32", device_map="cuda", progress=False)
    dmap = DeviceMap(layers=("cuda:0", "cuda:0", "cuda:1", "cuda:1"), embed="cuda:0", head="cuda:1")
    two = LLM(random_source(cfg), dtype="f32", device_map=dmap, progress=False)
    assert two.engine.overlap and len(two.engine.runner.graphs) == 2
    want = [o.token_ids for o in one.generate(prompts, params)]
    for _ in range(2):
        assert [o.token_ids for o in two.generate(prompts, params)] == want
