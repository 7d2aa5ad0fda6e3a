"""Qwen2.5-VL (tiny random config) against transformers: the image processor, prompt logprobs and greedy output
with 0, 1 and 2 images (f32, CPU); batching, chunked prefill and the prefix cache with images; bad inputs."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

from spillover import LLM, SamplingParams
from spillover.errors import ImageError, PromptTooLongError

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

IMG, START, END = 300, 302, 303  # image placeholder, vision start / end token ids of the tiny config

VISION = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3])  # fmt: skip
TEXT = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})  # fmt: skip


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    import transformers

    cfg = transformers.Qwen2_5_VLConfig(
        text_config=TEXT, vision_config=VISION, image_token_id=IMG, video_token_id=301,
        vision_start_token_id=START, vision_end_token_id=END,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random norms and biases too, so they are really tested
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name or "ln_q" in name else 0.0, 0.1)
    path = tmp_path_factory.mktemp("tiny_vl")
    model.save_pretrained(path)
    write_tokenizer(path)
    return path, model


CHAT = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %} <|vision_start|><|image_pad|><|vision_end|> "
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def write_tokenizer(path) -> None:
    """A word-level tokenizer: "t<i>" is token i; the Qwen chat tokens at the tiny config's ids."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    special = {2: "<|im_end|>", 3: "<|im_start|>", 4: "user", 8: "assistant", IMG: "<|image_pad|>",
               START: "<|vision_start|>", END: "<|vision_end|>"}  # fmt: skip
    vocab = {special.get(i, f"t{i}"): i for i in range(320)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([special[i] for i in (2, 3, IMG, START, END)])
    tok.save(str(path / "tokenizer.json"))
    cfg = {"chat_template": CHAT, "eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))


def image(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def prompt_with(n_images: int) -> list[int]:
    ids = [5, 6, 7]
    for i in range(n_images):
        ids += [START, IMG, END] + list(range(20 + i, 25 + i))
    return ids + [40, 41, 42]


def reference(model, ids: list[int], images: list, new: int = 8) -> tuple[list[float], list[int], list[int]]:
    """transformers: the expanded prompt, its prompt logprobs and `new` greedy tokens."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    kw = {}
    expanded = list(ids)
    if images:
        pv = Qwen2VLImageProcessorPil()(images=images, return_tensors="pt")
        counts = (pv["image_grid_thw"].prod(-1) // 4).tolist()
        expanded, k = [], 0
        for t in ids:
            expanded += [t] * (counts[k] if t == IMG else 1)
            k += t == IMG
        kw = dict(pixel_values=pv["pixel_values"], image_grid_thw=pv["image_grid_thw"])
    x = torch.tensor([expanded])
    kw["mm_token_type_ids"] = (x == IMG).int()
    with torch.no_grad():
        model.model.rope_deltas = None
        lp = torch.log_softmax(model(input_ids=x, **kw).logits[0].float(), -1)
        model.model.rope_deltas = None
        out = model.generate(x, **kw, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = [lp[i, expanded[i + 1]].item() for i in range(len(expanded) - 1)]
    return want, out[0, len(expanded) :].tolist(), expanded


@pytest.fixture(scope="module")
def llm(tiny_vl):
    return LLM(str(tiny_vl[0]), dtype="f32", progress=False, max_seq_len=1024)


PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, prompt_logprobs=True)


def test_image_processor_equals_transformers(tiny_vl, llm):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ref = Qwen2VLImageProcessorPil()
    cases = [image(100, 60, 1), image(333, 517, 2, "RGBA"), image(1200, 900, 3), image(40, 30, 4, "L"),
             image(2000, 2100, 5, "P")]  # fmt: skip
    for img in cases:
        r = ref(images=[img], return_tensors="pt")
        ours = llm.image_processor(img)
        assert list(ours.grid) == r["image_grid_thw"][0].tolist()
        assert (ours.pixels - r["pixel_values"]).abs().max().item() < 1e-5


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_logprobs_and_greedy_match_transformers(tiny_vl, llm, n_images):
    images = [image(100, 60, 1), image(90, 150, 2)][:n_images]
    ids = prompt_with(n_images)
    want, greedy, expanded = reference(tiny_vl[1], ids, images)
    got = llm.generate(ids, PARAMS, images=images)
    assert got.prompt_logprobs[0] is None and len(got.prompt_logprobs) == len(expanded)
    assert max(abs(a - b) for a, b in zip(got.prompt_logprobs[1:], want, strict=True)) < 1e-4
    assert got.token_ids == greedy


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(img: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_chat_image_parts_equal_token_prompts(llm, tmp_path):
    """data: URL, file:// URL, a path and a PIL image give the prompt the template + images give."""
    img = image(120, 80, 7)
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(img))
    want = llm.generate([3, 4, START, IMG, END, 9, 10, 2, 3, 8], GREEDY, images=[img]).token_ids
    for part in (
        {"type": "image_url", "image_url": {"url": data_url(img)}},
        {"type": "image_url", "image_url": {"url": f"file://{path}"}},
        {"type": "image_url", "image_url": {"url": str(path)}},
        {"type": "image", "image": img},
    ):
        msgs = [{"role": "user", "content": [part, {"type": "text", "text": "t9 t10"}]}]
        assert llm.chat(msgs, GREEDY).token_ids == want


def test_image_requests_batch_with_text_requests(llm):
    prompts = [prompt_with(1), list(range(10, 40)), prompt_with(2), prompt_with(0)]
    images = [[image(100, 60, 1)], [], [image(90, 150, 2), image(64, 64, 3)], []]
    alone = [llm.generate(p, GREEDY, images=im).token_ids for p, im in zip(prompts, images, strict=True)]
    together = [o.token_ids for o in llm.generate(prompts, GREEDY, images=images)]
    assert together == alone


def test_chunked_prefill_cuts_through_image_tokens(tiny_vl):
    ids, images = prompt_with(2), [image(100, 60, 1), image(90, 150, 2)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, prompt_logprobs=True)
    one = LLM(str(tiny_vl[0]), dtype="f32", progress=False).generate(ids, params, images=images)
    small = LLM(str(tiny_vl[0]), dtype="f32", progress=False)
    small.engine.scheduler.max_batched_tokens = 5  # chunks end inside both images' 8 and 15 tokens
    chunked = small.generate(ids, params, images=images)
    assert chunked.token_ids == one.token_ids
    diffs = [abs(a - b) for a, b in zip(chunked.prompt_logprobs[1:], one.prompt_logprobs[1:], strict=True)]
    assert max(diffs) < 1e-5


def test_prefix_cache_keys_on_image_content(tiny_vl):
    """Same text, different images: no shared block; the same image again: its blocks are shared."""
    llm = LLM(str(tiny_vl[0]), dtype="f32", progress=False)
    ids = [5] * 3 + [START, IMG, END] + list(range(20, 60))  # the image's 16 tokens span whole blocks
    a, b = image(112, 112, 11), image(112, 112, 12)

    def run(
        engine_of: LLM, img: Image.Image
    ) -> tuple[int, list[int]]:  # (prompt tokens from the cache, output)
        prompt, mm = engine_of.prepare_images(ids, [img])
        state = engine_of.engine.add_request(prompt, GREEDY, mm=mm)
        while not state.seq.is_finished:
            engine_of.engine.step()
        return state.seq.num_cached_prompt, state.seq.output_ids

    _, first = run(llm, a)
    cached, other = run(llm, b)
    assert cached == 0
    assert other == run(LLM(str(tiny_vl[0]), dtype="f32", progress=False), b)[1]  # from its own image
    cached, again = run(llm, a)
    assert cached >= 16 and again == first


def test_bad_images_are_clear_errors_and_lose_nothing(llm, tmp_path, smollm2):
    bad = tmp_path / "bad.png"
    bad.write_bytes(png_bytes(image(50, 50, 1))[:60])  # truncated
    cases = [
        ({"url": str(bad)}, "not a readable image"),
        (
            {"url": "data:image/png;base64," + base64.b64encode(b"plain text").decode()},
            "not a readable image",
        ),
        ({"url": "data:text/plain;base64,aGVsbG8="}, "data:image/"),
        ({"url": "https://example.com/cat.png"}, "remote image URLs are not fetched"),
        ({"url": str(tmp_path / "missing.png")}, "cannot read the image file"),
    ]
    for url, message in cases:
        msgs = [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": url}, {"type": "text", "text": "t9"}],
            }
        ]
        good = [{"role": "user", "content": "t9 t10"}]
        with pytest.raises(ImageError, match=message):
            llm.chat([good, msgs], GREEDY)
        assert not llm.engine.requests and not llm.engine.has_work()  # the good one was not left behind
    assert llm.chat([{"role": "user", "content": "t9 t10"}], GREEDY).token_ids  # the engine still serves
    with pytest.raises(ImageError, match="2 image placeholders but 1 images"):
        llm.generate(prompt_with(2), GREEDY, images=[image(50, 50, 1)])
    text_only = LLM(smollm2, progress=False)
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image(50, 50, 1)}, {"type": "text", "text": "hi"}],
        }
    ]
    with pytest.raises(ImageError, match="takes no images"):
        text_only.chat(msgs, GREEDY)


