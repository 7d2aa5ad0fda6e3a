"""Image inputs: from OpenAI content parts to the model's placeholder tokens, pixels and rope positions.

- `load_image(ref)`: a PIL image, a `data:` URL, a `file://` URL or a local path -> PIL image (remote http(s)
  URLs only when the caller allows them). Anything that is not a readable image is an `ImageError`.
- `split_messages(messages)`: OpenAI chat messages with `image_url` / `image` parts -> messages the chat
  template renders (each image as `{"type": "image"}`) and the images in order.
- `prepare(arch, cfg, processor, ids, images)`: each image's one placeholder token in the templated prompt
  becomes as many as the model's tower yields for it; the result is the prompt and an `MMInput` that rides on
  the engine's Sequence (pixels, where the placeholders are, rope positions, a hash of the pixels).

The prefix cache keys a block on `MMInput.keyed(tokens)`: placeholder tokens replaced by a key made from the
image's pixels, so two prompts with the same text and different images never share a block.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from spillover.errors import ImageError

IMAGE_PART_TYPES = ("image_url", "image", "input_image")
REMOTE_FETCH_TIMEOUT_S = 10
MAX_IMAGE_BYTES = 64 << 20


def _open(data: bytes, what: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now: a truncated or corrupt file fails here, not in the middle of a step
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"{what} is not a readable image ({type(e).__name__}: {e})") from None
    return img


def load_image(ref: Any, allow_remote: bool = False) -> Any:
    """A PIL image from a PIL image, a data: URL, a file:// URL or a local path (http(s) if `allow_remote`)."""
    from PIL import Image

    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, (bytes, bytearray)):
        return _open(bytes(ref), "the image bytes")
    if not isinstance(ref, str) or not ref:
        raise ImageError(f"an image must be a URL, a path or a PIL image, got {type(ref).__name__}")
    if ref.startswith("data:"):
        head, _, payload = ref.partition(",")
        if not head.startswith("data:image/") or ";base64" not in head:
            raise ImageError("a data URL image must look like data:image/<type>;base64,<data>")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("the data URL's base64 payload cannot be decoded") from None
        return _open(data, "the data URL")
    scheme = urllib.parse.urlparse(ref).scheme.lower()
    if scheme in ("http", "https"):
        if not allow_remote:
            raise ImageError(
                "remote image URLs are not fetched; send the image as a data: URL "
                "(the server fetches http(s) images only with --allow-remote-images)"
            )
        try:
            with urllib.request.urlopen(ref, timeout=REMOTE_FETCH_TIMEOUT_S) as r:  # noqa: S310 (allowed by flag)
                data = r.read(MAX_IMAGE_BYTES + 1)
        except OSError as e:
            raise ImageError(f"cannot fetch the image {ref}: {e}") from None
        if len(data) > MAX_IMAGE_BYTES:
            raise ImageError(f"the image at {ref} is larger than {MAX_IMAGE_BYTES >> 20} MiB")
        return _open(data, ref)
    path = urllib.parse.unquote(urllib.parse.urlparse(ref).path) if scheme == "file" else ref
    if scheme not in ("", "file") and not os.path.exists(ref):
        raise ImageError(f"unsupported image URL scheme {scheme!r}; use a data: URL, a file:// URL or a path")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ImageError(f"cannot read the image file {path}: {e.strerror or e}") from None
    return _open(data, path)


def _part_image(part: dict[str, Any]) -> Any:
    kind = part.get("type")
    if kind == "image":
        return part.get("image") if part.get("image") is not None else part.get("url") or part.get("path")
    if kind == "input_image":
        return part.get("image_url")
    url = part.get("image_url")
    return url.get("url") if isinstance(url, dict) else url


