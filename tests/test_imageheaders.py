"""`remap_tf.imageheaders`: a GIF's decoding cost from its blocks, in plain Python (no TF).

The GIFs are built byte by byte here, so each expected extent can be read off the bytes;
tests/test_export.py checks that the graph's walk gives the same answers."""

from __future__ import annotations

import io
import struct

import pytest
from PIL import Image

from remap_tf import contract, imageheaders
from remap_tf.imageheaders import GifExtent, check_gif, gif_extent
from tests import gif_bombs

SCREEN = b"GIF89a" + struct.pack("<HHBBB", 100, 100, 0, 0, 0)  # 100x100, no colour table


def _frame(width: int, height: int, flags: int = 0, table: bytes = b"") -> bytes:
    """An image descriptor, its colour table and a 1-byte LZW sub-block (never decoded)."""
    return b"," + struct.pack("<HHHHB", 0, 0, width, height, flags) + table + b"\x02\x01\x00\x00"


def test_the_screen_alone():
    assert gif_extent(SCREEN + b";") == GifExtent(100, 100, 0, True)


def test_a_frame_larger_than_the_screen_counts():
    """100x100 screen, one 10000x10000 frame: TensorFlow would decode 10000x10000."""
    assert gif_extent(SCREEN + _frame(10_000, 10_000) + b";") == GifExtent(10_000, 10_000, 1, True)


def test_the_widest_and_the_tallest_frame_combine():
    """Frames 300x2 and 5x400: the decoder's output is 300 wide and 400 tall."""
    data = SCREEN + _frame(300, 2) + _frame(5, 400) + b";"
    assert gif_extent(data) == GifExtent(300, 400, 2, True)


def test_extensions_and_colour_tables_are_skipped_not_read_as_frames():
    """A global table of 2^(1+1) colours (12 bytes), a comment full of ',' (the image
    separator) and a local table of 2^(2+1) colours (24 bytes) are skipped by their sizes."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 10, 10, 0x81, 0, 0) + bytes(12)
    comment = b"\x21\xfe\x09" + b"," + struct.pack("<HHHH", 0, 0, 9999, 9999) + b"\x00"
    data = screen + comment + _frame(20, 30, flags=0x82, table=b"," * 24) + b";"
    assert gif_extent(data) == GifExtent(20, 30, 1, True)


def test_a_file_cut_short_gives_the_frames_before_the_cut():
    """giflib decodes what it read: the frames before the cut count, a descriptor cut in
    its size field reads the missing bytes as 0 (as the graph reads a short header)."""
    data = SCREEN + _frame(200, 200) + _frame(300, 300)
    assert gif_extent(data[:-3]) == GifExtent(300, 300, 2, True)
    cut = SCREEN + b"," + struct.pack("<HHB", 0, 0, 0x10)  # width's low byte only
    assert gif_extent(cut) == GifExtent(100, 100, 1, True)
    assert gif_extent(b"GIF89a\x05") == GifExtent(5, 0, 0, True)


def test_the_walk_stops_after_max_blocks():
    """A comment of 40 one-byte sub-blocks (the introducer, 40, the terminator: 42 steps),
    a frame (descriptor, one sub-block, terminator: 3 steps) and the trailer: 46 steps."""
    data = SCREEN + b"\x21\xfe" + b"\x01x" * 40 + b"\x00" + _frame(900, 9) + b";"
    assert gif_extent(data, max_blocks=42) == GifExtent(100, 100, 0, False)
    assert gif_extent(data, max_blocks=45) == GifExtent(900, 100, 1, False)
    assert gif_extent(data, max_blocks=46) == GifExtent(900, 100, 1, True)


def test_other_formats_are_not_gifs():
    assert gif_extent(b"\x89PNG\r\n\x1a\n" + bytes(30)) is None
    assert gif_extent(b"") is None
    assert check_gif(b"\xff\xd8\xff" + bytes(30), 0, 10) is None


def test_check_gif_gives_the_graphs_messages():
    bomb = gif_bombs.bomb(7200, 7200)
    assert check_gif(bomb, 3, 50_000_000) == (
        f"{contract.CHECK_PREFIX} (pixel limit): images[3] is 7200x7200 pixels; this export "
        "accepts 1 to 50000000 pixels."
    )
    assert check_gif(bomb, 0, 7200 * 7200) is None
    assert "images[0] is 0x0 pixels" in check_gif(b"GIF89a", 0, 10)
    blocks = SCREEN + b"\x21\xfe" + b"\x01x" * (imageheaders.GIF_MAX_BLOCKS + 1)
    assert "(gif blocks): images[2] is a GIF of more than 100000 blocks" in check_gif(
        blocks, 2, 10**9
    )


@pytest.mark.parametrize(("width", "height"), [(8, 8), (37, 11), (2000, 2000)])
def test_the_crafted_gifs_read_as_built(width, height):
    """tests/gif_bombs.py's GIFs: the extent is the frame's, and Pillow decodes them whole
    (its LZW data is valid, so TensorFlow would decode all of it too)."""
    data = gif_bombs.bomb(width, height)
    assert gif_extent(data) == GifExtent(max(width, 8), max(height, 8), 1, True)
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.size == (width, height)