# ------------------------------------------------------------------ the plan (pure functions, no weights)

QWEN25_VL_7B = {
    "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"], "vocab_size": 152064,
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": False,
    "image_token_id": 151655,
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                      "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
}  # fmt: skip


def plan_7b(gpu_gib: float, images: int = 1, edge: int = 1024, batch: int = 1):
    from spillover.config import AutoDeviceMapParams
    from spillover.models import model_class
    from spillover.placement.estimate import GiB
    from spillover.placement.planner import make_budget, plan_model

    cfg = model_class("qwen2_5_vl").config_from_hf(QWEN25_VL_7B)
    budgets = (make_budget("cuda:0", int(gpu_gib * GiB)), make_budget("cpu", 256 * GiB))
    params = AutoDeviceMapParams(max_seq_len=4096, max_batch_size=batch, max_num_images=images,
                                 max_image_length=edge)  # fmt: skip
    return plan_model(cfg, params, budgets, "bf16", offload="cpu")


def test_plan_puts_the_tower_on_the_gpu_first():
    whole = plan_7b(40)
    assert whole.fits and whole.device_map.vision == "cuda:0" and whole.device_map.is_single_device()
    v = whole.vision
    assert v["device"] == "cuda:0" and v["tokens"] == 1369  # 1024 px -> 1036 x 1036 -> 74 x 74 / 4
    assert 1.2e9 < v["weight_bytes"] < 1.4e9  # the 7B's tower + merger in bf16 (~675M parameters)
    tight = plan_7b(14)
    dm = tight.device_map
    assert tight.fits and dm.vision == "cuda:0" and dm.layers_on("cpu")  # text layers spill, not the tower
    assert tight.row("cuda:0").has_vision and not tight.row("cpu").has_vision


