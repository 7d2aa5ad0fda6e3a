"""Qwen2.5-VL from GGUF as llama.cpp ships it: a `qwen2vl` text GGUF + an mmproj GGUF (`clip`, qwen2.5vl_merger),
written from a tiny random transformers model with conftest.write_qwen2vl_gguf_pair (convert_hf_to_gguf's layout,
f32). Prompt logprobs and greedy tokens against transformers on the original model with 0, 1 and 2 images; a
wrong layout is noticed; pairing (--mmproj, beside the text file, --no-mmproj), the plan's vision row, the CLI and
the server; errors for files that do not fit."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import write_qwen2vl_gguf_pair
from test_vision import END, GREEDY, IMG, PARAMS, START, TEXT, VISION, data_url, image, prompt_with, reference

from spillover import LLM
from spillover.errors import ImageError, ModelLoadError

pytest.importorskip("gguf")
pytest.importorskip("PIL")

# llama.cpp assumes a 112 px window (clip.cpp; the mmproj does not record it): the model is made with it, and
# the images below are large enough for several windows (and partial ones) per image
VISION_112 = {**VISION, "window_size": 112}
IMAGES = [image(250, 180, 1), image(140, 300, 2)]  # 9 x 6 and 5 x 11 merged tokens: 3 x 2 and 2 x 3 windows
CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)


def tokens() -> list[str]:
    special = {2: "<|im_end|>", 3: "<|im_start|>", IMG: "<|image_pad|>", START: "<|vision_start|>", END: "<|vision_end|>"}  # fmt: skip
    return [special.get(i, f"<t{i}>") for i in range(TEXT["vocab_size"])]


@pytest.fixture(scope="module")
def hf_vl():
    import transformers

    cfg = transformers.Qwen2_5_VLConfig(
        text_config=TEXT, vision_config=VISION_112, image_token_id=IMG, video_token_id=301,
        vision_start_token_id=START, vision_end_token_id=END,
    )  # fmt: skip
    torch.manual_seed(1)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random norms and biases too, so they are really tested
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name or name.endswith("bias"):
                p.normal_(1.0 if "norm" in name or "ln_q" in name else 0.0, 0.1)
            elif name.startswith("model.visual."):  # a tower whose attention is sharp (not near uniform) and
                p.normal_(0.0, 0.25)  # whose output moves the text model: a layout error cannot hide in it
    return model


def write_pair(
    model, d, layout: str = "llama.cpp", text: str = "Tiny-VL-F32.gguf", proj: str = "mmproj-Tiny-VL-f32.gguf",
    mmproj_type: str = "f32", text_type: str = "f32",
):  # noqa: ANN001, ANN201  # fmt: skip
    d.mkdir(parents=True, exist_ok=True)
    write_qwen2vl_gguf_pair(model, d / text, d / proj, tokens(), CHAT, layout, mmproj_type, text_type)
    return d / text, d / proj


@pytest.fixture(scope="module")
def pair(hf_vl, tmp_path_factory):
    # names that pair with nothing by themselves: only --mmproj brings the tower
    return write_pair(hf_vl, tmp_path_factory.mktemp("gguf"), text="model.gguf", proj="vision.gguf")


@pytest.fixture(scope="module")
def llm(pair):
    return LLM(str(pair[0]), mmproj=str(pair[1]), dtype="f32", progress=False, max_seq_len=1024)


@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_gguf_pair_matches_transformers(hf_vl, llm, n_images):
    images = IMAGES[:n_images]
    ids = prompt_with(n_images)
    want, greedy, expanded = reference(hf_vl, ids, images)
    got = llm.generate(ids, PARAMS, images=images)
    assert len(got.prompt_logprobs) == len(expanded)
    assert max(abs(a - b) for a, b in zip(got.prompt_logprobs[1:], want, strict=True)) < 1e-4
    assert got.token_ids == greedy


def test_the_source_reads_llama_cpp_names_and_the_tower_shape(llm, pair):
    src = llm.source
    v = src.config.extra["vision"]
    assert src.mmproj == str(pair[1]) and src.config.model_type == "qwen2_5_vl"
    assert (
        v["fullatt_block_indexes"] == (1, 3) and v["window_size"] == 112 and v["gguf"]
    )  # from n_wa_pattern 2
    assert src.config.rope_scaling["mrope_section"] == [2, 3, 3]  # rope.dimension_sections [2, 3, 3, 0]
    assert src.tensors["visual.patch_embed.proj.frame1.weight"].shape == (32, 3, 14, 14)
    assert src.tensors["visual.blocks.3.attn.k.bias"].shape == (32,)
    assert llm.model.visual.patch_embed.proj.weight.shape == (32, 3, 2, 14, 14)
    assert llm.config.extra["image_token_id"] == IMG


def tower_outputs(hf_vl, ours: LLM, images: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The image embeddings (the merger's output, every image) of transformers and of `ours`, from the same
    pixels (transformers' processor)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pv = Qwen2VLImageProcessorPil()(images=images, return_tensors="pt")
    grid = pv["image_grid_thw"]
    with torch.no_grad():
        want = hf_vl.model.visual(pv["pixel_values"], grid_thw=grid).pooler_output
        sizes = grid.prod(-1).tolist()
        got = ours.model.encode_images(
            list(pv["pixel_values"].split(sizes)), [tuple(g) for g in grid.tolist()]
        )
    return want, got


def test_the_tower_from_the_mmproj_equals_transformers(hf_vl, llm):
    """The embeddings the text model receives, compared directly: the logprobs of a tiny random model move
    little with its images, so a tower that is slightly off must be caught here."""
    want, got = tower_outputs(hf_vl, llm, IMAGES)
    assert got.shape == want.shape == (54 + 55, 64)
    assert (got - want).abs().max().item() < 1e-5 * want.abs().max().item()


def test_an_f16_mmproj_in_the_default_dtype(hf_vl, llm, tmp_path):
    """An mmproj as llama.cpp's repos ship it (f16 weights, f32 norms and biases), the model in its default
    dtype (f32 on a CPU; the GGUF's native mode): the tower within f16's rounding of transformers'."""
    text, proj = write_pair(hf_vl, tmp_path, proj="mmproj-Tiny-VL-f16.gguf", mmproj_type="f16")
    half = LLM(str(text), progress=False, max_seq_len=1024)
    assert (
        half.source.mmproj == str(proj)
        and half.source.tensors["visual.blocks.0.attn.q.weight"].dtype == "f16"
    )
    want, got = tower_outputs(hf_vl, half, IMAGES)
    assert (got - want).abs().max().item() < 2e-3 * want.abs().max().item()  # measured 4.9e-4
    want_lp, _, _ = reference(hf_vl, prompt_with(2), IMAGES)
    got_lp = half.generate(prompt_with(2), PARAMS, images=IMAGES).prompt_logprobs[1:]
    assert max(abs(a - b) for a, b in zip(got_lp, want_lp, strict=True)) < 2e-3  # measured 1.6e-4


def test_a_q8_0_text_gguf_in_the_default_mode(hf_vl, tmp_path):
    """The text file quantized (Q8_0 projections), run in a GGUF's default CPU mode (the blocks kept, the C
    kernels; decode positions after an image are p + delta): equal to the same files dequantized to f32."""
    text, proj = write_pair(hf_vl, tmp_path, text="Tiny-VL-Q8_0.gguf", text_type="q8_0")
    native = LLM(str(text), progress=False, max_seq_len=1024)
    exact = LLM(str(text), dtype="f32", progress=False, max_seq_len=1024)
    assert native.native and native.source.mmproj == str(proj)
    for n in (0, 2):
        a = native.generate(prompt_with(n), PARAMS, images=IMAGES[:n])
        b = exact.generate(prompt_with(n), PARAMS, images=IMAGES[:n])
        assert a.token_ids == b.token_ids
        assert (
            max(abs(x - y) for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True)) < 1e-4
        )


