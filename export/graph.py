"""The exported graph's input handling, as pure TensorFlow functions on tensors.

- `image_header_shape`: the size of a JPEG, PNG, GIF or BMP read from its header, failing
  with INVALID_ARGUMENT for any other bytes, before any decoder sees them;
- `gif_extent`: a GIF's largest width and height over its screen and every frame, from its
  blocks (`remap_tf.imageheaders.gif_extent` in TensorFlow ops): what the GIF decoder
  allocates, which its screen size alone does not bound;
- `check_pixels`: the decompression-bomb guard (``height * width <= max_pixels``);
- `decode_checked`: checks, then decodes to uint8 RGB;
- `resize_images` (`remap_tf.ops`'s): aspect-keeping resize to a long side (float32 0-255);
- `make_embed_fn` and `signature_functions`: the two serving signatures of a model.

Only stock TensorFlow ops, so the SavedModel loads in a process that imports TensorFlow
alone (TF Serving, ``tf.saved_model.load``). Tests and benchmarks use these functions to build
reference inputs.
"""

from __future__ import annotations

import tensorflow as tf

from remap_tf.contract import (
    BYTES_SIGNATURE,
    IMAGE_SIGNATURES,
    INPUT_KEY,
    NOT_AN_IMAGE,
    OUTPUT_KEY,
    PIXELS_SIGNATURE,
    check_message,
)
from remap_tf.imageheaders import (
    GIF_EXTENSION,
    GIF_IMAGE,
    GIF_IMAGE_DESCRIPTOR,
    GIF_MAX_BLOCKS,
    GIF_SCREEN_END,
    gif_blocks_reason,
    pixel_limit_reason,
)
from remap_tf.model import multiscale_descriptors
from remap_tf.ops import resize_images  # noqa: F401  (re-exported: tests, benchmarks)

_HEADER_BYTES = 32


def _uint(header, start: int, count: int, big_endian: bool):
    values = [tf.cast(header[start + i], tf.int64) for i in range(count)]
    if big_endian:
        values = values[::-1]
    total = tf.constant(0, tf.int64)
    for i, value in enumerate(values):
        total += value * (256**i)
    return total


def _matches(header, magic: bytes):
    return tf.reduce_all(tf.equal(header[: len(magic)], tf.constant(list(magic), tf.int64)))


def _color_table_bytes(flags):
    present = tf.bitwise.bitwise_and(flags, 0x80) > 0
    return tf.where(present, tf.bitwise.left_shift(3, tf.bitwise.bitwise_and(flags, 7) + 1), 0)


def gif_extent(data, max_blocks: int = GIF_MAX_BLOCKS):
    """``(height, width, complete)`` of a GIF: its largest extent over screen and frames.

    The block walk of `remap_tf.imageheaders.gif_extent` (the reference, in plain Python),
    step for step: one loop step per block or sub-block, the sub-blocks skipped by their
    length bytes, nothing decompressed, at most ``max_blocks`` steps (``complete`` is False
    when blocks were left).

    Args:
        data: a scalar tf.string starting with a GIF signature.
        max_blocks: loop steps at most.

    Returns:
        int64 height and width scalars and a bool scalar.
    """
    raw = tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int32)
    size = tf.size(raw)
    padded = tf.concat([raw, tf.zeros([1], tf.int32)], 0)  # past the end reads 0

    def byte(at):
        return tf.gather(padded, tf.minimum(at, size))

    def u16(at):
        return byte(at) + 256 * byte(at + 1)

    def step(at, in_sub_blocks, width, height, steps, done):
        value = byte(at)
        in_blocks = tf.logical_not(in_sub_blocks)
        extension = tf.logical_and(in_blocks, tf.equal(value, GIF_EXTENSION))
        image = tf.logical_and(in_blocks, tf.equal(value, GIF_IMAGE))
        block = tf.logical_or(extension, image)
        done = tf.logical_or(at >= size, tf.logical_and(in_blocks, tf.logical_not(block)))
        width = tf.where(image, tf.maximum(width, u16(at + 5)), width)
        height = tf.where(image, tf.maximum(height, u16(at + 7)), height)
        image_end = at + GIF_IMAGE_DESCRIPTOR + _color_table_bytes(byte(at + 9)) + 1
        at = tf.where(in_sub_blocks, at + 1 + value, tf.where(extension, at + 2, image_end))
        in_sub_blocks = tf.where(in_sub_blocks, value > 0, block)
        return at, in_sub_blocks, width, height, steps + 1, done

    start = GIF_SCREEN_END + _color_table_bytes(byte(10))
    state = (start, tf.constant(False), u16(6), u16(8), tf.constant(0), tf.constant(False))
    at, _, width, height, _, done = tf.while_loop(
        lambda *s: tf.logical_and(tf.logical_not(s[5]), s[4] < max_blocks), step, state
    )
    complete = tf.logical_or(done, at >= size)
    return tf.cast(height, tf.int64), tf.cast(width, tf.int64), complete


