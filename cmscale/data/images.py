"""Image decoding, the bad-input policy, and the reference crop; shared by make_shards and the loader.

One function, `prepare_image`, turns encoded bytes (or an opened PIL image) into an RGB uint8
HWC array of exactly `resolution` x `resolution`, the way the reference does it
(guided-diffusion's `center_crop_arr`: repeated BOX halving while the short side is >= 2R, then
BICUBIC so the short side is R, then a center crop).

Bad input follows one of three policies (`POLICIES`). Every outcome other than "raise" is
counted per kind ("converted.<kind>" / "skipped.<kind>": the loader's `bad_input_counts`,
make_shards' manifest). The whole table; the first block is decided here, the second by the
loader (`cmscale.data.loader`) and the reader (`cmscale.data.reader`):

| input                            | kind           | "convert"                      | "skip"  | "raise"       |
|----------------------------------|----------------|--------------------------------|---------|---------------|
| corrupt / undecodable image      | corrupt_image  | skipped                        | skipped | BadInputError |
| CMYK                             | cmyk           | PIL convert("RGB")             | skipped | BadInputError |
| greyscale (1, L, I, F)           | greyscale      | replicated to RGB              | skipped | BadInputError |
| 16-bit (I;16*, 16-bit RGB PNG)   | 16bit          | top 8 bits kept                | skipped | BadInputError |
| alpha (RGBA, LA, PA, P + tRNS)   | alpha          | alpha dropped, as the reference's convert("RGB") | skipped | BadInputError |
| palette (P), other modes         | palette, other_mode | PIL convert("RGB")        | skipped | BadInputError |
| short side < resolution          | too_small      | upsampled by the same crop (BICUBIC) | skipped | BadInputError |
| sample without an image member   | no_image       | skipped                        | skipped | BadInputError |
| class_cond and no integer .cls   | no_label       | skipped                        | skipped | BadInputError |
| truncated tar                    | truncated_shard (+ missing_sample per lost planned sample) | samples before the cut used, rest skipped | same | BadInputError |
| shard shorter than its manifest  | short_shard (+ missing_sample) | as truncated   | same    | BadInputError |
| source file unreadable (make_shards) | unreadable | skipped                        | skipped | BadInputError |
| missing shard, pattern matching nothing | -       | FileNotFoundError (ShardOpenError for URLs), whatever the policy |

Only the first matching mode kind is counted for an image (order: 16bit, cmyk, alpha,
greyscale, palette, other_mode); `too_small` is checked after the mode is fixed. Under "skip"
the mode is read from the header, so a skipped image is never decoded.

Fast path (the loader's, `jpeg_decoder=fast_jpeg_decoder()`): a JPEG that PIL's header
already shows to be 8-bit RGB of exactly R x R (what make_shards writes) is decoded by
torchvision's libjpeg-turbo op straight into an RGB array: the library PIL decodes with (in
another build) and the same settings, minus PIL's RGBX -> RGB repacking and per-image Python:
~20% fewer instructions per 256x256 image. PIL still parses the header, so every decision above (kinds, sizes,
corrupt headers) is PIL's; anything the op does not decode cleanly goes through PIL as before.
`fast_jpeg_decoder` checks once per process that the op gives PIL's pixels bit for bit
(subsamplings, progressive, odd sizes) and is None otherwise. One visible difference: for a
damaged JPEG that libjpeg still decodes (the same pixels either way), libjpeg prints its
one-line warning ("Corrupt JPEG data: ...") to the worker's stderr, which PIL keeps silent.
"""
from __future__ import annotations

import io
import os
import sys

import numpy as np
from PIL import Image

POLICIES = ("convert", "skip", "raise")

# File extensions (lower case, as WebDataset keys them) that hold an image.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "pbm", "tif", "tiff", "gif")