def test_full_attention_blocks_from_the_metadata():
    """llama.cpp's period (`n_wa_pattern`: block i is full iff (i + 1) % n == 0, 0 = every block), or the list
    other converters write (`clip.vision.fullatt_block_indexes`, with `clip.vision.window_size`)."""
    from spillover.models import model_class

    arch = model_class("qwen2_5_vl")
    md = {"clip.vision.block_count": 32, "clip.vision.embedding_length": 1280, "clip.vision.feed_forward_length": 3420,
          "clip.vision.attention.head_count": 16, "clip.vision.projection_dim": 3584, "clip.vision.patch_size": 14}  # fmt: skip
    vision = arch.gguf_config(md | {"clip.vision.n_wa_pattern": 8}, "qwen2vl")["vision_config"]
    assert vision["fullatt_block_indexes"] == [7, 15, 23, 31] and vision["window_size"] == 112
    assert arch.gguf_config(md, "qwen2vl")["vision_config"]["fullatt_block_indexes"] == list(range(32))
    listed = md | {"clip.vision.fullatt_block_indexes": [3, 9], "clip.vision.window_size": 224}
    vision = arch.gguf_config(listed, "qwen2vl")["vision_config"]
    assert vision["fullatt_block_indexes"] == [3, 9] and vision["window_size"] == 224


