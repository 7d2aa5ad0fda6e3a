"""llama.cpp (CUDA) as the peer in the GPU benchmarks (issue 20): a GGUF writer for the benchmark shapes and a
small driver for llama.cpp's own tools. offload.py, gpu.py and the fit comparison import it.

    python3 benchmarks/llamacpp.py gguf OUT.gguf [--layers 32] [--q4km OUT-Q4_K_M.gguf]
    python3 benchmarks/llamacpp.py fit GGUF --budgets 4,8,12,16      # layers --fit puts on the GPU per budget
    python3 benchmarks/llamacpp.py check                              # the binaries run on this machine

The binaries come from benchmarks/llamacpp_build.sh: a pack `<repo>/.gpu-llamacpp/llamacpp-cuda-sm90.tar.xz`,
unpacked to /tmp/llamacpp on first use (or LLAMACPP_DIR=<folder with llama-bench>). cuBLAS is not in the pack:
the machine's libcublas.so.13 (the CUDA toolkit's or PyTorch's nvidia-cublas wheel) is put on LD_LIBRARY_PATH.

GGUF files: Llama architecture, Hugging Face names and layouts mapped as llama.cpp's convert_hf_to_gguf.py
does (q/k rows permuted for llama.cpp's rope); a byte-level BPE vocabulary of the config's size (256 byte
tokens, a few hundred merges, filler tokens; the last 256 ids are control tokens, as in Llama 3) that
llama.cpp and spillover both load. Q4_K_M: llama-quantize on a 2-layer file of the same shapes (layer 0 gets
Q4_K_M's plain types, layer 1 its "more bits" types), whose quantized layers are then copied to the layers
llama.cpp's own Q4_K_M rule picks (use_more_bits), so the file has a real Q4_K_M's types and size without
quantizing 8 B weights (minutes); its layers repeat two weight sets, which changes no timing.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PACK = Path(os.environ.get("LLAMACPP_PACK_DIR", ROOT / ".gpu-llamacpp")) / "llamacpp-cuda-sm90.tar.xz"
MiB = 1 << 20

# ------------------------------------------------------------------ GGUF writer

_LAYER = {  # HF name suffix -> GGUF name suffix
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def tensor_specs(cfg: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(GGUF name, HF name, torch-order shape) in file order."""
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    v = cfg["vocab_size"]
    shapes = {"input_layernorm.weight": (h,), "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
              "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
              "post_attention_layernorm.weight": (h,), "mlp.gate_proj.weight": (i, h),
              "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i)}  # fmt: skip
    out = [("token_embd.weight", "model.embed_tokens.weight", (v, h))]
    for n in range(L):
        out += [(f"blk.{n}.{g}", f"model.layers.{n}.{hf}", shapes[hf]) for hf, g in _LAYER.items()]
    out += [("output_norm.weight", "model.norm.weight", (h,))]
    if not cfg.get("tie_word_embeddings"):
        out += [("output.weight", "lm_head.weight", (v, h))]
    return out


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face rotate-half rows -> llama.cpp's interleaved rope pairs (convert_hf_to_gguf's permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode, as a list indexed by byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def bpe_vocab(n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): 256 byte tokens, 'Ġ'+letter and letter-pair merges (as many as fit),
    filler tokens, and control tokens at the end (256 of them at Llama 3's size)."""
    tokens = _byte_chars()
    letters = "abcdefghijklmnopqrstuvwxyz"
    n_special = min(256, max(2, (n_vocab - 256) // 4))
    merges = [f"Ġ {a}" for a in letters] + [f"{a} {b}" for a in letters for b in letters]
    merges = merges[: n_vocab - 256 - n_special]
    tokens += [m.replace(" ", "") for m in merges]
    tokens += [f"<filler_{i}>" for i in range(n_vocab - n_special - len(tokens))]
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] + [
        f"<|reserved_special_token_{i}|>" for i in range(254)
    ]
    tokens += specials[:n_special]
    types = [1] * (n_vocab - n_special) + [3] * n_special  # 1 normal, 3 control
    return tokens, types, merges


def rope_theta(cfg: dict) -> float:
    """rope_theta of a config.json dict (transformers 5 writes it inside rope_parameters)."""
    return float(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])


def _metadata(w: Any, cfg: dict, name: str, file_type: int) -> None:
    """Llama architecture keys and the BPE vocabulary (token ids: cfg's bos/eos)."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    w.add_name(name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(h // heads)
    w.add_head_count(heads)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(rope_theta(cfg))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(file_type)
    tokens, types, merges = bpe_vocab(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    eos = cfg["eos_token_id"]
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)
    w.add_add_bos_token(False)


def write_gguf(path: str | Path, cfg: dict, weight: Callable[[str, tuple[int, ...]], np.ndarray],
               name: str = "llama3-8b-random") -> Path:  # fmt: skip
    """Write a bf16 Llama GGUF; `weight(hf_name, shape)` returns the tensor as uint16 bf16 bits (torch layout).
    Tensors are written one at a time (no 16 GB in memory)."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heads, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    _metadata(w, cfg, name, gguf.LlamaFileType.MOSTLY_BF16)
    specs = tensor_specs(cfg)
    for g, _, shape in specs:  # 1-D tensors (norms) in f32, as llama.cpp's converter writes them: its CPU
        # backend has no f32 x bf16 multiply, and llama-bench aborts on a bf16 norm
        if len(shape) == 1:
            w.add_tensor_info(g, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        else:
            w.add_tensor_info(
                g,
                shape,
                np.dtype(np.uint16),
                2 * int(np.prod(shape)),
                raw_dtype=gguf.GGMLQuantizationType.BF16,
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for g, hf, shape in specs:
        t = np.ascontiguousarray(weight(hf, shape))
        assert t.dtype == np.uint16 and t.shape == shape, (hf, t.dtype, t.shape)
        if g.endswith("attn_q.weight"):
            t = np.ascontiguousarray(permute_qk(t, heads))
        elif g.endswith("attn_k.weight"):
            t = np.ascontiguousarray(permute_qk(t, kvh))
        if t.ndim == 1:  # bf16 bits -> f32
            t = (t.astype(np.uint32) << 16).view(np.float32)
        w.write_tensor_data(t)
    w.close()
    return path


def random_weights(seed: int = 0) -> Callable[[str, tuple[int, ...]], np.ndarray]:
    """Random bf16 weights as offload.py draws them (norms ~1, matrices ~N(0, 0.02)); on the GPU when there is
    one (random init of 8 B values on the CPU takes minutes)."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)

    def make(name: str, shape: tuple[int, ...]) -> np.ndarray:
        t = torch.randn(shape, generator=g, device=dev, dtype=torch.bfloat16)
        t = 1.0 + 0.1 * t if "norm" in name else 0.02 * t
        return t.cpu().view(torch.int16).numpy().view(np.uint16)

    return make


def torch_weights(host: dict) -> Callable[[str, tuple[int, ...]], np.ndarray]:
    """Weights from a dict of bf16 torch tensors by HF name (offload.py's in-memory model)."""
    import torch

    return lambda name, shape: host[name].contiguous().view(torch.int16).numpy().view(np.uint16)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's Q4_K_M rule (llama-quant.cpp): which layers' attn_v / ffn_down get Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def repeat_layers(src: str | Path, dst: str | Path, cfg: dict, pick: Callable[[int, str], int],
                  name: str, file_type: int) -> Path:  # fmt: skip
    """Copy the GGUF `src` to `dst` with cfg["num_hidden_layers"] layers, layer n's tensor g taken from
    `src`'s layer pick(n, g) (raw bytes: any quantization); other tensors as they are."""
    import gguf

    from spillover.loading.gguf_file import read_gguf

    _, infos, mm = read_gguf(src)
    by_name = {t.name: t for t in infos}
    plan = [(t.name, t) for t in infos if not t.name.startswith("blk.")]
    for n in range(cfg["num_hidden_layers"]):
        plan += [(f"blk.{n}.{g}", by_name[f"blk.{pick(n, g)}.{g}"]) for g in _LAYER.values()]
    w = gguf.GGUFWriter(str(dst), "llama")
    _metadata(w, cfg, name, file_type)
    for tname, t in plan:  # element shape, torch order; float32 only so the writer takes it as elements
        w.add_tensor_info(
            tname, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=gguf.GGMLQuantizationType(t.ggml_type)
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, t in plan:
        w.write_tensor_data(np.asarray(mm[t.offset : t.offset + t.nbytes]))
    w.close()
    return Path(dst)


def write_q4km(dst: str | Path, cfg: dict, weight: Callable, llama: LlamaCpp, tmp: str | Path) -> Path:
    """Q4_K_M GGUF of cfg's shape (see the module doc): quantize a 2-layer file, repeat its layers."""
    import gguf

    src = write_gguf(Path(tmp) / "two-layers-bf16.gguf", dict(cfg, num_hidden_layers=2), weight)
    q2 = Path(tmp) / "two-layers-q4km.gguf"
    llama.run("llama-quantize", str(src), str(q2), "Q4_K_M", timeout=600)
    L = cfg["num_hidden_layers"]

    def pick(
        n: int, g: str
    ) -> int:  # llama.cpp gave layer 1 of 2 the "more bits" types, layer 0 the plain ones
        return 1 if g in ("attn_v.weight", "ffn_down.weight") and use_more_bits(n, L) else 0

    out = repeat_layers(q2, dst, cfg, pick, "llama3-8b-random-Q4_K_M", gguf.LlamaFileType.MOSTLY_Q4_K_M)
    src.unlink()
    q2.unlink()
    return out


# ------------------------------------------------------------------ llama.cpp binaries


def _cublas_dirs() -> list[str]:
    pats = ["/usr/local/cuda*/lib64", "/usr/local/cuda*/targets/x86_64-linux/lib"]
    for p in sys.path:
        pats += [f"{p}/nvidia/cu13/lib", f"{p}/nvidia/cublas/lib"]
    return [d for pat in pats for d in glob.glob(pat) if glob.glob(f"{d}/libcublas.so.13*")]


class LlamaCpp:
    """The unpacked llama.cpp tools, run as subprocesses with the machine's cuBLAS on the library path."""

    def __init__(self, bin_dir: str | None = None) -> None:
        d = bin_dir or os.environ.get("LLAMACPP_DIR")
        if d is None:
            d = "/tmp/llamacpp/llamacpp"
            if not os.path.exists(f"{d}/llama-bench"):
                if not PACK.exists():
                    raise FileNotFoundError(
                        f"no llama.cpp build: run benchmarks/llamacpp_build.sh ({PACK} missing)"
                    )
                with tarfile.open(PACK) as tf:
                    tf.extractall("/tmp/llamacpp")  # noqa: S202 (our own pack)
        self.dir = d
        self.env = dict(os.environ)
        libs = [d, *_cublas_dirs()]
        self.env["LD_LIBRARY_PATH"] = ":".join([*libs, self.env.get("LD_LIBRARY_PATH", "")])
        self.info = Path(d, "BUILD_INFO").read_text().strip() if Path(d, "BUILD_INFO").exists() else "?"

    def run(self, tool: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        p = subprocess.run([f"{self.dir}/{tool}", *args], env=self.env, capture_output=True, text=True,
                           timeout=timeout)  # fmt: skip
        log_dir = os.environ.get("LLAMACPP_LOG_DIR")
        if log_dir:  # every invocation's stderr, in full
            with open(Path(log_dir) / "llamacpp-stderr.log", "a") as f:
                f.write(f"\n$ {tool} {' '.join(args)}  (exit {p.returncode})\n{p.stderr}")
        if p.returncode != 0:
            keys = ("error", "assert", "abort", "failed", "what()")
            why = [ln for ln in p.stderr.splitlines() if any(k in ln.lower() for k in keys)][:8]
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({p.returncode}): {' | '.join(why)[:1500]}")
        return p

    def devices(self) -> str:
        return self.run("llama-bench", "--list-devices").stdout.strip()

    def free_mib(self) -> int:
        """Free device memory as a llama.cpp process sees it (after its own CUDA context)."""
        import re

        m = re.search(r"(\d+) MiB free", self.devices())  # "CUDA0: NVIDIA H200 (143166 MiB, 142614 MiB free)"
        if m is None:
            raise RuntimeError("llama-bench --list-devices printed no free memory")
        return int(m.group(1))

    def fit_layers(self, model: str, budget_gib: float, ctx: int) -> dict:
        """`llama-fit-params` with the margin that leaves `budget_gib` to llama.cpp: its -ngl for `ctx` tokens."""
        margin = self.free_mib() - int(budget_gib * 1024)
        p = self.run("llama-fit-params", "-m", model, "-c", str(ctx), "-fitc", str(ctx), "-fitt", str(margin))
        args = p.stdout.split()
        ngl = int(args[args.index("-ngl") + 1]) if "-ngl" in args else None
        if ngl is None or ngl < 0:  # nothing to change: everything on the GPU
            ngl = 999
        log = [ln for ln in p.stderr.splitlines() if "llama_params_fit" in ln]
        return {"ngl": ngl, "args": p.stdout.strip(), "margin_mib": margin, "log": log[-6:]}

    def bench(self, model: str, ngl: int, n_prompt: int = 128, n_gen: int = 32, depth: str = "0,128",
              reps: int = 3, extra: tuple[str, ...] = ()) -> dict:  # fmt: skip
        """llama-bench: prefill of n_prompt tokens at depth 0 and decode of n_gen tokens after `depth` tokens,
        with the peak device memory of the process (polled)."""
        args = ["-m", model, "-ngl", str(ngl), "-p", str(n_prompt), "-n", str(n_gen), "-d", depth,
                "-r", str(reps), "-fa", "0", "-o", "json", *extra]  # fmt: skip
        with DevicePeak() as peak:
            t = time.perf_counter()
            p = self.run("llama-bench", *args, timeout=600)
            wall = time.perf_counter() - t
        rows = json.loads(p.stdout)
        deepest = max(int(x) for x in depth.split(","))
        pp = next(
            r for r in rows if r["n_prompt"] == n_prompt and r["n_gen"] == 0 and r.get("n_depth", 0) == 0
        )
        tg = next(
            r for r in rows if r["n_gen"] == n_gen and r["n_prompt"] == 0 and r.get("n_depth", 0) == deepest
        )
        return {"ngl": ngl, "prefill_tok_s": pp["avg_ts"], f"prefill_{n_prompt}_s": n_prompt / pp["avg_ts"],
                "decode_tok_s": tg["avg_ts"], "decode_std": tg["stddev_ts"], "threads": tg.get("n_threads"),
                "peak_mib": peak.mib, "wall_s": wall, "args": " ".join(args)}  # fmt: skip


class DevicePeak:
    """Peak device memory used by other processes while the block runs (torch's mem_get_info, polled every
    20 ms, minus what was used when the block started). Includes the other process's CUDA context."""

    def __enter__(self) -> DevicePeak:
        import torch

        self._get = lambda: torch.cuda.mem_get_info(0)
        free, total = self._get()
        self.base, self.peak, self._stop = total - free, total - free, False
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self) -> None:
        while not self._stop:
            free, total = self._get()
            self.peak = max(self.peak, total - free)
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._t.join()
        self.mib = (self.peak - self.base) / MiB


def cuda_context_mib() -> float:
    """Device memory of one CUDA context on this machine (what a budget does not count): measured by
    llama.cpp's own --list-devices run."""
    import torch

    torch.cuda.init()
    with DevicePeak() as p:
        LlamaCpp().devices()
    return p.mib


# ------------------------------------------------------------------ fit comparison


def spillover_plan(model: str, budget_gib: float, ctx: int, offload: str = "auto") -> dict:
    """spillover's plan for the GGUF at this budget (headers only, this machine's inventory): GPU-resident
    layers, streamed layers, where the head goes, planned GPU bytes."""
    from spillover.config import AutoDeviceMapParams
    from spillover.loading.source import open_source
    from spillover.placement.resolve import plan_for_source

    plan = plan_for_source(open_source(model, headers_only=True), AutoDeviceMapParams(max_seq_len=ctx),
                           dtype="bf16", max_memory={"cuda:0": f"{budget_gib}GiB"}, offload=offload)  # fmt: skip
    dm = plan.device_map
    gpu = [i for i in dm.layers_on("cuda:0") if i not in dm.streamed]
    row = next((r for r in plan.rows if r.device == "cuda:0"), None)
    return {"gpu_layers": len(gpu), "streamed": len(dm.streamed), "head": dm.head, "fits": plan.fits,
            "gpu_total_mib": row.total_bytes / MiB if row else 0.0, "map": dm.summary()}  # fmt: skip


def fit_rows(
    model: str, budgets: list[float], ctx: int = 4352, run: bool = True, n_gen: int = 16
) -> list[dict]:
    """For each budget: the layers llama.cpp --fit puts on the GPU (llama-fit-params with the margin that
    leaves `budget` GiB) next to spillover's plan, and, with `run`, a short llama-bench at that -ngl with its
    peak device memory against the budget (+ one CUDA context, which neither engine's budget counts).
    llama.cpp's -ngl N puts the last N layers on the GPU, and the output layer too only when N > layers."""
    llama = LlamaCpp()
    ctx_mib = cuda_context_mib() if run else 0.0
    rows = []
    for b in budgets:
        r: dict = {"budget_gib": b}
        try:
            r["spillover"] = spillover_plan(model, b, ctx)
        except Exception as e:  # noqa: BLE001 (a row, not the end of the table)
            r["spillover"] = {"error": f"{type(e).__name__}: {e}"[:200]}
        try:
            f = llama.fit_layers(model, b, ctx)
            r |= {"fit_ngl": f["ngl"], "fit_args": f["args"], "fit_log": f["log"]}
            if run and f["ngl"] is not None:
                m = llama.bench(model, f["ngl"], n_prompt=128, n_gen=n_gen, depth="0", reps=1)
                r |= {"peak_mib": m["peak_mib"], "cuda_context_mib": ctx_mib,
                      "inside": m["peak_mib"] - ctx_mib <= b * 1024, "inside_with_context": m["peak_mib"] <= b * 1024,
                      "decode_tok_s": m["decode_tok_s"]}  # fmt: skip
        except Exception as e:  # noqa: BLE001
            r["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(r)
    return rows


def fit_table(rows: list[dict]) -> str:
    out = ["| budget GiB | llama.cpp --fit -ngl | llama.cpp peak device MiB (- CUDA context) | inside budget "
           "(without / with the context; spillover's plan counts it) | llama.cpp decode tok/s | spillover plan (auto) |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        sp = r.get("spillover", {})
        sp_s = (f"{sp['gpu_layers']} GPU layers + {sp['streamed']} streamed, head on {sp['head']}, "
                f"{sp['gpu_total_mib']:.0f} MiB planned") if "gpu_layers" in sp else sp.get("error", "-")  # fmt: skip
        if "error" in r:
            out.append(f"| {r['budget_gib']:g} | error: {r['error'][:100]} | | | | {sp_s} |")
            continue
        pk = f"{r['peak_mib']:.0f} ({r['peak_mib'] - r['cuda_context_mib']:.0f})" if "peak_mib" in r else "-"
        yn = lambda k, r=r: ("yes" if r[k] else "NO") if k in r else "-"  # noqa: E731
        ins = f"{yn('inside')} / {yn('inside_with_context')}"
        dec = f"{r['decode_tok_s']:.2f}" if "decode_tok_s" in r else "-"
        out.append(f"| {r['budget_gib']:g} | {r['fit_ngl']} | {pk} | {ins} | {dec} | {sp_s} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gguf", help="write a random-weight bf16 GGUF of the Llama-3-8B shape (and Q4_K_M)")
    g.add_argument("out")
    g.add_argument("--layers", type=int, default=None)
    g.add_argument("--q4km", default=None, help="also write a Q4_K_M file here (needs the llama.cpp build)")
    g.add_argument(
        "--offload-weights",
        action="store_true",
        help="offload.py's weights (its CFG and seed: both engines then run the same model)",
    )
    g.add_argument("--skip-bf16", action="store_true", help="only the Q4_K_M file")
    f = sub.add_parser("fit", help="layers llama.cpp --fit puts on the GPU for each budget")
    f.add_argument("gguf")
    f.add_argument("--budgets", default="4,8,12,20,40", help="GiB (default: fit_grid.py's, issue 11)")
    f.add_argument("--ctx", type=int, default=4352)
    f.add_argument("--no-run", action="store_true")
    f.add_argument("--out", default=None, help="write the rows as JSON here")
    sub.add_parser("check", help="the llama.cpp binaries run here")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from shapes import LLAMA3_8B

    if a.cmd == "gguf":
        cfg = dict(LLAMA3_8B, **({"num_hidden_layers": a.layers} if a.layers else {}))
        t = time.perf_counter()
        if a.skip_bf16:
            pass
        elif a.offload_weights:
            import offload

            cfg = offload.CFG
            write_gguf(a.out, cfg, torch_weights(offload.random_host_weights(cfg)))
        else:
            write_gguf(a.out, cfg, random_weights())
        if not a.skip_bf16:
            print(f"{a.out}: {os.path.getsize(a.out) / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s")
        if a.q4km:
            t = time.perf_counter()
            write_q4km(a.q4km, cfg, random_weights(1), LlamaCpp(), Path(a.q4km).parent)
            print(f"{a.q4km}: {os.path.getsize(a.q4km) / 1e9:.2f} GB in {time.perf_counter() - t:.1f} s")
    elif a.cmd == "fit":
        rows = fit_rows(a.gguf, [float(b) for b in a.budgets.split(",")], a.ctx, run=not a.no_run)
        if a.out:
            Path(a.out).write_text(json.dumps(rows, indent=1, default=str))
        print(f"llama.cpp: {LlamaCpp().info}; context {a.ctx} tokens for both engines' plans")
        print(fit_table(rows))
    else:
        llama = LlamaCpp()
        print(llama.info)
        print("cuBLAS from:", _cublas_dirs())
        p = llama.run("llama-bench", "--list-devices")
        print(p.stdout.strip())
        if "MiB free" not in p.stdout:  # no GPU: say why (the backends load silently)
            import ctypes

            try:
                ctypes.CDLL(f"{llama.dir}/libggml-cuda.so", mode=os.RTLD_NOW)
                print("libggml-cuda.so loads; llama.cpp's CUDA init said:")
            except OSError as e:
                print("libggml-cuda.so does not load:", e)
            print("\n".join(ln for ln in p.stderr.splitlines() if "cuda" in ln.lower())[:3000])
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
