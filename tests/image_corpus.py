"""A corpus of odd and bad image files, generated on the fly (nothing is committed).

`GOOD_ODD_IMAGES`: valid images in unusual forms that must decode to the right RGB picture.
`BAD_IMAGES`: files that are not usable images; `on_bad_image` decides whether they are skipped or an error.
Used by tests/test_data.py (decoding) and tests/test_reliability.py (the CLI under both policies).
"""
from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
import PIL.Image


def encode(image: PIL.Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def random_rgb(height: int, width: int, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def top_red_bottom_blue(width: int = 40, height: int = 20) -> PIL.Image.Image:
    image = PIL.Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (0, height // 2, width, height))
    return image


def exif_rotated_jpeg() -> bytes:
    """Stored 40x20 top red / bottom blue, EXIF orientation 6: displayed 20x40, blue left, red right."""
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    return encode(top_red_bottom_blue(), "JPEG", exif=exif.tobytes(), quality=95)


def cmyk_red_jpeg() -> bytes:
    return encode(PIL.Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)


def rgba_png() -> bytes:
    """Left half fully transparent (black underneath), right half half-transparent red."""
    image = PIL.Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    image.paste((255, 0, 0, 128), (8, 0, 16, 16))
    return encode(image, "PNG")


def palette_png() -> bytes:
    """Palette: index 0 opaque red, index 1 green marked transparent; left half uses index 1."""
    image = PIL.Image.new("P", (16, 16), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.paste(1, (0, 0, 8, 16))
    return encode(image, "PNG", transparency=1)


def gray16_png(value: int = 51000) -> bytes:
    return encode(PIL.Image.fromarray(np.full((16, 16), value, dtype=np.uint16)), "PNG")


def gray_png(value: int = 77) -> bytes:
    return encode(PIL.Image.new("L", (16, 16), value), "PNG")


def one_pixel_png() -> bytes:
    """A single green pixel: upscaled, the whole decoded image is green."""
    return encode(PIL.Image.new("RGB", (1, 1), (0, 200, 0)), "PNG")


def wide_png() -> bytes:
    """10000x10: red, with a blue band of 40 columns in the middle; the center square is all blue."""
    image = PIL.Image.new("RGB", (10000, 10), (255, 0, 0))
    image.paste((0, 0, 255), (4980, 0, 5020, 10))
    return encode(image, "PNG")


def truncated_jpeg() -> bytes:
    data = encode(random_rgb(64, 64), "JPEG")
    return data[: len(data) // 2]


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


@functools.cache
def decompression_bomb_png(side: int = 10000) -> bytes:
    """A real bomb: a ~12 kB 1-bit PNG of side x side (1e8) pixels, 300 MB once decoded to RGB.

    1e8 is above PIL.Image.MAX_IMAGE_PIXELS (89 478 485, where PIL only warns) and below twice that
    (where PIL refuses to open), so it is the decoder's own limit that must catch it.
    """
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data)
            + _png_chunk(b"IEND", b""))


GOOD_ODD_IMAGES = {  # file name -> bytes (expected pixels: see test_data.test_odd_images_decode_to_the_right_rgb)
    "cmyk.jpg": cmyk_red_jpeg,
    "rgba.png": rgba_png,
    "palette.png": palette_png,
    "gray16.png": gray16_png,
    "gray.png": gray_png,
    "exif.jpg": exif_rotated_jpeg,
    "one_pixel.png": one_pixel_png,
    "wide.png": wide_png,
    "good.png": lambda: encode(random_rgb(24, 36), "PNG"),
}
BAD_IMAGES = {  # file name -> (bytes, words expected in the reason)
    "truncated.jpg": (truncated_jpeg, "truncated"),
    "empty.jpg": (lambda: b"", "0 bytes"),
    "notimage.png": (lambda: b"this is plain text, not a PNG", "format"),
    "bomb.png": (decompression_bomb_png, "decompression bomb"),
}