@pytest.mark.parametrize("layout", ["qkv", "kernel_hw", "wa"])
def test_a_wrong_layout_is_noticed(hf_vl, tmp_path, layout):
    """The tests' sensitivity: q and k swapped, the patch kernels transposed, or the full-attention blocks read
    wrong each move the image embeddings and the prompt logprobs far outside the tolerances above."""
    text, proj = write_pair(hf_vl, tmp_path, layout)
    wrong = LLM(str(text), mmproj=str(proj), dtype="f32", progress=False, max_seq_len=1024)
    want, got = tower_outputs(hf_vl, wrong, IMAGES)
    assert (got - want).abs().max().item() > 1e-2 * want.abs().max().item()
    want_lp, _, _ = reference(hf_vl, prompt_with(1), IMAGES[:1])
    got_lp = wrong.generate(prompt_with(1), PARAMS, images=IMAGES[:1]).prompt_logprobs[1:]
    assert max(abs(a - b) for a, b in zip(got_lp, want_lp, strict=True)) > 1e-2


def test_projector_beside_the_text_model_and_no_mmproj(hf_vl, llm, tmp_path):
    """A single *mmproj*.gguf beside the text GGUF (as llama.cpp's -hf repos ship them) is paired, from the file
    or its directory; --no-mmproj (mmproj=False) loads the Qwen2 text model alone, which refuses images with
    a hint; several projectors: choose one."""
    text, proj = write_pair(hf_vl, tmp_path / "repo")
    want = llm.generate(prompt_with(1), GREEDY, images=IMAGES[:1]).token_ids
    for model in (text, text.parent):
        paired = LLM(str(model), dtype="f32", progress=False, max_seq_len=1024)
        assert paired.source.mmproj == str(proj)
        assert paired.generate(prompt_with(1), GREEDY, images=IMAGES[:1]).token_ids == want
    alone = LLM(str(text), mmproj=False, dtype="f32", progress=False)
    assert alone.config.model_type == "qwen2" and alone.source.mmproj is None
    text_want = llm.generate(prompt_with(0), PARAMS)
    text_got = alone.generate(prompt_with(0), PARAMS)
    assert text_got.token_ids == text_want.token_ids  # M-RoPE over text alone is plain rope
    assert max(abs(a - b) for a, b in zip(text_got.prompt_logprobs[1:], text_want.prompt_logprobs[1:], strict=True)) < 1e-5  # fmt: skip
    with pytest.raises(
        ImageError, match="takes no images without its projector: load the mmproj GGUF with --mmproj"
    ):
        alone.generate(prompt_with(1), GREEDY, images=IMAGES[:1])
    shutil.copy(proj, tmp_path / "repo" / "mmproj-other-f16.gguf")
    with pytest.raises(ModelLoadError, match="several projector files .* choose one with --mmproj"):
        LLM(str(text), dtype="f32", progress=False)


