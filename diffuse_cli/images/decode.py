"""One image file in: opened whatever its format and mode (16-bit, palette, CMYK, alpha, EXIF orientation, a
200-megapixel JPEG at a reduced scale), resized on its short side and centre-cropped as training does; or, for
a file that cannot be used, the reason, in words a person can act on. data.py reads folders with it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, ImageSequence, JpegImagePlugin

from ..errors import DataError


def _to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode (16-bit, palette, CMYK, with alpha) -> 'RGB' or 'L', transparency on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        im = Image.fromarray((arr.clip(0, top) / top * 255).round().astype(np.uint8), "L")
    if im.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im.convert("L" if channels == 1 else "RGB")


class TooLarge(DataError):
    """A file that would decode to more pixels than PIL's decompression-bomb limit allows."""


def _open_header(path: str | os.PathLike) -> Image.Image:
    """Image.open (the header only), except that a JPEG over PIL's hard limit (twice
    MAX_IMAGE_PIXELS, judged by its full size) opens too: open_image decodes it at a reduced scale
    and applies the limit to the pixels that decodes to."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError:
        with open(path, "rb") as f:
            if f.read(3) != b"\xff\xd8\xff":  # not a JPEG
                raise TooLarge(f"over twice PIL's limit of {Image.MAX_IMAGE_PIXELS:,} pixels") from None
        return JpegImagePlugin.JpegImageFile(path)


def open_image(path: str | os.PathLike, channels: int, draft: int | None = None) -> Image.Image:
    """Decode a file's first frame, EXIF orientation applied, as 'RGB' or 'L'.

    draft: a JPEG may decode at 1/2, 1/4 or 1/8 scale, never below this short side; that is
    what lets a 200-megapixel phone photo through PIL's limit (MAX_IMAGE_PIXELS, ~89M pixels),
    which applies to the pixels actually decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's warnings become our per-file reasons
        with _open_header(path) as im:
            if im.width < 1 or im.height < 1:
                raise ValueError("has no pixels")
            im = next(ImageSequence.Iterator(im))  # first frame of a GIF/WebP/TIFF
            if draft and im.format == "JPEG" and im.mode in ("RGB", "L"):
                im.draft(im.mode, (draft, draft))  # decode at a reduced scale, never below `draft`
            limit = Image.MAX_IMAGE_PIXELS
            if limit and im.width * im.height > limit:
                raise TooLarge(f"{im.width}x{im.height}, over PIL's limit of {limit:,} pixels")
            return _to_mode(ImageOps.exif_transpose(im), channels)


def to_tensor(im: Image.Image) -> torch.Tensor:
    """A PIL image as uint8 (C, H, W)."""
    arr = np.asarray(im, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def read_image(path: str | os.PathLike, channels: int = 3, max_side: int = 0) -> torch.Tensor:
    """One image at its own size, or shrunk to max_side on its long side if longer (0: never): (C, H, W) uint8."""
    im = open_image(path, channels, draft=max_side or None)
    longest = max(im.size)
    if max_side and longest > max_side:
        im = im.resize(tuple(max(1, round(n * max_side / longest)) for n in im.size), Image.Resampling.BICUBIC,
                       reducing_gap=3.0)
    return to_tensor(im)


def image_dimensions(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of a file's first frame as shown (EXIF orientation applied), from its header."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _open_header(path) as im:
            transposed = im.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)
            return (im.height, im.width) if transposed else im.size


def decode_image(path: str | os.PathLike, size: int, channels: int = 3) -> torch.Tensor:
    """Decode one file, resize the short side to `size` and centre-crop: (C, size, size) uint8."""
    return _decode(path, size, channels)[0]


def _decode(path: str | os.PathLike, size: int, channels: int) -> tuple[torch.Tensor, int]:
    """decode_image's result and the file's own short side (a JPEG draft never goes below `size`)."""
    im = open_image(path, channels, draft=size)
    return to_tensor(resize_crop(im, size)), min(im.size)


def resize_crop(im: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize the short side to `size` and centre-crop a square: what training does to every image."""
    scale = size / min(im.size)
    w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
    im = im.resize((w, h), resample, reducing_gap=3.0 if resample != Image.Resampling.NEAREST else None)
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


# Images that Pillow cannot read, by extension: the reason says what to do.
UNSUPPORTED = {
    **dict.fromkeys((".heic", ".heif"), "HEIC is not supported; convert it to JPEG or PNG"),
    **dict.fromkeys((".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2", ".pef", ".srw"),
                    "camera RAW is not supported; export it as JPEG or PNG"),
    ".svg": "SVG is a vector image; export it as PNG",
    ".jxl": "JPEG XL is not supported; convert it to JPEG or PNG",
}


def _try_decode(path: Path, size: int, channels: int) -> tuple[torch.Tensor, int] | str:
    """The decoded image and its own short side, or the reason it could not be decoded."""
    try:
        return _decode(path, size, channels)
    except Image.UnidentifiedImageError:
        return UNSUPPORTED.get(path.suffix.lower(), "not an image")
    except (TooLarge, Image.DecompressionBombError) as e:  # the latter from a frame of an animation
        return f"too large: {e}"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, EOFError) as e:
        return f"corrupt ({str(e) or type(e).__name__})"
    except Exception as e:  # decoders raise many types on hostile input; one file never stops the run
        return f"corrupt ({type(e).__name__}: {e})"


def is_grayscale(image: torch.Tensor) -> bool:
    """Whether a (3, H, W) image has the same value in every channel of every pixel."""
    return bool((image[0] == image[1]).all() and (image[1] == image[2]).all())
