"""A vision model answering about an image, with the tower on the GPU and the mapping sized for images.

    python examples/vision.py MODEL IMAGE [QUESTION]

MODEL: a Qwen2.5-VL or Llama 3.2 Vision checkpoint (a local HF directory or a hub id, e.g.
Qwen/Qwen2.5-VL-7B-Instruct or meta-llama/Llama-3.2-11B-Vision-Instruct), or a Qwen2.5-VL text GGUF with
llama.cpp's mmproj GGUF beside it (or named with --mmproj FILE after the other arguments);
IMAGE: a path, a file:// URL or a data: URL. The same request as `spillover run -m MODEL --image IMAGE -p ...`.
"""

import sys

from spillover import LLM, SamplingParams

args, mmproj = sys.argv[1:], None
if "--mmproj" in args[:-1]:  # a GGUF text model's projector file (llama.cpp's flag)
    i = args.index("--mmproj")
    mmproj = args.pop(i + 1)
    args.pop(i)
if len(args) < 2:
    sys.exit(__doc__)
model, image = args[0], args[1]
question = args[2] if len(args) > 2 else "Describe this image in one sentence."

# the mapping reserves the tower's activations and the image tokens' KV cache for these sizes
llm = LLM(
    model, max_seq_len=4096, max_batch_size=1, max_num_images=1, max_image_length=1024,
    mmproj=mmproj,
)  # fmt: skip
print("device map:", llm.device_map, "| vision tower on", llm.device_map.stage_device("vision"))

messages = [
    {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": question}],
    }
]
out = llm.chat(messages, SamplingParams(max_tokens=128, temperature=0))
print(out.text)
print(
    f"prompt {out.metrics['prompt_tokens']} tokens, TTFT {out.metrics['time_to_first_token_s']:.2f} s, "
    f"decode {out.metrics['decode_tok_per_s']:.1f} tok/s"
)
