"""Reading and decoding one image, and how a failure to do so is named: missing, empty, not an
image, truncated, corrupt, or above the decompression-bomb limit (``$M3I_MAX_IMAGE_PIXELS``)."""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

FETCH_HINT = "fetch it with `m3i data fetch`"
MAX_CAPTION_CHARS = 10_000
MAX_PIXELS_ENV = "M3I_MAX_IMAGE_PIXELS"  # the decompression-bomb limit, when PIL's default is too low
_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"BM", "BMP"), (b"GIF87a", "GIF"),
          (b"GIF89a", "GIF"), (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"))


class ReadFailed(OSError):
    """The bytes of a sample could not be read: an I/O error that may pass (network storage, a
    busy disk), so the mixture tries the same sample again. Undecodable bytes and missing files
    raise :class:`ImageUnreadable`: trying again would fail the same way."""


class ImageUnreadable(ValueError):
    """An image that cannot be read or decoded. ``kind``: ``missing``, ``empty``, ``not an image``,
    ``truncated``, ``corrupt`` or ``too many pixels``; ``why``: what is wrong, in words; ``where``:
    the file (or ``SHARD:MEMBER``) once the source that holds it adds it."""

    def __init__(self, kind: str, why: str, where: str | None = None):
        super().__init__(f"{where}: {why}" if where else why)
        self.kind, self.why, self.where = kind, why, where

    def at(self, where: str) -> ImageUnreadable:
        return ImageUnreadable(self.kind, self.why, where)


def image_format(head: bytes) -> str | None:
    """The image format the first bytes of a file announce (JPEG, PNG, WebP, BMP, GIF, TIFF), or None."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((f for magic, f in _MAGIC if head.startswith(magic)), None)


def max_image_pixels() -> int | None:
    """The decompression-bomb limit decoding applies: ``$M3I_MAX_IMAGE_PIXELS`` when set (0: none),
    else PIL's ``Image.MAX_IMAGE_PIXELS`` (89,478,485)."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return Image.MAX_IMAGE_PIXELS
    try:
        n = int(raw.replace("_", "").replace(",", ""))
    except ValueError:
        raise ValueError(f"{MAX_PIXELS_ENV}={raw!r}: expected a whole number of pixels (0: no limit)") from None
    return n if n > 0 else None


def _unreadable(e: BaseException, data: bytes, limit: int | None) -> ImageUnreadable:
    """What is wrong with ``data``, which PIL failed to decode with ``e`` (``limit``: the
    decompression-bomb limit it applied)."""
    fmt = image_format(data[:16])
    if isinstance(e, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
        m = re.search(r"\((\d+) pixels\)", str(e))
        n = int(m.group(1)) if m else None
        return ImageUnreadable("too many pixels", (
            f"{fmt or 'image'} of {f'{n:,}' if n else 'more'} pixels, above the decompression-bomb limit of "
            f"{limit or 0:,} (PIL's Image.MAX_IMAGE_PIXELS); set {MAX_PIXELS_ENV}={n or 'N'} or more to read it"))
    if not data:
        return ImageUnreadable("empty", "empty file (0 bytes)")
    if fmt is None:
        return ImageUnreadable("not an image", f"not an image (no JPEG, PNG, WebP, BMP, GIF or TIFF starts with "
                                               f"{bytes(data[:8]).hex(' ')})")
    text = " ".join(str(e).split())[:160]
    if "truncated" in text.lower() or isinstance(e, EOFError):
        return ImageUnreadable("truncated", f"truncated {fmt} file ({len(data):,} bytes: {text})")
    if isinstance(e, UnidentifiedImageError):  # PIL could not even read the header
        return ImageUnreadable("corrupt", f"{fmt} header cut short or corrupt ({len(data):,} bytes)")
    return ImageUnreadable("corrupt", f"corrupt {fmt} data ({type(e).__name__}: {text})")


def unreadable_file(e: OSError) -> ImageUnreadable:
    """A file that could not be opened for good (missing, a folder, closed to this user)."""
    if isinstance(e, FileNotFoundError):
        return ImageUnreadable("missing", "missing (no such file)")
    if isinstance(e, IsADirectoryError):
        return ImageUnreadable("missing", "a folder, not an image file")
    return ImageUnreadable("missing", f"cannot be opened ({e.strerror or e})")


class DamagedSet(ValueError):
    """A file of a built-in set is there but cannot be read: ``where`` (the file, or None when
    ``why`` names it) and ``why``; the message says how to fetch the set again."""

    def __init__(self, where: str | os.PathLike | None, why: str, name: str):
        super().__init__(f"{f'{where}: ' if where else ''}{why}; the set is damaged: `m3i data fetch {name}` "
                         "fetches it again")
        self.where, self.why = where, why


def data_root() -> Path:
    """Folder holding the built-in data sets: ``$M3I_DATA`` if set, else ``~/.cache/m3i``."""
    env = os.environ.get("M3I_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "m3i"


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited on white, 16-bit gray
    is scaled to 8 bits (PIL's own conversion would clip it to white)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.int64)
        a = a >> 8 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else a
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (
        im.mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return im.convert("RGB")


def decode_image(src: str | os.PathLike | bytes, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode a file path or encoded bytes into a fully loaded RGB image.

    ``draft`` (width, height) lets JPEG decoding pick a reduced scale that still covers that
    size, which makes decoding large photos for small training resolutions much cheaper.
    Raises :class:`ImageUnreadable` on missing, empty, non-image, truncated or corrupt data and
    on images above the decompression-bomb limit (:func:`max_image_pixels`), :class:`ReadFailed`
    on an I/O error that may pass.
    """
    where = None
    if not isinstance(src, (bytes, bytearray, memoryview)):
        where, src = str(src), read_file(src)
    pil_limit, limit = Image.MAX_IMAGE_PIXELS, max_image_pixels()
    try:
        Image.MAX_IMAGE_PIXELS = limit  # PIL reads its limit from here; put back below
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # above the limit: refuse, never decode
            with Image.open(io.BytesIO(src)) as im:
                if draft is not None and im.format == "JPEG":
                    im.draft("RGB", draft)
                im.load()
                return to_rgb(im)
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:  # what PIL's decoders raise on bad bytes, by format
        bad = _unreadable(e, src, limit)
        raise (bad.at(where) if where else bad) from e
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of a file; :class:`ImageUnreadable` when it is missing, a folder or closed to this
    user, :class:`ReadFailed` for another I/O error (one that may pass)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise unreadable_file(e).at(str(path)) from e
    except OSError as e:
        raise ReadFailed(f"{path}: {e}") from e


def warn_once(msg: str) -> None:
    """A warning about the data, shown once per process (Python's default filter), by rank 0 alone
    under torchrun (every rank reads the same data)."""
    if os.environ.get("RANK", "0") == "0":
        warnings.warn(msg, UserWarning, stacklevel=3)