def test_larger_image_parameters_move_text_layers_never_the_tower():
    gpu_layers = []
    for images, edge, batch in [(1, 256, 1), (1, 1024, 1), (4, 1024, 2), (8, 1024, 4)]:
        plan = plan_7b(14, images, edge, batch)
        assert plan.fits and plan.device_map.vision == "cuda:0"
        gpu_layers.append(len(plan.device_map.layers_on("cuda:0")))
        assert plan.vision["kv_cache_bytes"] > 0 and plan.vision["activation_bytes"] > 0
    assert gpu_layers == sorted(gpu_layers, reverse=True) and gpu_layers[0] > gpu_layers[-1]


def test_plan_table_and_json_show_the_vision_stage():
    from rich.console import Console

    from spillover.placement.report import plan_table, plan_to_json

    plan = plan_7b(14, 2, 1024, 2)
    doc = plan_to_json(plan)
    assert doc["vision"]["device"] == "cuda:0" and doc["vision"]["images"] == 2
    assert {"stage": "vision", "device": "cuda:0", "weights": "cuda:0"} in doc["stages"]
    assert [d["vision"] for d in doc["devices"]] == [True, False]
    console = Console(width=200, record=True)
    console.print(plan_table(plan))
    text = console.export_text()
    assert "vision" in text and "tower + projector on cuda:0" in text


# ------------------------------------------------------------------ the server, with the real openai client


def test_server_image_url_parts(tiny_vl, llm, smollm2):
    import asyncio

    import openai
    from test_server import Server

    from spillover.engine.async_engine import AsyncLLM
    from spillover.server.app import create_app

    img = image(120, 80, 7)
    content = [{"type": "image_url", "image_url": {"url": data_url(img)}}, {"type": "text", "text": "t9 t10"}]
    want = llm.chat([{"role": "user", "content": content}], GREEDY).text
    served = AsyncLLM(LLM(str(tiny_vl[0]), dtype="f32", progress=False))
    server = Server(create_app(served, api_key=""))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        kw = dict(model="x", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        model = client.models.list().data[0].id
        kw["model"] = model
        r = client.chat.completions.create(messages=[{"role": "user", "content": content}], **kw)
        assert r.choices[0].message.content == want
        assert r.usage.prompt_tokens == len(llm.chat_prompt([{"role": "user", "content": content}])[0])
        bad = {
            "https://example.com/cat.png": "remote image URLs are not fetched",
            "data:image/png;base64," + base64.b64encode(b"not a png").decode(): "not a readable image",
            "data:text/plain;base64,aGVsbG8=": "data:image/",
        }

        async def burst(url: str) -> list:
            async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as c:
                msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
                good = [{"role": "user", "content": content}]
                return await asyncio.gather(
                    c.chat.completions.create(messages=good, **kw),
                    c.chat.completions.create(messages=msgs, **kw),
                    c.chat.completions.create(messages=[{"role": "user", "content": "t5 t6"}], **kw),
                    return_exceptions=True,
                )

        for url, message in bad.items():
            ok, err, text = asyncio.run(burst(url))
            assert isinstance(err, openai.BadRequestError) and message in str(err)
            assert ok.choices[0].message.content == want and text.choices[0].message.content
    finally:
        server.stop()
        served.shutdown()
    text_only = AsyncLLM(LLM(smollm2, progress=False))
    server = Server(create_app(text_only, api_key=""))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="takes no images"):
            client.chat.completions.create(
                model=client.models.list().data[0].id, messages=[{"role": "user", "content": content}]
            )
    finally:
        server.stop()
        text_only.shutdown()


