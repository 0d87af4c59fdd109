"""What an image will cost to decode, read from its headers without decoding it.

A GIF's header gives the size of its logical screen, but TensorFlow's decoder (giflib) makes
a raster for every frame and an output as wide as the widest frame and as tall as the
tallest: a 70 KB GIF with a 100x100 screen and one 10000x10000 frame decodes to 300 MB.
`gif_extent` walks the GIF's blocks the way giflib does (header, colour tables, extension
blocks and image descriptors; the sub-blocks of extensions and of image data are skipped by
their length bytes, never decompressed) and returns the largest extent over the screen and
every frame. ``remap_tf.export.graph`` runs the same walk in the exported graph with
TensorFlow ops; the in-process embedder runs this one before the graph sees the bytes.

The walk stops after `GIF_MAX_BLOCKS` blocks and sub-blocks: a file of a million one-byte
sub-blocks would otherwise cost a million steps. Encoders write 255-byte sub-blocks, so the
limit is far above any GIF that fits a request (100000 x 255 bytes = 25 MB).

Standard library only: importing this module does not import TensorFlow.
"""

from __future__ import annotations

from typing import NamedTuple

from remap_tf.contract import GIF_BLOCKS, IMAGE_SIGNATURES, PIXEL_LIMIT, check_message

GIF_MAX_BLOCKS = 100_000
# Byte values that start a GIF block (GIF89a specification, section 15 onwards).
GIF_EXTENSION = 0x21
GIF_IMAGE = 0x2C
GIF_SCREEN_END = 13  # header (6) + logical screen descriptor (7)
GIF_IMAGE_DESCRIPTOR = 10  # separator + left, top, width, height (2 bytes each) + flags
_COLOR_TABLE_FLAG = 0x80


class GifExtent(NamedTuple):
    """The decoding cost of a GIF: its largest extent over the logical screen and every frame.

    Attributes:
        width: the widest of the screen and the frames, in pixels.
        height: the tallest of the screen and the frames, in pixels.
        frames: image descriptors read.
        complete: False when the walk stopped at ``max_blocks`` with blocks left.
    """

    width: int
    height: int
    frames: int
    complete: bool


def color_table_bytes(flags: int) -> int:
    """Size of the colour table a screen or image descriptor's flags byte announces."""
    return 3 << ((flags & 7) + 1) if flags & _COLOR_TABLE_FLAG else 0


def _byte(data: bytes, at: int) -> int:
    """``data[at]``, or 0 past the end (as the graph reads a short header: zero-padded)."""
    return data[at] if at < len(data) else 0


def _u16(data: bytes, at: int) -> int:
    return _byte(data, at) | _byte(data, at + 1) << 8


def gif_extent(data: bytes, max_blocks: int = GIF_MAX_BLOCKS) -> GifExtent | None:
    """The largest width and height over a GIF's screen and frames, from its blocks alone.

    Args:
        data: the encoded file.
        max_blocks: blocks and sub-blocks walked at most.

    Returns:
        a `GifExtent`, or None when ``data`` is not a GIF. A file cut short gives the frames
        read before the cut (as giflib decodes them).

    Example:
        >>> screen = b"GIF89a" + bytes([100, 0, 100, 0, 0, 0, 0])
        >>> frame = b"," + bytes([0, 0, 0, 0, 0x10, 0x27, 0x10, 0x27, 0]) + b"\\x02\\x00"
        >>> gif_extent(screen + frame + b";")
        GifExtent(width=10000, height=10000, frames=1, complete=True)
    """
    if not data.startswith(IMAGE_SIGNATURES["gif"]):
        return None
    width, height = _u16(data, 6), _u16(data, 8)
    at = GIF_SCREEN_END + color_table_bytes(_byte(data, 10))
    frames, in_sub_blocks = 0, False
    for _ in range(max_blocks):
        if at >= len(data):
            return GifExtent(width, height, frames, True)
        byte = data[at]
        if in_sub_blocks:  # a length byte: 0 ends the run of sub-blocks
            at, in_sub_blocks = at + 1 + byte, byte > 0
        elif byte == GIF_EXTENSION:  # introducer, label, then sub-blocks
            at, in_sub_blocks = at + 2, True
        elif byte == GIF_IMAGE:  # descriptor, local colour table, LZW code size, sub-blocks
            frames += 1
            width, height = max(width, _u16(data, at + 5)), max(height, _u16(data, at + 7))
            at += GIF_IMAGE_DESCRIPTOR + color_table_bytes(_byte(data, at + 9)) + 1
            in_sub_blocks = True
        else:  # the trailer, or a byte giflib stops at
            return GifExtent(width, height, frames, True)
    return GifExtent(width, height, frames, at >= len(data))


def pixel_limit_reason(what: str, width, height, max_pixels: int) -> str:
    """The pixel-limit message of the exported graph and of the host-side check.

    ``what`` names the image (``"images[3] is"``); the graph passes ``"{}"`` for the sizes it
    only knows at run time (a `tf.strings.format` template).
    """
    return (
        check_message(PIXEL_LIMIT) + f"{what} {width}x{height} pixels; this export accepts 1 "
        f"to {max_pixels} pixels."
    )


def gif_blocks_reason(what: str, max_blocks: int = GIF_MAX_BLOCKS) -> str:
    """The message for a GIF whose blocks were not all read within ``max_blocks``."""
    return (
        check_message(GIF_BLOCKS) + f"{what} a GIF of more than {max_blocks} blocks and "
        "sub-blocks; it is not decoded."
    )


def check_gif(data: bytes, index: int, max_pixels: int) -> str | None:
    """The graph's refusal of a GIF (pixel limit over every frame, block limit), or None.

    Args:
        data: encoded image bytes (anything that is not a GIF passes: the graph checks it).
        index: the image's position in its request (named in the message).
        max_pixels: the export's limit on ``width * height``.
    """
    extent = gif_extent(data)
    if extent is None:
        return None
    what = f"images[{index}] is"
    if not extent.complete:
        return gif_blocks_reason(what)
    if min(extent.width, extent.height) < 1 or extent.width * extent.height > max_pixels:
        return pixel_limit_reason(what, extent.width, extent.height, max_pixels)
    return None
