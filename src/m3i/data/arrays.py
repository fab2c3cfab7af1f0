"""Labelled gray-image sets held in memory as arrays, the base of the small built-in sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .source import Source


class GrayArraySource(Source):
    """A labelled set held in memory as ``images`` (N, H, W) uint8 and ``targets`` (N,), read from
    one file (``_images_file``) at the rows ``file_index``; gray images are returned as RGB."""

    images: np.ndarray
    targets: np.ndarray
    file_index: np.ndarray
    _images_file: Path

    def __len__(self):
        return len(self.images)

    def _image(self, i, draft):
        return Image.fromarray(np.repeat(self.images[i][:, :, None], 3, axis=2))

    def _label(self, i):
        return int(self.targets[i])

    def locate(self, i):
        return f"{self._images_file}[{int(self.file_index[i])}]"
