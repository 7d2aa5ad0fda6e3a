"""Structured output: grammar-constrained decoding (grammar.py) and tool calling (tools.py)."""
