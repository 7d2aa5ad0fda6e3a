"""Model shapes the benchmarks build with random weights (config.json dicts)."""

LLAMA3_8B = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 128000,
    "eos_token_id": 128001,
}  # fmt: skip
"""Llama-3-8B: hidden 4096, 32 layers, ffn 14336, 32 heads, 8 kv heads, vocab 128256."""
