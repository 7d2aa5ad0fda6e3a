"""Offload on a real CUDA device (side-stream copies, events, pinned memory): parity with the all-on-GPU run.
Run on the GPU machine: python -m pytest -q -m gpu tests/test_offload_gpu.py"""

from __future__ import annotations

import pytest
import torch

from spillover import LLM, SamplingParams
from spillover.engine.offload import OffloadExecutor
from spillover.placement.device_map import DeviceMap

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PROMPTS = [[5, 17, 42, 7, 99, 3, 11], [8, 8, 21, 64, 102, 77]]


def _outputs(llm: LLM):
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=0, prompt_logprobs=True)
    return [(o.token_ids, [lp.logprob for lp in o.logprobs] + [x for x in o.prompt_logprobs if x is not None])
            for o in llm.generate(PROMPTS, params)]  # fmt: skip


def _close(a, b) -> None:
    for (ta, la), (tb, lb) in zip(a, b, strict=True):
        assert ta == tb
        assert torch.allclose(torch.tensor(la), torch.tensor(lb), atol=1e-3)


MAPS = {
    "streamed": (("cuda:0",) * 3, (1, 2)),
    "split": (("cuda:0", "cpu", "cuda:0"), (2,)),
    "cpu": (("cuda:0", "cpu", "cpu"), ()),
}


@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("promote_at", [None, 3])
def test_offload_maps_match_one_gpu(tiny_models, name, promote_at):
    path = str(tiny_models["llama"])
    ref = _outputs(LLM(path, device_map="cuda", dtype="f32", progress=False))
    layers, streamed = MAPS[name]
    dm = DeviceMap(layers, "cuda:0", "cuda:0", streamed=streamed)
    llm = LLM(path, device_map=dm, dtype="f32", progress=False)
    if promote_at is not None and streamed:
        llm.engine.runner.offload = OffloadExecutor(llm.model, dm, gpu_prefill_tokens=promote_at)
    assert llm.engine.runner.offload is not None
    _close(_outputs(llm), ref)
    for i in streamed:  # streamed weights stay in pinned host memory
        assert all(p.device.type == "cpu" and p.is_pinned() for p in llm.model.layers[i].parameters())
