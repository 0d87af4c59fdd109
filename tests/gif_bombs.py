"""Crafted GIFs for the pixel-limit tests: a small screen, a large frame, a tiny file.

The frame's pixels are one colour, coded with LZW the way encoders do it (runs of 1, 2, 3,
... pixels, one code each, a clear code when the table is full), so a 2000x2000 frame takes
2.7 KB and a 7200x7200 one 35 KB, and TensorFlow decodes them completely: before the graph
read every frame's size, they passed the pixel limit (their screen is 8x8) and were decoded.
"""

from __future__ import annotations

import struct

_CLEAR, _END, _FIRST = 4, 5, 6  # LZW codes for a minimum code size of 2 (4 colours)


class _Bits:
    def __init__(self):
        self.out, self.value, self.count = bytearray(), 0, 0

    def put(self, code: int, width: int) -> None:
        self.value |= code << self.count
        self.count += width
        while self.count >= 8:
            self.out.append(self.value & 0xFF)
            self.value >>= 8
            self.count -= 8

    def flush(self) -> bytes:
        if self.count:
            self.out.append(self.value & 0xFF)
        return bytes(self.out)


def lzw_zeros(pixels: int) -> bytes:
    """GIF LZW data (minimum code size 2) for ``pixels`` pixels of colour 0."""
    bits, width = _Bits(), 3
    bits.put(_CLEAR, width)
    next_code, longest, left = _FIRST, 1, pixels
    while left:
        run = min(longest, left)
        bits.put(0 if run == 1 else _FIRST + run - 2, width)
        left -= run
        next_code, longest = next_code + 1, longest + 1  # the encoder adds run + 1 zeros
        if next_code == (1 << width) + 1 and width < 12:  # the decoder is one code behind
            width += 1
        if next_code == 4096 and left:
            bits.put(_CLEAR, width)
            width, next_code, longest = 3, _FIRST, 1
    bits.put(_END, width)
    return bits.flush()


def sub_blocks(data: bytes) -> bytes:
    """``data`` as GIF sub-blocks of at most 255 bytes, then the empty terminator."""
    chunks = [data[i : i + 255] for i in range(0, len(data), 255)]
    return b"".join(bytes([len(chunk)]) + chunk for chunk in chunks) + b"\x00"


def frame(width: int, height: int, pixels: int | None = None) -> bytes:
    """A graphic control extension and an image descriptor with its data (colour 0)."""
    control = b"\x21\xf9\x04\x00\x00\x00\x00\x00"
    descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    count = width * height if pixels is None else pixels
    return control + descriptor + b"\x02" + sub_blocks(lzw_zeros(count))


def gif(screen=(8, 8), frames=((8, 8),)) -> bytes:
    """A GIF89a: ``screen`` (width, height), a 4-colour global table, then ``frames``."""
    header = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x81, 0, 0)
    palette = bytes([0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 255, 0])
    return header + palette + b"".join(frame(w, h) for w, h in frames) + b"\x3b"


def bomb(width: int, height: int) -> bytes:
    """An 8x8 screen whose one frame is ``width`` x ``height``."""
    return gif(screen=(8, 8), frames=((width, height),))