def test_a_hub_repo_brings_its_projector(hf_vl, llm, tmp_path, monkeypatch):
    """A hub id with --gguf-file: the repo's projector beside that file is fetched too (llama.cpp's -hf does
    the same; f16 when the repo has several), or the one --mmproj names; --no-mmproj fetches none. The hub is
    a local directory here (huggingface_hub's two calls replaced)."""
    import huggingface_hub

    repo = tmp_path / "repo"
    text, proj = write_pair(hf_vl, repo)
    fetched = []

    def download(repo_id: str, filename: str, **kw) -> str:
        assert repo_id == "acme/tiny-vl-gguf"
        fetched.append(filename)
        (tmp_path / "snapshot").mkdir(exist_ok=True)
        return str(shutil.copy(repo / filename, tmp_path / "snapshot" / filename))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kw: sorted(os.listdir(repo)))
    want = llm.generate(prompt_with(1), GREEDY, images=IMAGES[:1]).token_ids
    hub = LLM("acme/tiny-vl-gguf", gguf_file=text.name, dtype="f32", progress=False, max_seq_len=1024)
    assert fetched == [text.name, proj.name] and hub.source.mmproj == str(tmp_path / "snapshot" / proj.name)
    assert hub.generate(prompt_with(1), GREEDY, images=IMAGES[:1]).token_ids == want
    shutil.rmtree(tmp_path / "snapshot")
    fetched.clear()
    shutil.copy(proj, repo / "mmproj-Tiny-VL-f16.gguf")  # several: the f16 one
    assert LLM("acme/tiny-vl-gguf", gguf_file=text.name, progress=False).source.mmproj.endswith("-f16.gguf")
    shutil.rmtree(tmp_path / "snapshot")
    fetched.clear()
    named = LLM("acme/tiny-vl-gguf", gguf_file=text.name, mmproj=proj.name, progress=False)
    assert fetched == [text.name, proj.name] and named.source.mmproj.endswith(proj.name)
    shutil.rmtree(tmp_path / "snapshot")
    fetched.clear()
    assert LLM("acme/tiny-vl-gguf", gguf_file=text.name, mmproj=False, progress=False).source.mmproj is None
    assert fetched == [text.name]


def test_files_that_do_not_fit_are_clear_errors(pair, tmp_path, tiny_models, smollm2):
    from spillover.loading.source import open_source

    text, proj = pair
    with pytest.raises(ModelLoadError, match="is a multimodal projector .mmproj., not a language model: pass the text GGUF with -m"):  # fmt: skip
        open_source(str(proj))
    with pytest.raises(ModelLoadError, match="holds only a multimodal projector"):
        d = tmp_path / "only"
        d.mkdir()
        shutil.copy(proj, d / "mmproj-x.gguf")
        open_source(str(d))
    with pytest.raises(ModelLoadError, match="is not a multimodal projector .mmproj. file: its architecture is 'llama'"):  # fmt: skip
        open_source(str(text), mmproj=smollm2)
    with pytest.raises(ModelLoadError, match="qwen2.5vl_merger projector for a 'qwen2vl' text model, but .* is a 'llama' model"):  # fmt: skip
        open_source(smollm2, mmproj=str(proj))
    with pytest.raises(ModelLoadError, match="--mmproj goes with a GGUF text model"):
        open_source(str(tiny_models["qwen2"]), mmproj=str(proj))
    with pytest.raises(ModelLoadError, match="not found"):
        open_source(str(text), mmproj=str(tmp_path / "nope.gguf"))
    corrupt = tmp_path / "mmproj-corrupt.gguf"
    corrupt.write_bytes(proj.read_bytes()[:200])
    with pytest.raises(ModelLoadError, match="mmproj-corrupt.gguf is not a valid GGUF file"):
        open_source(str(text), mmproj=str(corrupt))
    truncated = tmp_path / "mmproj-truncated.gguf"
    truncated.write_bytes(proj.read_bytes()[:-4096])
    with pytest.raises(ModelLoadError, match="mmproj-truncated.gguf is truncated"):
        open_source(str(text), mmproj=str(truncated))
    # projectors beside a model no projector pairs with are not looked at (even several)
    d = tmp_path / "mixed"
    d.mkdir()
    shutil.copy(smollm2, d / "smol.gguf")
    shutil.copy(proj, d / "mmproj-vl.gguf")
    shutil.copy(proj, d / "mmproj-vl-2.gguf")
    assert open_source(str(d / "smol.gguf")).mmproj is None


