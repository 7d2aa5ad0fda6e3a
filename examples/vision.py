"""Vision models: the mapping parameters for images.

spillover's planner takes `max_num_images` and `max_image_length` (SDK keywords and --max-num-images /
--max-image-length flags) and passes them into the plan, but no vision architecture is implemented yet
(supported: llama, mistral, qwen2, qwen3). This script shows the intended call and what the planner says
today for a text model with image parameters set.

    python examples/vision.py
"""

from spillover import AutoDeviceMapParams
from spillover.loading.source import open_source
from spillover.placement.device_map import plan_to_json
from spillover.placement.resolve import plan_for_source

params = AutoDeviceMapParams(max_seq_len=4096, max_batch_size=2, max_num_images=2, max_image_length=1024)
plan = plan_for_source(open_source(None), params)
print(plan_to_json(plan)["params"])