def split_messages(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages for the chat template (image parts become {"type": "image"}) and the image references."""
    out, images = [], []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES:
                ref = _part_image(p)
                if ref is None:
                    raise ImageError(f"an {p.get('type')} content part has no image")
                images.append(ref)
                parts.append({"type": "image"})
            else:
                parts.append(p)
        out.append({**m, "content": parts})
    return out, images


@dataclass
class MMInput:
    """A prompt's images, as the engine needs them (rides on engine.sequence.Sequence; no model code)."""

    pixels: list[torch.Tensor]  # per image, as the model's processor made them
    grids: list[tuple[int, int, int]]
    spans: list[tuple[int, int]]  # (first placeholder position, placeholder count) per image
    digests: list[int]  # per image, from a hash of its pixels
    positions: torch.Tensor | None = None  # [3, prompt_len] rope positions (multimodal rope), None: the index
    delta: int = 0  # rope position of a token at p >= prompt_len: p + delta
    embeds: torch.Tensor | None = None  # the tower's output, kept while the prompt needs it
    cross: list[tuple[int, int]] | None = None  # cross-attention models: per image, the tokens that see it
    cross_kv: dict[int, Any] = field(default_factory=dict)  # cross-attention layer -> its K/V of the images
    index: torch.Tensor = field(init=False)  # [placeholders] their positions, in order

    def __post_init__(self) -> None:
        self.index = (
            torch.cat([torch.arange(a, a + n) for a, n in self.spans]) if self.spans else torch.zeros(0)
        )

    @property
    def end(self) -> int:
        """One past the last placeholder position."""
        return max((a + n for a, n in self.spans), default=0)

    def keyed(self, tokens: list[int]) -> list[int]:
        """`tokens` with each image's placeholders replaced by a (negative) key of its pixels."""
        out = list(tokens)
        for (a, n), d in zip(self.spans, self.digests, strict=True):
            out[a : a + n] = [d] * n
        return out

    def rope_rows(self, start: int, end: int, prompt_len: int) -> torch.Tensor:
        """[3, end - start] rope positions of tokens start..end-1."""
        p = torch.arange(start, end)
        rows = (p + self.delta).expand(3, -1).clone()
        if self.positions is not None and start < prompt_len:
            k = min(end, prompt_len)
            rows[:, : k - start] = self.positions[:, start:k]
        return rows


def pixel_digest(pixels: torch.Tensor, grid: tuple[int, ...] = ()) -> int:
    """A negative int key of an image's processed pixels and grid (never a token id)."""
    h = hashlib.blake2b(repr(tuple(grid)).encode(), digest_size=8)
    h.update(pixels.contiguous().numpy().tobytes())
    h = h.digest()
    return -1 - (int.from_bytes(h, "little") >> 2)


def prepare(
    arch: Any, cfg: Any, processor: Any, ids: list[int], images: Sequence[Any], allow_remote: bool = False
) -> tuple[list[int], MMInput | None]:
    """Expand each image placeholder of `ids` to its token count; the MMInput for the engine."""
    if not images:
        return ids, None
    if not getattr(arch, "takes_images", False):
        raise ImageError(f"this model ({cfg.model_type}) takes no images; send text only")
    tok = arch.image_token_id(cfg)
    found = ids.count(tok)
    if found != len(images):
        raise ImageError(f"the prompt has {found} image placeholders but {len(images)} images were given")
    processed = [processor(load_image(im, allow_remote)) for im in images]
    out: list[int] = []
    spans = []
    k = 0
    for t in ids:
        if t == tok:
            spans.append((len(out), processed[k].num_tokens))
            out += [tok] * processed[k].num_tokens
            k += 1
        else:
            out.append(t)
    positions, delta = arch.rope_positions(cfg, out, processed)
    mm = MMInput(
        [p.pixels for p in processed], [p.grid for p in processed], spans,
        [pixel_digest(p.pixels, p.grid) for p in processed], positions, delta,
    )  # fmt: skip
    if getattr(arch, "cross_attention", False):
        mm.cross = arch.cross_ranges(cfg, out)
    return out, mm
