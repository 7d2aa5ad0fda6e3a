"""Offload execution on the CPU: the streamer's bookkeeping and the KV window, with the CPU standing in for
the GPU (synchronous copies), against the plain single-device run. The real GPU run is benchmarks/offload.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from spillover import LLM, SamplingParams
from spillover.engine.offload import OffloadExecutor, WeightStreamer, layer_bytes, needs_executor
from spillover.placement import cost_model as C
from spillover.placement.device_map import DeviceMap

PROMPTS = [[5, 17, 42, 7, 99, 3, 11], [8, 8, 21, 64, 2 + 100, 77]]


def _outputs(llm: LLM) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=0, prompt_logprobs=True)
    outs = llm.generate(PROMPTS, params)
    return [(o.token_ids, [lp.logprob for lp in o.logprobs] + [x for x in o.prompt_logprobs if x is not None])
            for o in outs]  # fmt: skip


def _with_executor(
    path,
    streamed: tuple[int, ...],
    promote_at: int | None,
    buffers: int = 2,
    prefill_stream: str | None = None,
    bandwidths: C.Bandwidths | None = None,
):
    llm = LLM(str(path), device_map="cpu", dtype="f32", progress=False)
    n = llm.config.num_hidden_layers
    dmap = dataclasses.replace(DeviceMap.single("cpu", n), streamed=streamed, prefill_stream=prefill_stream)
    ex = OffloadExecutor(
        llm.model, dmap, gpu="cpu", gpu_prefill_tokens=promote_at, buffers=buffers, bandwidths=bandwidths
    )
    llm.engine.runner.offload = ex
    return llm, ex


@pytest.fixture(scope="module")
def reference(tiny_models):
    return _outputs(LLM(str(tiny_models["llama"]), device_map="cpu", dtype="f32", progress=False))


def _close(a, b) -> None:
    for (ta, la), (tb, lb) in zip(a, b, strict=True):
        assert ta == tb
        assert torch.allclose(torch.tensor(la), torch.tensor(lb), atol=1e-4)


@pytest.mark.parametrize("streamed", [(0, 1, 2), (1,), (0, 2)])
def test_streamed_layers_match_plain_run(tiny_models, reference, streamed):
    llm, ex = _with_executor(tiny_models["llama"], streamed, None)
    _close(_outputs(llm), reference)
    assert ex.streamer.copies > 0 and ex.steps["promoted"] == 0


def test_promoted_cpu_layers_use_a_kv_window_and_match(tiny_models, reference):
    # layer 1 is CPU-computed; steps of >= 3 tokens (the prefills) stream it with its K/V through a window,
    # decode steps compute it on the CPU from the K/V the prefill wrote back: both must agree
    llm, ex = _with_executor(tiny_models["llama"], (0, 2), 3)
    _close(_outputs(llm), reference)
    assert ex.steps["promoted"] >= 1 and ex.steps["split"] >= 1


def test_cpu_layers_streamed_for_prompts_only(tiny_models, reference):
    # no layer streamed every step, but the map keeps room to stream the CPU layers for prompts
    # (DeviceMap.prefill_stream): prefills promote all of them, decode computes them on the CPU
    llm, ex = _with_executor(tiny_models["llama"], (), 3, prefill_stream="cpu")
    assert ex.promote_at == 3 and ex.streamer is not None
    _close(_outputs(llm), reference)
    assert ex.steps["promoted"] >= 1 and ex.steps["split"] >= 1 and ex.streamer.copies > 0
    # without it the same threshold is ignored: nothing to stream into
    llm, ex = _with_executor(tiny_models["llama"], (), 3)
    assert ex.promote_at is None and ex.streamer is None


def test_promotion_counts_the_kv_windows_it_copies(tiny_models, reference):
    """Past the threshold a step is promoted only when the cost model, counting the K/V windows the promoted
    layers copy from CPU memory, says it pays: with a copy path far slower than the CPU no step is, with a
    fast one and a slow CPU every step is; both answer as the plain run."""
    slow_copies = C.Bandwidths(pinned_h2d_gbps=1e-6, cpu_gemv_gbps=1e3, cpu_tflops=1e3)
    llm, ex = _with_executor(tiny_models["llama"], (), 1, prefill_stream="cpu", bandwidths=slow_copies)
    _close(_outputs(llm), reference)
    assert ex.steps["promoted"] == 0 and ex.steps["split"] > 0
    slow_cpu = C.Bandwidths(pinned_h2d_gbps=1e3, host_mem_gbps=1e3, cpu_gemv_gbps=1e-6, cpu_tflops=1e-6)
    llm, ex = _with_executor(tiny_models["llama"], (), 1, prefill_stream="cpu", bandwidths=slow_cpu)
    _close(_outputs(llm), reference)
    assert ex.steps["promoted"] > 0 and ex.steps["split"] == 0


def test_one_buffer_still_correct(tiny_models, reference):
    llm, _ = _with_executor(tiny_models["llama"], (0, 1, 2), None, buffers=1)
    _close(_outputs(llm), reference)


def test_streamer_packs_and_restores_parameters(tiny_models):
    llm = LLM(str(tiny_models["llama"]), device_map="cpu", dtype="f32", progress=False)
    before = {n: p.clone() for n, p in llm.model.layers[1].named_parameters()}
    st = WeightStreamer(llm.model.layers, [1, 2], torch.device("cpu"), buffers=2)
    assert st.pinned_bytes >= layer_bytes(llm.model)[1] + layer_bytes(llm.model)[2]
    seen = {}

    class Seen(Exception):
        pass

    def hook(mod, args):  # noqa: ANN001, ANN202  # what the layer's forward would compute with
        seen.update({n: p.data_ptr() for n, p in mod.named_parameters()})
        raise Seen

    layer = llm.model.layers[1]
    handle = layer.register_forward_pre_hook(hook)
    with pytest.raises(Seen):
        st.run(1, layer, torch.randn(1, llm.config.hidden_size), None)
    handle.remove()
    staged = st.staging[st.holds.index(1)]
    lo, hi = staged.data_ptr(), staged.data_ptr() + staged.numel()
    assert seen and all(lo <= ptr < hi for ptr in seen.values())  # computed from the staging buffer
    for n, p in llm.model.layers[1].named_parameters():  # and put back afterwards, values intact
        assert isinstance(p, torch.nn.Parameter) and torch.equal(p, before[n])
    st.prefetch(2)
    st.prefetch(1)
    assert st.copies == 2  # layer 1 still held: no second copy


def test_needs_executor():
    assert not needs_executor(DeviceMap.single("cpu", 4))
    assert not needs_executor(DeviceMap.single("cuda:0", 4))
    assert needs_executor(DeviceMap(("cuda:0", "cpu"), "cuda:0", "cuda:0"))
    assert needs_executor(DeviceMap(("cuda:0", "cuda:0"), "cuda:0", "cuda:0", streamed=(1,)))
    assert needs_executor(DeviceMap(("cpu", "cpu"), "cpu", "cpu", prefill_stream="cuda:0"))


def test_offload_cpu_mode_matches_without_gpu(tiny_models, reference):
    # no GPU here: every mode degrades to the plain CPU run
    for mode in ("cpu", "stream", "auto"):
        llm = LLM(str(tiny_models["llama"]), dtype="f32", progress=False, offload=mode)
        assert llm.offload is None and not llm.device_map.streamed
        _close(_outputs(llm), reference)
