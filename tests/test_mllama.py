"""Llama 3.2 Vision (mllama, tiny random config) against transformers: the image processor, prompt logprobs and
greedy output with 0, 1 and 2 images (f32, CPU); image requests batched with text ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spillover import LLM, SamplingParams

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

IMG = 300
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TEXT = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0,
            cross_attention_layers=[1, 3], bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
VISION = dict(hidden_size=32, attention_heads=2, num_hidden_layers=4, num_global_layers=2, intermediate_size=48,
              image_size=28, patch_size=14, max_num_tiles=4, intermediate_layers_indices=[1, 3],
              vision_output_dim=96)  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import transformers

    cfg = transformers.MllamaConfig(text_config=TEXT, vision_config=VISION, image_token_index=IMG)
    torch.manual_seed(0)
    model = transformers.MllamaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random norms, biases and gates too, so they are really tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)
            elif name.endswith("bias") or "gate" in name or "embedding" in name:
                p.normal_(0.0, 0.5 if "gate" in name else 0.1)
    path = tmp_path_factory.mktemp("tiny_mllama")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def llm(tiny):
    return LLM(str(tiny[0]), dtype="f32", progress=False)


def image(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def ref_processor():
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaImageProcessorPil(size={"height": 28, "width": 28}, image_mean=CLIP_MEAN, image_std=CLIP_STD)


def reference(model, ids: list[int], images: list, new: int = 8) -> tuple[list[float], list[int]]:
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    x = torch.tensor([ids])
    kw = {}
    if images:
        pv = ref_processor()(images=[images], return_tensors="pt")
        mask = convert_sparse_cross_attention_mask_to_dense(
            [get_cross_attention_token_mask(ids, IMG)], pv["num_tiles"], 4, len(ids)
        )
        kw = dict(pixel_values=pv["pixel_values"], aspect_ratio_ids=pv["aspect_ratio_ids"],
                  aspect_ratio_mask=pv["aspect_ratio_mask"], cross_attention_mask=torch.tensor(mask))  # fmt: skip
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=x, **kw).logits[0].float(), -1)
        out = model.generate(x, **kw, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)], out[0, len(ids) :].tolist()


def prompt_with(n: int, consecutive: bool = False) -> list[int]:
    if consecutive:
        return [5, 6] + [IMG] * n + list(range(20, 30))
    ids = [5, 6, 7]
    for i in range(n):
        ids += [IMG] + list(range(20 + i, 26 + i))
    return ids + [40, 41]


PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, prompt_logprobs=True)


def test_image_processor_equals_transformers(llm):
    ref = ref_processor()
    for img in [image(100, 60, 1), image(20, 90, 2, "RGBA"), image(50, 50, 3), image(200, 30, 4, "L")]:
        r = ref(images=[[img]], return_tensors="pt")
        ours = llm.image_processor(img)
        n = int(r["num_tiles"][0][0])
        assert ours.grid[0] == int(r["aspect_ratio_ids"][0, 0]) and ours.grid[1] * ours.grid[2] == n
        assert (ours.pixels - r["pixel_values"][0, 0]).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", ["none", "one", "two", "two-consecutive"])
def test_logprobs_and_greedy_match_transformers(tiny, llm, case):
    n = {"none": 0, "one": 1, "two": 2, "two-consecutive": 2}[case]
    images = [image(100, 60, 1), image(40, 90, 2)][:n]
    ids = prompt_with(n, case == "two-consecutive")
    want, greedy = reference(tiny[1], ids, images)
    got = llm.generate(ids, PARAMS, images=images)
    assert max(abs(a - b) for a, b in zip(got.prompt_logprobs[1:], want, strict=True)) < 1e-4
    assert got.token_ids == greedy


def test_image_requests_batch_with_text_requests(llm):
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [prompt_with(1), list(range(10, 40)), prompt_with(2)]
    images = [[image(100, 60, 1)], [], [image(40, 90, 2), image(64, 64, 3)]]
    alone = [llm.generate(p, greedy, images=im).token_ids for p, im in zip(prompts, images, strict=True)]
    assert [o.token_ids for o in llm.generate(prompts, greedy, images=images)] == alone


def test_the_image_changes_the_answer(llm):
    """The cross layers really read the image: another image gives other prompt logprobs."""
    ids = prompt_with(1)
    a = llm.generate(ids, PARAMS, images=[image(100, 60, 1)]).prompt_logprobs
    b = llm.generate(ids, PARAMS, images=[image(100, 60, 2)]).prompt_logprobs
    assert max(abs(x - y) for x, y in zip(a[5:], b[5:], strict=True)) > 1e-3


LLAMA_32_11B_VISION = {
    "model_type": "mllama", "architectures": ["MllamaForConditionalGeneration"], "image_token_index": 128256,
    "text_config": {"model_type": "mllama_text_model", "vocab_size": 128256, "hidden_size": 4096,
                    "intermediate_size": 14336, "num_hidden_layers": 40, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "max_position_embeddings": 131072, "rope_theta": 500000.0,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                    "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "rms_norm_eps": 1e-5},
    "vision_config": {"hidden_size": 1280, "attention_heads": 16, "num_hidden_layers": 32, "num_global_layers": 8,
                      "intermediate_size": 5120, "image_size": 560, "patch_size": 14, "max_num_tiles": 4,
                      "intermediate_layers_indices": [3, 7, 15, 23, 30], "vision_output_dim": 7680},
}  # fmt: skip


def test_plan_11b_vision_tower_first_and_cross_kv_per_image():
    """The documented example (--isq 4 --max-seq-len 4096 --max-batch-size 2 --max-num-images 2): the tower on
    the GPU, text layers spill on a small GPU, and more images move more layers off it, never the tower."""
    from spillover.config import AutoDeviceMapParams
    from spillover.models import model_class
    from spillover.placement.estimate import GiB
    from spillover.placement.planner import make_budget, plan_model

    cfg = model_class("mllama").config_from_hf(LLAMA_32_11B_VISION)
    budgets = (make_budget("cuda:0", 8 * GiB), make_budget("cpu", 256 * GiB))
    on_gpu = []
    for images in (1, 2, 8):
        params = AutoDeviceMapParams(max_seq_len=4096, max_batch_size=2, max_num_images=images)
        plan = plan_model(cfg, params, budgets, "bf16", isq=4, offload="cpu")
        assert plan.fits and plan.device_map.vision == "cuda:0" and plan.device_map.layers_on("cpu")
        assert 1.6e9 < plan.vision["weight_bytes"] < 2.0e9  # the 11B's vision model + projector, bf16
        cross = 8 * 2 * 2 * images * 4 * 1601 * 8 * 128 * 2  # 8 layers x batch x K,V x tokens x kv heads x hd
        assert cross <= plan.vision["kv_cache_bytes"] < cross + (8 << 20)  # + the <|image|> tokens' text KV
        on_gpu.append(len(plan.device_map.layers_on("cuda:0")))
    assert on_gpu[0] >= on_gpu[1] >= on_gpu[2] and on_gpu[0] > on_gpu[2]


def test_chunked_prefill_equals_one_pass(tiny):
    ids, images = prompt_with(2), [image(100, 60, 1), image(40, 90, 2)]
    one = LLM(str(tiny[0]), dtype="f32", progress=False).generate(ids, PARAMS, images=images)
    small = LLM(str(tiny[0]), dtype="f32", progress=False)
    small.engine.scheduler.max_batched_tokens = 4  # chunks start before, at and after each image token
    chunked = small.generate(ids, PARAMS, images=images)
    assert chunked.token_ids == one.token_ids
    diffs = [abs(a - b) for a, b in zip(chunked.prompt_logprobs[1:], one.prompt_logprobs[1:], strict=True)]
    assert max(diffs) < 1e-5


def test_cross_layers_get_their_own_segments_so_the_rest_can_decode_in_graphs(llm):
    """mllama's cross-attention layers cannot be captured (per-sequence image K/V); each becomes its own
    segment, and the runs of self-attention layers between them stay capturable (engine/runner.py)."""
    from spillover.engine.runner import layer_segments
    from spillover.placement.device_map import DeviceMap

    dm = DeviceMap(("cuda:0",) * 3 + ("cpu",) * 3 + ("cuda:0",) * 2, "cuda:0", "cuda:0")
    assert layer_segments(dm, frozenset({1, 4, 6})) == [
        ("cuda:0", 0, 1), ("cuda:0", 1, 2), ("cuda:0", 2, 3), ("cpu", 3, 6), ("cuda:0", 6, 7), ("cuda:0", 7, 8),
    ]  # fmt: skip
    assert layer_segments(dm) == [("cuda:0", 0, 3), ("cpu", 3, 6), ("cuda:0", 6, 8)]
    eager = {i for i, layer in enumerate(llm.model.layers) if not getattr(layer, "graph_safe", True)}
    assert eager == set(llm.model.config.extra["cross_attention_layers"])  # what the runner splits at
