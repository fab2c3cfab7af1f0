"""Image folders: class subfolders, or a flat folder of unlabelled images (spec ``folder:PATH``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .source import Source, decode_image
from .spec import Spec, register_source

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class ImageFolder(Source):
    """Images under ``root``, searched recursively (jpg, jpeg, png, webp, bmp; any case).

    If ``root`` holds class subfolders and no loose images, each subfolder that contains images
    is a class; classes are the sorted folder names. If images lie directly in ``root`` (a flat
    folder), the source has no labels and every image below ``root`` is a sample.
    """

    def __init__(self, root: str | os.PathLike, labels: bool = True, captions: bool = True,
                 name: str | None = None):
        super().__init__(labels=labels, captions=captions, name=name or f"folder:{root}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {str(self.root)!r} not found: expected a directory of images "
                f"({', '.join(IMAGE_EXTENSIONS)}), either flat or one subfolder per class"
            )
        entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        loose = [e for e in entries if e.is_file() and _is_image(e.name)]
        subdirs = [e for e in entries if e.is_dir()]
        paths: list[str] = []
        targets: list[int] = []
        if loose or not subdirs:
            paths = _walk_images(self.root)
        else:
            for d in subdirs:
                found = _walk_images(Path(d.path))
                if not found:
                    continue
                targets.extend([len(self._class_names)] * len(found))
                self._class_names.append(d.name)
                paths.extend(found)
        self._require_samples(len(paths), f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self.paths = paths
        self.targets = np.asarray(targets, dtype=np.int64) if targets else None

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, i, draft):
        return decode_image(self.paths[i], draft)

    def _label(self, i):
        return int(self.targets[i]) if self.targets is not None else -1

    def locate(self, i):
        return self.paths[i]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
    return out


@register_source("folder", "folder:PATH")
def _build(spec: Spec) -> ImageFolder:
    return ImageFolder(spec.path(), **spec.common)