def test_plan_shows_the_tower_from_the_mmproj(pair, capsys):
    from spillover.cli.main import main

    def plan(model, *args: str) -> tuple[int, str, str]:  # noqa: ANN001  # `spillover plan`, in this process
        rc = main(["plan", "-m", str(model), *args])
        out = capsys.readouterr()
        return rc, out.out, out.err

    text, proj = pair
    rc, out, err = plan(text, "--mmproj", str(proj), "--json", "--max-num-images", "2")
    assert rc == 0, err
    doc = json.loads(out)
    size = proj.stat().st_size  # f32 in the file, f32 on this CPU: the tower's bytes plus a small header
    assert doc["vision"]["images"] == 2 and doc["vision"]["tokens"] > 0
    assert 0.9 * size < doc["vision"]["weight_bytes"] <= size
    assert {"stage": "vision", "device": "cpu", "weights": "cpu"} in doc["stages"]
    rc, out, err = plan(text, "--mmproj", str(proj))
    assert rc == 0 and "tower + projector on cpu" in out, err
    rc, out, err = plan(text, "--no-mmproj", "--json")
    assert rc == 0 and json.loads(out)["vision"] is None, err
    rc, out, err = plan(proj)
    assert rc != 0 and "not a language model" in err


def test_cli_and_server_take_the_pair(pair, llm, tmp_path):
    import openai
    from test_cli_run import spillover
    from test_server import Server

    from spillover.engine.async_engine import AsyncLLM
    from spillover.server.app import create_app

    text, proj = pair
    img = IMAGES[0]
    path = tmp_path / "a.png"
    img.save(path)
    content = [
        {"type": "image_url", "image_url": {"url": data_url(img)}},
        {"type": "text", "text": "<t9><t10>"},
    ]
    want = llm.chat([{"role": "user", "content": content}], GREEDY).text
    common = (
        "-m",
        str(text),
        "--mmproj",
        str(proj),
        "--dtype",
        "f32",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
    )
    r = spillover("run", *common, "--image", str(path), "-p", "<t9><t10>")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want.strip()
    from spillover.cli.main import build_parser
    from spillover.cli.serve import llm_kwargs

    args = build_parser().parse_args(["serve", "-m", str(text), "--mmproj", str(proj), "--dtype", "f32"])
    kwargs = llm_kwargs(args)
    assert kwargs["mmproj"] == str(proj)  # what `spillover serve` hands LLM
    assert llm_kwargs(build_parser().parse_args(["serve", "-m", str(text), "--no-mmproj"]))["mmproj"] is False
    served = AsyncLLM(LLM(str(text), **kwargs, progress=False))
    server = Server(create_app(served, api_key=""))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = client.chat.completions.create(
            model=client.models.list().data[0].id, messages=[{"role": "user", "content": content}],
            max_tokens=6, temperature=0, extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert r.choices[0].message.content == want
    finally:
        server.stop()
        served.shutdown()