def image_header_shape(data, index):
    """Reads ``(height, width)`` from the header of a JPEG, PNG, GIF or BMP, without decoding.

    Fails with INVALID_ARGUMENT (``"remap input check failed (not an image): ..."``) for
    bytes of any other format, so no decoder ever sees them.

    Args:
        data: a scalar tf.string, the encoded image.
        index: a scalar int, its position in the request (named in the error message).

    Returns:
        ``(height, width)``: two int64 scalar tensors.
    """
    prefix = tf.strings.substr(data, 0, _HEADER_BYTES)
    padded = tf.strings.substr(
        tf.strings.join([prefix, tf.constant(b"\0" * _HEADER_BYTES)]), 0, _HEADER_BYTES
    )
    header = tf.cast(tf.io.decode_raw(padded, tf.uint8), tf.int64)
    is_jpeg, is_png, is_gif, is_bmp = (
        tf.reduce_any([_matches(header, magic) for magic in IMAGE_SIGNATURES[name]])
        for name in ("jpeg", "png", "gif", "bmp")
    )
    known = tf.reduce_any(tf.stack([is_jpeg, is_png, is_gif, is_bmp]))
    message = tf.strings.format(
        check_message(NOT_AN_IMAGE) + "images[{}] is not JPEG, PNG, GIF or BMP data ({} bytes).",
        (index, tf.strings.length(data)),
    )
    check = tf.debugging.Assert(known, [message])
    with tf.control_dependencies([check]):

        def jpeg():
            shape = tf.io.extract_jpeg_shape(data, output_type=tf.int64)
            return shape[0], shape[1]

        def png():
            return _uint(header, 20, 4, True), _uint(header, 16, 4, True)

        def gif():  # every frame counts, not only the screen (remap_tf.imageheaders)
            height, width, complete = gif_extent(data)
            reason = tf.strings.format(gif_blocks_reason("images[{}] is"), (index,))
            with tf.control_dependencies([tf.debugging.Assert(complete, [reason])]):
                return tf.identity(height), tf.identity(width)

        def bmp():
            core = tf.equal(_uint(header, 14, 4, False), 12)  # BITMAPCOREHEADER: 16-bit sizes
            width = tf.where(core, _uint(header, 18, 2, False), _uint(header, 18, 4, False))
            height = tf.where(core, _uint(header, 20, 2, False), _uint(header, 22, 4, False))
            # Height is a signed 32-bit value (negative: top-down rows).
            height = tf.where(height >= 2**31, 2**32 - height, height)
            return height, width

        height, width = tf.case(
            [(is_jpeg, jpeg), (is_png, png), (is_gif, gif)], default=bmp, exclusive=False
        )
    return height, width


def check_pixels(height, width, index, max_pixels: int):
    """An assert op: ``0 < height * width <= max_pixels``, else INVALID_ARGUMENT.

    ``index`` (a scalar int tensor) names the image in the message; None names the whole
    batch (``embed_pixels``, where all images share one size).
    """
    height = tf.cast(height, tf.int64)
    width = tf.cast(width, tf.int64)
    ok = tf.logical_and(
        tf.logical_and(height > 0, width > 0), height * width <= tf.constant(max_pixels, tf.int64)
    )
    what, values = ("images[{}] is", [index]) if index is not None else ("images are", [])
    message = tf.strings.format(
        pixel_limit_reason(what, "{}", "{}", max_pixels), (*values, width, height)
    )
    return tf.debugging.Assert(ok, [message])


def decode_checked(data, index, max_pixels: int):
    """Checks then decodes one encoded image to uint8 RGB ``(height, width, 3)``.

    Order: format check and header size (no decoding), pixel limit, then decoding
    (grayscale and RGBA become RGB; an animated GIF gives its first frame).
    """
    height, width = image_header_shape(data, index)
    with tf.control_dependencies([check_pixels(height, width, index, max_pixels)]):
        pixels = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    pixels.set_shape([None, None, 3])
    return pixels


def make_embed_fn(model, options):
    """``embed(pixels (batch, h, w, 3)) -> (batch, dim)`` float32: resize, model, combine.

    Args:
        model: the Keras model, ``(batch, h, w, 3)`` RGB 0-255 to ``(batch, dim)``.
        options: a `remap_tf.export.saved_model.ExportOptions` (sizes, fixed size).
    """

    def embed(pixels):
        return multiscale_descriptors(model, pixels, options.sizes(), options.fixed_size)

    return embed


def signature_functions(model, options, dim: int) -> dict:
    """The serving signatures: ``{name: (python function, input TensorSpec)}``.

    ``serving_default`` checks, decodes and embeds each encoded image on its own
    (``tf.map_fn``), so images of different sizes share a request and a descriptor never
    depends on the rest of the batch; ``embed_pixels`` embeds a uint8 batch of one size (an
    empty batch gives ``(0, dim)``).
    """
    embed = make_embed_fn(model, options)

    def embed_bytes(images):
        count = tf.shape(images)[0]

        def one(args):
            data, index = args
            pixels = decode_checked(data, index, options.max_pixels)
            return embed(pixels[tf.newaxis])[0]

        descriptors = tf.map_fn(
            one,
            (images, tf.range(count)),
            fn_output_signature=tf.TensorSpec((dim,), tf.float32),
            parallel_iterations=4,
        )
        return {OUTPUT_KEY: tf.reshape(descriptors, (-1, dim))}

    def embed_pixels(images):
        shape = tf.shape(images, out_type=tf.int64)

        def empty():
            return tf.zeros((0, dim), tf.float32)

        def nonempty():
            check = check_pixels(shape[1], shape[2], None, options.max_pixels)
            with tf.control_dependencies([check]):
                return tf.reshape(embed(images), (-1, dim))

        return {OUTPUT_KEY: tf.cond(tf.equal(shape[0], 0), empty, nonempty)}

    return {
        BYTES_SIGNATURE: (embed_bytes, tf.TensorSpec((None,), tf.string, name=INPUT_KEY)),
        PIXELS_SIGNATURE: (
            embed_pixels,
            tf.TensorSpec((None, None, None, 3), tf.uint8, name=INPUT_KEY),
        ),
    }