# What convert("RGB") should do for each non-RGB mode; anything else is "other_mode".
_GREY_MODES = {"1", "L", "I", "F"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_16BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


class BadInputError(ValueError):
    """Raised for bad input under the "raise" policy; the message names the shard and key."""


class BadInput(Exception):
    """Internal signal: this sample is bad in the way `kind` says and cannot be used as is."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind
        self.detail = detail


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"bad_input must be one of {POLICIES}, got {policy!r}")
    return policy


def mode_kind(img: Image.Image) -> str | None:
    """The bad-input kind of an opened (not yet loaded) image's pixel format, or None for 8-bit RGB.

    Must run before `img.load()`: 16-bit RGB PNGs are only visible in the tile's raw mode
    ("RGB;16B"); once loaded PIL has silently kept the top 8 bits.
    """
    mode = img.mode
    if mode in _16BIT_MODES or any(";16" in str(getattr(t, "args", t)) for t in (getattr(img, "tile", None) or ())):
        return "16bit"
    if mode == "RGB":
        return None
    if mode == "CMYK":
        return "cmyk"
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        return "alpha"
    if mode in _GREY_MODES:
        return "greyscale"
    if mode == "P":
        return "palette"
    return "other_mode"


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded image of any mode to 8-bit RGB (see the table in the module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        # 16/32-bit integer or float greyscale: PIL's convert("L") clips at 255 instead of
        # scaling, which would turn most 16-bit images white. Keep the top 8 bits of 16.
        a = np.asarray(img)
        if a.dtype.kind == "f":
            a = np.clip(a, 0, 255)
        elif mode != "I" or a.max(initial=0) > 255:
            a = np.clip(a, 0, 65535) >> 8  # 16-bit range
        return Image.fromarray(np.ascontiguousarray(a.astype(np.uint8)), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's "palette with transparency" warning
    return img.convert("RGB")


def center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """guided-diffusion's `center_crop_arr` as a PIL image: BOX-halve while short side >= 2R,
    BICUBIC to short side R, center crop (PIL's crop takes exactly the reference's pixels).

    An image already R x R is returned as is (the reference's resize to the same size is a copy,
    so the result is identical).
    """
    if img.size == (resolution, resolution):
        return img
    while min(*img.size) >= 2 * resolution:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = resolution / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    crop_x = (img.size[0] - resolution) // 2
    crop_y = (img.size[1] - resolution) // 2
    return img.crop((crop_x, crop_y, crop_x + resolution, crop_y + resolution))


def center_crop_arr(img: Image.Image, resolution: int) -> np.ndarray:
    """guided-diffusion's `center_crop_arr`: the uint8 HWC array (R, R, C) of `center_crop`."""
    return np.asarray(center_crop(img, resolution))


def open_image(data: bytes) -> Image.Image:
    """Open encoded bytes lazily (header only); raise BadInput("corrupt_image") if PIL cannot."""
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:  # UnidentifiedImageError, DecompressionBombError, OSError, ...
        raise BadInput("corrupt_image", f"{type(e).__name__}: {e}") from None


def prepare_image(img: Image.Image | bytes, resolution: int, policy: str, converted: list | None = None,
                  jpeg_decoder=None) -> np.ndarray:
    """Decode, fix and crop one image to an RGB uint8 (R, R, 3) array under `policy`.

    Raises BadInput(kind) when the image must not be used ("skip", or not fixable), and
    BadInput too under "raise" (the caller turns it into BadInputError with shard/key context).
    Kinds fixed under "convert" are appended to `converted` (for counting).
    jpeg_decoder: `fast_jpeg_decoder()` for the exact fast path (see the module docstring).
    """
    data = None
    if isinstance(img, (bytes, bytearray, memoryview)):
        data = bytes(img)
        img = open_image(data)
    kind = mode_kind(img)
    if kind is not None and policy != "convert":
        # Decided from the header alone: skipped samples are never decoded.
        raise BadInput(kind, f"mode {img.mode}")
    if (jpeg_decoder is not None and data is not None and kind is None and img.format == "JPEG"
            and img.size == (resolution, resolution)):
        try:
            arr = jpeg_decoder(data)
        except Exception:  # truncated or corrupt: PIL decides below, as without the fast path
            arr = None
        if arr is not None and arr.shape == (resolution, resolution, 3):
            return arr
    try:
        img.load()
    except Exception as e:  # truncated or corrupt data
        raise BadInput("corrupt_image", f"{type(e).__name__}: {e}") from None
    if kind is not None:
        img = to_rgb(img)
        if converted is not None:
            converted.append(kind)
    if min(img.size) < resolution:
        if policy != "convert":
            raise BadInput("too_small", f"{img.size[0]}x{img.size[1]} < {resolution}")
        if converted is not None:
            converted.append("too_small")
    try:
        return np.asarray(center_crop(img, resolution))
    except Exception as e:  # e.g. a decoder error surfacing only on resize
        raise BadInput("corrupt_image", f"{type(e).__name__}: {e}") from None


_fast_jpeg = None  # this process's fast_jpeg_decoder(): None = not probed yet, False = unavailable


def fast_jpeg_decoder():
    """torchvision's JPEG decoder op as `bytes -> uint8 (H, W, C) array`, if it decodes exactly
    as PIL here; None otherwise (no torchvision image extension, or other pixels).

    Probed once per process (a few ms; forked DataLoader workers inherit the result): the op
    must match PIL bit for bit on JPEGs written by PIL with 4:4:4, 4:2:2 and 4:2:0 chroma,
    baseline and progressive, at sizes that are not multiples of the MCU. Both link
    libjpeg-turbo, whose decoder output is exact (SIMD or not); a build on IJG libjpeg >= 7
    (other chroma upsampling) fails the check. The extension is loaded without importing
    torchvision (whose import takes seconds) when possible. `CMSCALE_PIL_ONLY=1` disables it.
    """
    global _fast_jpeg
    if _fast_jpeg is None:
        _fast_jpeg = False
        if os.environ.get("CMSCALE_PIL_ONLY", "") in ("", "0"):
            try:
                decode = _jpeg_op_decoder()
                if decode is not None and _decodes_like_pil(decode):
                    _fast_jpeg = decode
            except Exception:
                pass
    return _fast_jpeg or None


def _jpeg_op_decoder():
    import torch

    def load():
        if "torchvision.io" not in sys.modules:
            import glob
            import importlib.util

            spec = importlib.util.find_spec("torchvision")
            if spec is not None and spec.origin:  # its image extension alone: milliseconds
                for lib in sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "image*.*"))):
                    if lib.endswith((".so", ".pyd", ".dylib")):
                        try:
                            torch.ops.load_library(lib)
                            return torch.ops.image.decode_jpeg
                        except Exception:
                            pass
        import torchvision.io  # noqa: F401  registers torch.ops.image (seconds, once)

        return torch.ops.image.decode_jpeg

    op = load()

    def decode(data: bytes) -> np.ndarray:
        # mode 0 = ImageReadMode.UNCHANGED: 3 components give RGB, as PIL's "RGB" mode. The
        # op's (C, H, W) result is a view of interleaved (H, W, C) memory: no copy here.
        # bytearray: frombuffer wants a writable buffer (a copy of the encoded bytes, ~1 us).
        return op(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, False).permute(1, 2, 0).numpy()

    return decode


def _decodes_like_pil(decode) -> bool:
    rng = np.random.default_rng(0)
    h, w = 53, 71  # not multiples of any MCU: edge blocks and chroma upsampling at the borders
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], -1)
    noisy = rng.integers(0, 256, (h, w, 3))
    for arr in (smooth, noisy, (smooth + noisy) // 2):
        img = Image.fromarray(arr.astype(np.uint8), "RGB")
        for subsampling in (0, 1, 2):
            for progressive in (False, True):
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90, subsampling=subsampling, progressive=progressive)
                data = buf.getvalue()
                ref = Image.open(io.BytesIO(data))
                ref.load()
                if not np.array_equal(decode(data), np.asarray(ref)):
                    return False
    return True


def encode_image(arr: np.ndarray, image_format: str, quality: int = 95) -> bytes:
    """Encode an RGB uint8 HWC array as png, jpg or webp bytes (lossless PNG; quality for the others)."""
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    if image_format == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif image_format in ("jpg", "jpeg"):
        img.save(buf, format="JPEG", quality=quality)
    elif image_format == "webp":
        img.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unknown image format {image_format!r} (png, jpg or webp)")
    return buf.getvalue()
