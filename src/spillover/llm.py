"""The Python SDK: `LLM(model, ...)`, `llm.generate(...)`, `llm.chat(...)`."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from spillover.config import AutoDeviceMapParams
from spillover.engine.build import build_engine, layer_token_bytes
from spillover.engine.output import RequestOutput, sequence_metrics
from spillover.engine.sampling import SamplingParams
from spillover.errors import ConfigError, TokenizerMissingError
from spillover.kv.pool import PoolSettings, kv_pool_tokens, limit_allocator, planned_devices
from spillover.loading.loader import build_model
from spillover.loading.source import ModelSource, open_source
from spillover.models import model_class
from spillover.placement.device_map import DeviceMap
from spillover.placement.planner import require_fit
from spillover.placement.resolve import keeps_gguf_blocks, plan_for_source
from spillover.quant.formats import parse_isq

log = logging.getLogger(__name__)

Prompt = str | list[int]
Messages = list[dict[str, Any]]


TORCH_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


class LLM:
    """Load a model with automatic device mapping and generate text.

    >>> llm = LLM()  # the default SmolLM2-135M-Instruct
    >>> llm.chat([{"role": "user", "content": "What is the capital of France?"}]).text

    With several CUDA GPUs the model runs tensor-parallel over all of them (one process per GPU, started here;
    `tensor_parallel_size=N` asks for N; `SPILLOVER_NO_NCCL=1` turns it off); `close()` stops those ranks.

    >>> llm = LLM("Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf", mmproj="mmproj-Qwen2.5-VL-7B-Instruct-f16.gguf")

    `mmproj`: a GGUF text model's projector file (llama.cpp's mmproj GGUF: the vision tower); by default the one
    `*mmproj*.gguf` beside the text file (or in its hub repo, with `gguf_file`); False: text only.
    """

    def __init__(
        self,
        model: str | ModelSource | None = None,
        *,
        device_map: DeviceMap | str | int | list[str] | None = None,
        dtype: str = "auto",
        max_seq_len: int = 4096,
        max_batch_size: int = 1,
        max_num_images: int = 1,
        max_image_length: int = 1024,
        auto_map_params: AutoDeviceMapParams | None = None,
        max_memory: dict[str, str | int] | None = None,
        isq: int | str | None = None,
        gguf_file: str | None = None,
        mmproj: str | bool | None = None,
        paged_attention: bool = True,
        pa_memory_fraction: float | None = None,
        pa_context_len: int | None = None,
        progress: bool = True,
        offload: str = "auto",
        cuda_graphs: bool = True,
        tensor_parallel_size: int | None = None,
        n_cpu_moe: int | None = None,
    ) -> None:
        t0 = time.perf_counter()
        self.params = auto_map_params or AutoDeviceMapParams(
            max_seq_len, max_batch_size, max_num_images, max_image_length
        )
        if isinstance(model, ModelSource):
            self.source: ModelSource = model
        else:  # mmproj: a GGUF text model's projector file (llama.cpp's --mmproj); None: one found beside it
            self.source = open_source(model, gguf_file, mmproj=mmproj)
        self.config = self.source.config
        self.tokenizer = _load_tokenizer(self.source)
        self.arch = model_class(self.config.model_type)
        self.image_processor = _image_processor(self.arch, self.source)  # None: a text-only model
        if isinstance(device_map, str) and device_map in ("cpu", "cuda", "cuda:0", "mps"):
            device_map = DeviceMap.single(
                "cuda:0" if device_map == "cuda" else device_map, self.config.num_hidden_layers
            )
        elif device_map == "auto":
            device_map = None
        self.plan = plan_for_source(
            self.source, self.params, dtype=dtype, max_memory=max_memory, isq=isq, paged=paged_attention,
            device_layers=device_map, offload=offload, tensor_parallel_size=tensor_parallel_size,
            n_cpu_moe=n_cpu_moe,
        )  # fmt: skip
        self.device_map: DeviceMap = require_fit(self.plan).device_map
        self.dtype = TORCH_DTYPES[self.plan.params["dtype"]]
        self.max_model_len = max_model_len(self.config)
        pool = PoolSettings(paged_attention, pa_memory_fraction, pa_context_len)
        kv_bytes = torch.finfo(self.dtype).bits // 8
        pool_kw = dict(max_seq_len=self.params.max_seq_len, max_batch_size=self.params.max_batch_size,
                       max_model_len=self.max_model_len, settings=pool)  # fmt: skip
        tp = self.plan.tensor_parallel  # > 1: several CUDA GPUs by default (placement/tensor_parallel.py)
        rank_config = self.config
        if tp > 1:  # each rank's KV cache holds its own kv heads
            from spillover.distributed.shard import local_config, shard_spec

            rank_config = local_config(self.config, shard_spec(self.config, 0, tp))
        # refused before any weight is read when a --max-memory budget cannot hold the pool asked for
        token_bytes = layer_token_bytes(self.arch, rank_config, self.dtype, self.params)
        kv_pool_tokens(
            planned_devices(self.plan, self.device_map, rank_config, kv_bytes, token_bytes), **pool_kw
        )
        limit_allocator(self.plan)  # torch's cache never holds more than a --max-memory budget leaves it
        self.tp = None  # distributed.group.TPContext when tensor-parallel
        self.native = False  # GGUF blocks kept on the CPU (the default mode; quant/gguf_native.py)
        if tp > 1:
            from spillover.distributed.runner import start_rank0

            self.tp, self.model = start_rank0(tp, self.source, self.plan.params["dtype"], parse_isq(isq))
            self.device_map = DeviceMap.single(self.tp.device, self.config.num_hidden_layers)
        else:
            # a GGUF's default mode: CPU-resident weights stay as the file has them where a CPU kernel reads
            # them (quant/gguf_native.py); an explicit --dtype dequantizes everything (f32: the reference)
            native = keeps_gguf_blocks(self.source, dtype, isq)  # (the plan counted the same)
            self.model = build_model(
                self.source, self.device_map, self.dtype, progress=progress, isq=parse_isq(isq), native=native
            )
            if native:  # whether any weight was kept (a GGUF of other block types keeps none)
                from spillover.quant.gguf_native import NATIVE_MODULES

                self.native = any(isinstance(m, NATIVE_MODULES) for m in self.model.modules())
        self.engine = build_engine(
            self.model, self.plan, self.device_map, self.dtype, self.params, self.tokenizer, self.max_model_len,
            pool, cuda_graphs, self.tp,
        )  # fmt: skip
        runner = self.engine.runner
        self.offload = runner.offload
        # decode graphs for every batch and context bucket up to the mapping sizes, now (their pool is in the
        # plan): a user's first requests then decode at full speed instead of paying the captures
        t1 = time.perf_counter()
        self.graphs_captured = runner.capture_graphs(self.params.max_batch_size, self.params.max_seq_len)
        self.graph_capture_seconds = time.perf_counter() - t1
        self.load_seconds = time.perf_counter() - t0
        log.info("loaded %s in %.2f s: %s", self.source.name, self.load_seconds, self.mapping_summary())
        if self.graphs_captured:
            log.info(
                "captured %d decode CUDA graphs in %.2f s", self.graphs_captured, self.graph_capture_seconds
            )

    def mapping_summary(self) -> str:
        """Where the model runs: the device map, and the tensor-parallel ranks when there are several."""
        if self.tp is None:
            return self.device_map.summary()
        return f"tensor-parallel over {self.tp.world} ranks ({self.tp.backend}), this rank: {self.device_map.summary()}"

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do for one process)."""
        if self.tp is not None:
            self.tp.close()

    # ---------------------------------------------------------------- prompts

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise TokenizerMissingError(
                f"{self.source.path} has no tokenizer; pass prompts as lists of token ids"
            )
        return self.tokenizer.encode(text)

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        if self.tokenizer is None:
            raise TokenizerMissingError(f"{self.source.path} has no tokenizer; chat needs one")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def _ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.encode(prompt)
        image = self.arch.image_token_id(self.config) if self.image_processor is not None else -1
        if not all(isinstance(t, int) and (0 <= t < self.config.vocab_size or t == image) for t in prompt):
            raise ConfigError(f"token-id prompts must be integers in [0, {self.config.vocab_size})")
        return list(prompt)

    def _chat_ids(self, messages: Messages) -> list[int]:
        if self.tokenizer is None:
            raise TokenizerMissingError(f"{self.source.path} has no tokenizer; chat needs one")
        return self.tokenizer.encode_chat(messages)

    def prepare_images(
        self, ids: list[int], images: Sequence[Any], allow_remote: bool = False
    ) -> tuple[list[int], Any]:
        """A prompt with one image placeholder per image -> (expanded prompt, multimodal.MMInput or None).
        ImageError for images a text-only model is given, unreadable images, or a placeholder count that
        differs from the images."""
        from spillover.multimodal import prepare

        if images and self.image_processor is None:
            raise self._takes_no_images()
        return prepare(self.arch, self.config, self.image_processor, ids, images, allow_remote)

    def _takes_no_images(self) -> Exception:
        from spillover.errors import ImageError
        from spillover.models import gguf_projectors

        hint = ""
        if self.source.gguf_metadata.get("general.architecture") in gguf_projectors().values():
            hint = " without its projector: load the mmproj GGUF with --mmproj (LLM(mmproj=...))"
        return ImageError(f"this model ({self.config.model_type}) takes no images{hint}; send text only")

    def chat_prompt(self, messages: Messages, allow_remote: bool = False) -> tuple[list[int], Any]:
        """A conversation with OpenAI content parts (`image_url` with a data:/file:// URL or a path; `image`
        with a PIL image) -> (prompt ids, multimodal.MMInput or None)."""
        from spillover.multimodal import split_messages

        text_messages, images = split_messages(messages)
        if images and self.image_processor is None:
            raise self._takes_no_images()
        return self.prepare_images(self._chat_ids(text_messages), images, allow_remote)

    # ---------------------------------------------------------------- generation

    def default_params(self) -> SamplingParams:
        """Sampling when none is given: the model's generation_config.json, greedy where it sets no
        temperature (as transformers' generate)."""
        from spillover.loading.generation_config import model_sampling_defaults

        return SamplingParams(
            **{"temperature": 0.0, **model_sampling_defaults(self.source.generation_config)}
        )

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        *,
        stream: bool = False,
        images: Sequence[Any] | None = None,
    ) -> Any:
        """One prompt -> RequestOutput (or an iterator of deltas with stream=True); a list -> a list.
        `images` (vision models): for one prompt, its images in order, one image placeholder token each in
        the prompt; for a list, one such list per prompt."""
        params = params or self.default_params()
        single = isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        )
        batch = [prompts] if single else list(prompts)
        per = [images or []] if single else list(images or [[]] * len(batch))
        if len(per) != len(batch):
            raise ConfigError(f"images: give one list per prompt ({len(batch)} prompts, {len(per)} lists)")
        prepared = [self.prepare_images(self._ids(p), im) for p, im in zip(batch, per, strict=True)]
        return self._run([p[0] for p in prepared], params, stream, single, [p[1] for p in prepared])

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        params: SamplingParams | None = None,
        *,
        stream: bool = False,
    ) -> Any:
        """A conversation (list of {"role", "content"} dicts) -> the assistant's answer; a list of them -> a list.
        Content may be OpenAI parts: text, `image_url` ({"url": data:/file:// URL or a path}) and
        `{"type": "image", "image": PIL.Image}` for vision models."""
        params = params or self.default_params()
        single = bool(messages) and isinstance(messages[0], dict)
        batch = [messages] if single else list(messages)
        prepared = [self.chat_prompt(m) for m in batch]
        return self._run([p[0] for p in prepared], params, stream, single, [p[1] for p in prepared])

    def _run(
        self,
        ids: list[list[int]],
        params: SamplingParams,
        stream: bool,
        single: bool,
        mms: list[Any] | None = None,
    ) -> Any:
        mms = mms or [None] * len(ids)
        if stream:
            if not single:
                raise ConfigError("stream=True takes one prompt; use the async engine or the server for many")
            return self._stream(ids[0], params, mms[0])
        states: list[Any] = []
        try:
            for i, mm in zip(
                ids, mms, strict=True
            ):  # a refused prompt withdraws the ones added from this call
                states.append(self.engine.add_request(i, params, mm=mm))
            while any(not s.seq.is_finished for s in states):
                self.engine.step()
        except BaseException:
            for s in states:
                self.engine.abort(s.seq.request_id)
            raise
        outs = [self._finish(s) for s in states]
        return outs[0] if single else outs

    def _finish(self, state: Any) -> RequestOutput:
        self.engine.requests.pop(state.seq.request_id, None)
        out = state.final()
        out.metrics = sequence_metrics(state.seq)
        return out

    def _stream(self, ids: list[int], params: SamplingParams, mm: Any = None) -> Iterator[RequestOutput]:
        state = self.engine.add_request(ids, params, mm=mm)
        try:
            while not state.seq.is_finished:
                if state in self.engine.step():
                    d = state.delta()
                    if d.text or d.token_ids or d.finished:
                        yield d
        finally:
            if not state.seq.is_finished:
                self.engine.abort(state.seq.request_id)
            self.engine.requests.pop(state.seq.request_id, None)


