"""Load one field photo safely: bomb check, EXIF orientation, RGB, bounded pixel count.

Order matters (SPEC §3): the declared size is checked *before* anything is decoded (a decompression
bomb is refused without allocating it), EXIF orientation is applied before any resize (field photos are
often stored rotated), and the result is resized, keeping the aspect ratio, so that ``H·W`` lies within
``[min_pixels, max_pixels]`` (the processor does its own patch-grid rounding afterwards; this bound just
caps memory and decode time).

PIL's global ``Image.MAX_IMAGE_PIXELS`` is left alone: the limit is a parameter here. PIL's own check
still runs inside ``Image.open`` (it raises above ``2 * MAX_IMAGE_PIXELS``); that error is reported as an
:class:`ImageError` like ours.

>>> img = load_image("IMG_01.jpg", min_pixels=4096, max_pixels=786432)  # doctest: +SKIP
>>> img.mode, img.width * img.height <= 786432  # doctest: +SKIP
('RGB', True)
"""

from __future__ import annotations

import logging
import math
import struct
from pathlib import Path

from PIL import Image, ImageOps

from bbuqc_lightning.data.tree import DataError, GroupRecord

log = logging.getLogger(__name__)

# PIL's own default warning threshold (~ 9459 x 9459); a 48 MP phone photo is far below it.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# What PIL raises for unreadable, truncated or malformed files (struct.error / IndexError come from
# broken headers of some formats).
DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    Image.DecompressionBombError,
)


class ImageError(DataError):
    """An image that cannot be used (unreadable, corrupt, truncated, too large); names the path."""


def load_image(
    path: str | Path,
    min_pixels: int,
    max_pixels: int,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Open ``path`` as an upright RGB image with ``min_pixels <= W·H <= max_pixels``.

    Raises :class:`ImageError` (naming the path) for a missing, corrupt or truncated file and for a
    declared size above ``max_image_pixels`` (checked before decoding).
    """
    _check_pixel_window(min_pixels, max_pixels)
    return resize_within(_open_upright_rgb(Path(path), max_pixels, max_image_pixels), min_pixels, max_pixels)


def _check_pixel_window(min_pixels: int, max_pixels: int) -> None:
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels=} {max_pixels=}")


def _open_upright_rgb(path: Path, max_pixels: int, max_image_pixels: int) -> Image.Image:
    """Everything :func:`load_image` does but the final resize (which cannot fail): every error it can raise."""
    try:
        with Image.open(path) as img:
            _check_declared_size(path, img, max_image_pixels)
            _draft(img, max_pixels)
            img.load()  # force the full decode here: truncation/corruption surfaces now, located
            upright = ImageOps.exif_transpose(img)
            return _to_rgb(upright)
    except ImageError:
        raise
    except DECODE_ERRORS as err:
        raise ImageError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err


def validate_group_images(
    record: GroupRecord,
    min_pixels: int,
    max_pixels: int,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> None:
    """Load every image of ``record`` as inference will, less the final resize (it cannot fail, and was half
    the check's time for field photos); raise on the first bad one.

    Called by the DataModule before inference so that ``strict`` / skip is decided per *group*: with
    ``strict=false`` a group with one bad photo is skipped whole rather than summarised with a gap.
    The :class:`ImageError` names the group's ``ticket_key`` and the image path.
    """
    _check_pixel_window(min_pixels, max_pixels)
    for path in record.image_paths:
        try:
            _open_upright_rgb(Path(path), max_pixels, max_image_pixels)
        except ImageError as err:
            raise ImageError(f"group {record.ticket_key}: {err}") from err


def target_size(width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Size with the same aspect ratio and ``min_pixels <= W·H <= max_pixels`` (if already, unchanged).

    >>> target_size(4000, 3000, 4096, 786432)
    (1024, 768)
    >>> target_size(32, 32, 4096, 786432)
    (64, 64)
    """
    pixels = width * height
    if min_pixels <= pixels <= max_pixels:
        return width, height
    scale = math.sqrt((max_pixels if pixels > max_pixels else min_pixels) / pixels)
    if pixels > max_pixels:
        w, h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
        # Extreme aspect ratios: clamping the short side to 1 px can overshoot; shrink the long side.
        if w * h > max_pixels:
            w, h = (w, max_pixels // w) if h > w else (max_pixels // h, h)
    else:
        w, h = math.ceil(width * scale), math.ceil(height * scale)
        if w * h > max_pixels:  # rounding up overshot a narrow [min, max] window
            w, h = (w, max(1, max_pixels // w)) if h > w else (max(1, max_pixels // h), h)
    return w, h


def resize_within(img: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """Bicubic resize (aspect kept) into the pixel window; returns ``img`` itself when already inside."""
    size = target_size(img.width, img.height, min_pixels, max_pixels)
    if size == img.size:
        return img
    log.debug("resizing %s -> %s", img.size, size)
    return img.resize(size, Image.Resampling.BICUBIC)


def _check_declared_size(path: Path, img: Image.Image, max_image_pixels: int) -> None:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{path}: invalid declared size {width}x{height}")
    if width * height > max_image_pixels:
        raise ImageError(
            f"{path}: declared size {width}x{height} = {width * height} pixels exceeds the limit "
            f"{max_image_pixels} (possible decompression bomb); refusing to decode"
        )


def _draft(img: Image.Image, max_pixels: int) -> None:
    """JPEG only: let the decoder downscale by 1/2..1/8 while staying above the final size (faster)."""
    if img.format != "JPEG":
        return
    width, height = target_size(img.width, img.height, 1, max_pixels)
    if (width, height) != img.size:
        img.draft("RGB", (width, height))


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparent pixels (screenshots, PNG exports) are composited on white, not on black."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
