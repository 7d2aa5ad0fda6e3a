"""Model shapes the benchmarks build with random weights (config.json dicts)."""

LLAMA3_8B = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 128000,
    "eos_token_id": 128001,
}  # fmt: skip
"""Llama-3-8B: hidden 4096, 32 layers, ffn 14336, 32 heads, 8 kv heads, vocab 128256."""

LLAMA31_8B = {
    **LLAMA3_8B, "max_position_embeddings": 131072,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}  # fmt: skip
"""Llama-3.1-8B: Llama-3-8B with the 128k context (llama3 rope scaling)."""

LLAMA31_70B = {
    **LLAMA31_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
}  # fmt: skip
"""Llama-3.1-70B: hidden 8192, 80 layers, ffn 28672, 64 heads, 8 kv heads, vocab 128256."""
