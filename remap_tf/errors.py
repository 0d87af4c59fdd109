"""The project's error types: one family, so a caller can tell bad input from a bug.

Every error this project raises on purpose, for a bad argument, a missing or unusable file,
an output it refuses to replace or a server it cannot use, derives from `RemapError`. Each
subclass also derives from the matching built-in (`ValueError`, `FileNotFoundError`, ...), so
code that catches the built-in keeps working. The ``remap`` command prints a `RemapError` as
one line and exits with status 2; any other exception is a bug and is reported as an internal
error with its traceback.

Standard library only: importing this module does not import TensorFlow.
"""

from __future__ import annotations

import re

__all__ = [
    "BadPathError",
    "FileFormatError",
    "ImageRejectedError",
    "InvalidInputError",
    "ModelNotFoundError",
    "OutputExistsError",
    "RemapError",
    "ServerUnavailableError",
    "ServingError",
    "UnknownIdError",
    "clean_tf_message",
]


class RemapError(Exception):
    """Base class of every error raised on purpose for bad input or an unusable resource."""


class InvalidInputError(RemapError, ValueError):
    """A bad argument, option, configuration value or input data, named in the message."""


class BadPathError(RemapError, FileNotFoundError):
    """A path that does not exist, or is not the kind of thing expected (file or folder)."""


class OutputExistsError(RemapError, FileExistsError):
    """An output path that is taken by something this project will not replace."""


class FileFormatError(RemapError, ValueError):
    """A file or folder that exists but is not what was expected: corrupt, truncated, of
    another kind or of an unsupported version."""


class UnknownIdError(RemapError, KeyError):
    """An id that is not in an index."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ServingError(RemapError):
    """Base class of the embedders' errors (TF Serving over gRPC, or a SavedModel here)."""


class ServerUnavailableError(ServingError, ConnectionError):
    """The server could not be reached, or did not answer within the deadline."""


class ModelNotFoundError(ServingError, LookupError):
    """The server (or folder) has no such model, version or signature."""


class ImageRejectedError(ServingError, ValueError):
    """An image failed the exported graph's checks or could not be decoded.

    Attributes:
        index: position of the image in the ``embed`` call's input.
        reason: the model's message (which check failed).
    """

    def __init__(self, message: str, index: int, reason: str):
        super().__init__(message)
        self.index = index
        self.reason = reason


_NODE_SUFFIX = re.compile(r"\s*\[\[\{\{.*$")
_ASSERTION = re.compile(r"^assertion failed: \[(.*)\]$")  # tf.debugging.Assert's wrapper


def clean_tf_message(message: str) -> str:
    """The useful lines of a TensorFlow error message (no node names or stack notes).

    Example:
        >>> clean_tf_message("Graph execution error:\\n\\nimages[2] is not JPEG\\n [[{{node A}}]]")
        'images[2] is not JPEG'
        >>> clean_tf_message("assertion failed: [images[0] is not JPEG data]")
        'images[0] is not JPEG data'
    """
    lines = []
    for line in str(message).splitlines():
        line = line.strip()
        if not line or line.startswith(("Graph execution error", "Detected at node", "<stack")):
            continue
        if line.startswith(("[[", "[Op:")):
            continue
        line = _NODE_SUFFIX.sub("", line)
        lines.append(_ASSERTION.sub(r"\1", line))
    return " ".join(lines) or str(message).strip()
