"""Exceptions users see. Each carries a message that says what went wrong and what to do about it.

The CLI and the server catch `SpilloverError` and print / return its message; they never show a traceback
for these.
"""

from __future__ import annotations


class SpilloverError(Exception):
    """Base class for every error meant for the user."""

    exit_code: int = 1


class ConfigError(SpilloverError, ValueError):
    """A setting has a bad value (a flag, an environment variable, an SDK keyword)."""

    exit_code = 2


class DeviceMapSyntaxError(ConfigError):
    """A manual device map ("-n 16", "0:16;1:16") is malformed or impossible."""


class UnknownDeviceError(ConfigError):
    """A device named by the user does not exist or is not visible."""


class ModelLoadError(SpilloverError):
    """A model cannot be found or read: a missing path, a corrupt or truncated file."""


class UnsupportedModelError(ModelLoadError):
    """The architecture, or a tensor type inside the file, is not supported."""


class PlacementError(SpilloverError):
    """The model and its reservations do not fit in the memory available, even with CPU offload."""


class PromptTooLongError(SpilloverError, ValueError):
    """A prompt does not fit in the model's context."""


class TokenizerMissingError(SpilloverError):
    """Text was given to a model that has no tokenizer (only token-id prompts work then)."""


class DistributedError(SpilloverError):
    """Tensor parallelism cannot start or a rank died (the whole run ends with this message)."""


class GrammarError(ConfigError):
    """A structured-output constraint (JSON schema, regex, choice, grammar) cannot be compiled."""


class ImageError(ConfigError):
    """An image input cannot be used: unreadable or not an image, a remote URL not allowed, or a model that
    takes no images."""