# ------------------------------------------------------------------ the CLI


def test_cli_run_image(tiny_vl, llm, tmp_path):
    from test_cli_run import spillover

    img = image(120, 80, 7)
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(img))
    content = [{"type": "image", "image": img}, {"type": "text", "text": "t9 t10"}]
    want = llm.chat([{"role": "user", "content": content}], GREEDY).text
    common = ("-m", str(tiny_vl[0]), "--dtype", "f32", "--max-tokens", "6", "--temperature", "0")
    r = spillover("run", *common, "--image", str(path), "-p", "t9 t10")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want.strip()
    r = spillover(
        "run", *common, "-i", stdin=f"/image {path}\nt9 t10\n/image {tmp_path / 'nope.png'}\n/exit\n"
    )
    assert r.returncode == 0, r.stderr
    assert want.strip() in r.stdout and "cannot read the image file" in r.stderr
    r = spillover("run", *common, "--image", str(tmp_path / "nope.png"), "-p", "t9")
    assert r.returncode != 0 and "error: cannot read the image file" in r.stderr


def test_huge_image_is_resized_and_isq_leaves_the_tower_alone(tiny_vl):
    """A 4000 x 3000 image is resized to the processor's pixel range; its 1230 tokens exceed the tiny model's
    context: a clear error. With --isq 8 the text layers' projections are quantized, the tower's are not,
    and the greedy answer equals the unquantized one."""
    llm = LLM(str(tiny_vl[0]), dtype="f32", progress=False, isq=8)
    big = image(4000, 3000, 9)
    ids, mm = llm.prepare_images(prompt_with(1), [big])
    _, gh, gw = mm.grids[0]
    assert gh * gw * 14 * 14 <= 28 * 28 * 1280 and len(ids) == len(prompt_with(1)) - 1 + gh * gw // 4
    assert type(llm.model.layers[0].self_attn.qkv_proj) is not torch.nn.Linear  # quantized
    assert type(llm.model.visual.blocks[0].attn.qkv) is torch.nn.Linear  # not quantized
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    with pytest.raises(PromptTooLongError, match="1243 tokens but the model's context is 1024"):
        llm.generate(prompt_with(1), params, images=[big])  # a clear error, and nothing left queued
    assert not llm.engine.has_work()
    plain = LLM(str(tiny_vl[0]), dtype="f32", progress=False)
    small = [image(100, 60, 1)]
    want = plain.generate(prompt_with(1), params, images=small).token_ids
    assert llm.generate(prompt_with(1), params, images=small).token_ids == want


def test_a_tower_out_of_memory_refuses_that_request_only(tiny_vl, monkeypatch):
    """Images are encoded when a request is added: a tower that runs out of memory refuses that request with
    a clear error, and the requests already running finish as they would alone."""
    llm = LLM(str(tiny_vl[0]), dtype="f32", progress=False)
    want = llm.generate(prompt_with(1), GREEDY, images=[image(100, 60, 1)]).token_ids
    prompt, mm = llm.prepare_images(prompt_with(1), [image(100, 60, 1)])
    running = llm.engine.add_request(prompt, GREEDY, mm=mm)
    llm.engine.step()
    real = llm.model.encode_images

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(llm.model, "encode_images", oom)
    bad, bad_mm = llm.prepare_images(prompt_with(2), [image(90, 150, 2), image(64, 64, 3)])
    with pytest.raises(ImageError, match="ran out of GPU memory"):
        llm.engine.add_request(bad, GREEDY, mm=bad_mm)
    monkeypatch.setattr(llm.model, "encode_images", real)
    while not running.seq.is_finished:
        llm.engine.step()
    assert running.seq.output_ids == want and not llm.engine.scheduler.has_work()
