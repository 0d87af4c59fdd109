"""Reading image files for training without letting a bad one stop it.

Decoding is done by Pillow (`decode_image_file`; the pipelines run it inside
``tf.numpy_function``, in parallel, and Pillow releases the GIL while decoding), because a
decode error inside a TensorFlow op cannot be caught per file: here a zero-byte, truncated,
corrupt or non-image file raises `BadImageError`, is recorded once by path in a `BadFileLog`,
and never stops training; `BadFileReporter`, a Keras callback, reports the new entries at the
end of each epoch.

Every image becomes RGB uint8 (`decode_image_file`): grayscale is repeated over the channels,
palette and CMYK are converted, RGBA/LA/transparent palettes are composited over white, 16-bit
samples are scaled to 8 bits (``round(v / 257)``), EXIF orientation is applied, GIFs give their
first frame.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

import keras
import numpy as np
from PIL import Image, ImageOps

from remap_tf.errors import InvalidInputError

logger = logging.getLogger("remap.training")


class BadImageError(ValueError):
    """An image file that cannot be decoded; ``path`` and ``reason`` name the file and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"Cannot read image {path}: {reason}")
        self.path = path
        self.reason = reason


def decode_image_file(path, draft_size: int | None = None) -> np.ndarray:
    """Reads an image file robustly as RGB uint8.

    Args:
        path: a JPEG, PNG, GIF or BMP file (other formats Pillow reads also work).
        draft_size: when set, a large JPEG may be decoded at 1/2, 1/4 or 1/8 scale, never
            smaller than ``draft_size`` on either side (much faster for big photos).

    Returns:
        uint8 ``(height, width, 3)`` RGB (see the module docstring for the conversions).

    Raises:
        BadImageError (a ValueError): the file is missing, empty, truncated, corrupt, not an
            image, or in a mode that has no RGB conversion. The message names the path.
    """
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        with Image.open(path) as image:
            if draft_size and image.format == "JPEG":
                image.draft(None, (int(draft_size), int(draft_size)))
            image.load()  # a truncated file fails here
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except Image.UnidentifiedImageError:
        raise BadImageError(path, "not an image file Pillow can identify") from None
    except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, EOFError...
        reason = str(error) or type(error).__name__
        raise BadImageError(path, f"corrupt or unsupported image ({reason})") from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image).astype(np.int64)
        gray = ((np.clip(values, 0, 65535) + 128) // 257).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.round(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    rgb = np.array(image.convert("RGB"), dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise InvalidInputError(f"unexpected decoded shape {rgb.shape}")
    return rgb


class BadFileLog:
    """A thread-safe record of skipped image files, each once, in the order found.

    ``add`` is called from the tf.data worker threads; `BadFileReporter` reports new entries at
    the end of each epoch.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: list[tuple[str, str]] = []
        self._seen: set[str] = set()
        # Set by a pipeline that can no longer make a batch (too few classes left with a
        # readable image); `unusable_data_guard` turns the pipeline's error into this line.
        self.unusable: str | None = None

    def add(self, path, reason: str) -> bool:
        """Records ``path`` (with ``reason``); returns False if it was already recorded."""
        path = os.fspath(path)
        with self._lock:
            if path in self._seen:
                return False
            self._seen.add(path)
            self._entries.append((path, str(reason)))
            return True

    def __contains__(self, path) -> bool:
        with self._lock:
            return os.fspath(path) in self._seen

    @property
    def entries(self) -> list[tuple[str, str]]:
        """``(path, reason)`` pairs in the order found."""
        with self._lock:
            return list(self._entries)

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.entries]

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._entries)

    def report(self) -> str:
        """A human-readable summary: the count, then one ``path: reason`` line per file."""
        entries = self.entries
        if not entries:
            return "No bad image files."
        lines = [f"{len(entries)} bad image file(s) skipped:"]
        lines += [f"  {path}: {reason}" for path, reason in entries]
        return "\n".join(lines)


class BadFileReporter(keras.callbacks.Callback):
    """Reports newly skipped image files at the end of each epoch, once each, by path.

    Each new file is printed with ``print_fn`` and logged as a warning on the
    ``"remap.training"`` logger. When logging is not configured at all (no handler anywhere),
    the log record is skipped: Python's last-resort handler would print the same line a second
    time. ``logs["bad_files"]`` gets the total count so far (so History and TensorBoard record
    it).

    Args:
        log: the `BadFileLog` given to the datasets.
        print_fn: where the lines are printed (default `print`; None to only log).

    Example:
        >>> bad = BadFileLog()
        >>> model.fit(make_train_dataset(manifest, bad_files=bad), steps_per_epoch=100,
        ...           callbacks=[BadFileReporter(bad)])
    """

    def __init__(self, log: BadFileLog, print_fn=print):
        super().__init__()
        if not isinstance(log, BadFileLog):
            raise InvalidInputError(f"`log` must be a BadFileLog, received {type(log).__name__}.")
        self.log = log
        self.print_fn = print_fn
        self._reported = 0

    def _report_new(self, when: str) -> None:
        entries = self.log.entries
        # Keras' progress bar (verbose=1) leaves its line open until after this callback.
        newline = "\n" if (self.params or {}).get("verbose") == 1 else ""
        for path, reason in entries[self._reported :]:
            message = f"Skipped bad image file {path} ({reason}) [{when}]"
            if self.print_fn is None or logger.hasHandlers():
                logger.warning(message)
            if self.print_fn is not None:
                self.print_fn(newline + message)
                newline = ""
        self._reported = len(entries)

    def on_epoch_end(self, epoch, logs=None):
        self._report_new(f"epoch {epoch + 1}")
        if logs is not None:
            logs["bad_files"] = self.log.count

    def on_train_end(self, logs=None):
        self._report_new("end of training")


def resolve_log(bad_files) -> BadFileLog:
    """The `BadFileLog` a pipeline records in: ``bad_files``, or for None one that logs each
    bad file as soon as it is found; InvalidInputError for anything else."""
    if bad_files is None:
        return _LoggingBadFileLog()
    if not isinstance(bad_files, BadFileLog):
        raise InvalidInputError(
            f"`bad_files` must be a BadFileLog or None, received {type(bad_files).__name__}."
        )
    return bad_files


class _LoggingBadFileLog(BadFileLog):
    """Used when the caller passes no log: each bad file is logged as soon as it is found."""

    def add(self, path, reason: str) -> bool:
        new = super().add(path, reason)
        if new:
            logger.warning("Skipped bad image file %s (%s)", os.fspath(path), reason)
        return new


@contextlib.contextmanager
def unusable_data_guard(bad_files: BadFileLog):
    """Re-raises an error of the input pipeline as one `InvalidInputError` line when the
    pipeline stopped because too few classes have a readable image (``bad_files.unusable``).

    A pipeline that skips bad files would otherwise wait forever for a batch it can never
    complete (every path of a CSV missing, say), inside TensorFlow where Ctrl-C cannot reach.
    """
    try:
        yield
    except Exception:
        if bad_files.unusable is not None:
            raise InvalidInputError(bad_files.unusable) from None
        raise
