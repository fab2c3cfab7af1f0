"""How an image folder is laid out: read in one place for ``folder:ROOT`` sources, ``m3i eval``
and ``m3i finetune``.

- **split folders** ``ROOT/train/``, ``ROOT/val/``, ``ROOT/test/`` (the ImageNet layout: every
  subfolder holding images is one of these, and no image lies in ``ROOT`` itself): each split is
  a folder of one of the two layouts below. Pre-training reads ``train/`` alone.
- **class folders** ``ROOT/<class>/...``: each subfolder holding images (at any depth) is a class;
  classes are the sorted folder names.
- **flat** (images directly in ``ROOT``): no labels; every image below ``ROOT`` is a sample. Images
  lying in ``ROOT`` beside class folders make the folder flat, and :attr:`Layout.note` says so,
  for the message of a command that needs labels.

Folders are walked following symbolic links, except a link back to a folder the walk is inside
(a loop: it would repeat the images, labelled with the wrong class, ~40 levels deep), which is
skipped with a warning; a folder reached twice through links is read once.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .images import warn_once

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Layout:
    """The images of one folder: paths, class indices (``None`` when flat) and class names."""

    root: Path
    paths: list[str]
    labels: list[int] | None
    classes: list[str]
    note: str | None = None  # why a folder with class subfolders is read without labels


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _subfolders(root: Path) -> tuple[list[os.DirEntry], list[os.DirEntry]]:
    """(loose images, subfolders) of ``root``, sorted by name; a link back to ``root`` or above is
    no subfolder."""
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    loose = [e for e in entries if e.is_file() and is_image(e.name)]
    here = os.path.realpath(root)
    subdirs = [e for e in entries if e.is_dir() and not _inside(here, os.path.realpath(e.path))]
    return loose, subdirs


def _inside(path: str, folder: str) -> bool:
    """Whether real path ``path`` is ``folder`` or lies below it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def walk_images(top: str | os.PathLike) -> list[str]:
    """Every image below ``top``, in sorted order, following links but never round a loop."""
    return list(_images(top))


def _has_images(top: str | os.PathLike) -> bool:
    return next(_images(top), None) is not None


def _images(top: str | os.PathLike) -> Iterator[str]:
    seen = {os.path.realpath(top)}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        here = os.path.realpath(dirpath)
        keep = []
        for d in sorted(dirnames):
            link = os.path.join(dirpath, d)
            target = os.path.realpath(link)
            if _inside(here, target):
                warn_once(f"{link}: a symbolic link back to {target}, which holds it (a loop); not followed")
            elif target not in seen:
                seen.add(target)
                keep.append(d)
        dirnames[:] = keep
        yield from (os.path.join(dirpath, f) for f in sorted(filenames) if is_image(f))


def split_folders(root: str | os.PathLike) -> dict[str, Path]:
    """``{split: folder}`` when ``root`` is laid out in split folders (see the module docstring),
    else ``{}``."""
    root = Path(root)
    if not root.is_dir():
        return {}
    loose, subdirs = _subfolders(root)
    with_images = [d for d in subdirs if _has_images(d.path)]
    if loose or not with_images or any(d.name not in SPLITS for d in with_images):
        return {}
    return {s: root / s for s in SPLITS if any(d.name == s for d in with_images)}


def read_layout(root: str | os.PathLike) -> Layout:
    """The images of a class-folder or flat folder ``root`` (not split folders: see
    :func:`split_folders`)."""
    root = Path(root)
    loose, subdirs = _subfolders(root)
    classes: list[str] = []
    paths: list[str] = []
    labels: list[int] = []
    found = {d.name: walk_images(d.path) for d in subdirs}
    found = {name: files for name, files in found.items() if files}
    if loose or not found:
        note = None
        if loose and found:
            note = (f"{len(loose)} image(s) lie directly in {root} (first: {loose[0].name}) beside {len(found)} "
                    f"class folder(s) ({', '.join(list(found)[:3])}{', ...' if len(found) > 3 else ''}), so the "
                    f"folder is read without labels; move them into a class folder to read the classes")
        return Layout(root, walk_images(root), None, [], note)
    for name, files in found.items():
        labels.extend([len(classes)] * len(files))
        classes.append(name)
        paths.extend(files)
    return Layout(root, paths, labels, classes)