def max_model_len(cfg: Any) -> int:
    """The longest sequence the model takes: its max_position_embeddings (dynamic NTK rope stretches it)."""
    s = cfg.rope_scaling or {}
    if s.get("rope_type", s.get("type")) == "dynamic":
        return int(cfg.max_position_embeddings * float(s.get("factor", 1.0)))
    return cfg.max_position_embeddings


def _image_processor(arch: Any, src: ModelSource) -> Any | None:
    """The model's image processor (its preprocessor_config.json when the checkpoint has one)."""
    if not getattr(arch, "takes_images", False):
        return None
    import json
    import os

    pre = {}
    path = os.path.join(src.hf_dir, "preprocessor_config.json") if src.hf_dir else ""
    if path and os.path.isfile(path):
        with open(path) as f:
            pre = json.load(f)
    return arch.image_processor(src.config, pre)


def _load_tokenizer(src: ModelSource) -> Any | None:
    from spillover.loading import tokenizer as tk

    if src.kind == "gguf":
        md = src.gguf_metadata
        template = model_class(src.config.model_type).chat_template  # for files that ship none
        if template and not any(k.startswith("tokenizer.chat_template") for k in md):
            md = {**md, "tokenizer.chat_template": template}
        return tk.Tokenizer.from_gguf_metadata(md)
    if src.hf_dir and tk.has_tokenizer_files(src.hf_dir):
        return tk.Tokenizer.from_hf_dir(src.hf_dir)
    log.warning("%s has no tokenizer files: only token-id prompts will work", src.path)
    return None
