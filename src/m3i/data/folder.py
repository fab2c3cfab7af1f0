"""Image folders: class subfolders, a flat folder of unlabelled images, or split folders holding
either (spec ``folder:PATH``; the layouts are those of :mod:`m3i.data.layout`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .layout import IMAGE_EXTENSIONS, SPLITS, read_layout, split_folders
from .images import decode_image
from .source import Source
from .spec import Spec, register_source

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder"]


class ImageFolder(Source):
    """Images under ``root``, searched recursively (jpg, jpeg, png, webp, bmp; any case), in one of
    the layouts of :mod:`m3i.data.layout`: class subfolders (each subfolder holding images is a
    class; classes are the sorted folder names), a flat folder (no labels), or split folders
    ``train/``, ``val/``, ``test/``, of which the source reads ``train/`` (``split``: another one).
    """

    image_files = True

    def __init__(self, root: str | os.PathLike, labels: bool = True, captions: bool = True,
                 name: str | None = None, split: str = "train"):
        super().__init__(labels=labels, captions=captions, name=name or f"folder:{root}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {str(self.root)!r} not found: expected a directory of images "
                f"({', '.join(IMAGE_EXTENSIONS)}), either flat, one subfolder per class, or split folders "
                f"({', '.join(f'{s}/' for s in SPLITS)}) holding those"
            )
        folder = self.root
        splits = split_folders(self.root)
        if splits:
            if split not in splits:
                raise FileNotFoundError(f"image folder {str(self.root)!r} holds the split folders "
                                        f"{', '.join(f'{s}/' for s in splits)} but no {split}/; name the one to read, "
                                        f"e.g. folder:{splits[next(iter(splits))]}")
            folder = splits[split]
        layout = read_layout(folder)
        self.layout = layout
        self._class_names = list(layout.classes)
        self.unlabelled_note = layout.note
        self._require_samples(len(layout.paths), f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
        self.paths = layout.paths
        self.targets = np.asarray(layout.labels, dtype=np.int64) if layout.labels is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, i, draft):
        return decode_image(self.paths[i], draft)

    def _label(self, i):
        return int(self.targets[i]) if self.targets is not None else -1

    def locate(self, i):
        return self.paths[i]


@register_source("folder", "folder:PATH", evaluated=("folder:PATH",))
def _build(spec: Spec) -> ImageFolder:
    return ImageFolder(spec.path(), **spec.common)
