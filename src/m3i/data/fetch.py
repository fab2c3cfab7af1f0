"""``m3i data fetch``: the built-in data sets, from the package registries that carry them.

- Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` (``apt-get download`` and
  ``dpkg -x``: no root needed), or the installed ``/usr/share/datasets/fashion-mnist``;
- Noto Emoji with names: the npm package ``emoji-datasource-google@16.0.0`` (``npm pack``);
- the UCI handwritten digits: one file of the scikit-learn wheel (``pip download``;
  scikit-learn itself is not installed).

Each set goes to ``$M3I_DATA`` (default ``~/.cache/m3i``) through a ``.partial`` folder renamed
into place, so a set is either whole or absent; a set already in place is kept, unless its source
cannot read it (a file cut short, garbled, or an image missing): then it is fetched again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .emoji import EMOJI_PACKAGE
from .images import data_root

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
FASHION_MNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
EMOJI_IMAGES = "img/google/64"
EMOJI_MIN_IMAGES = 1911  # the base emoji with an image
SKLEARN_PACKAGE = "scikit-learn==1.7.2"
DIGITS_MEMBER = "sklearn/datasets/data/digits.csv.gz"
SETS = ("fashion-mnist", "emoji", "digits")


class FetchError(RuntimeError):
    """A set could not be fetched: the message says which command failed and how."""


def _run(cmd: Sequence[str], cwd: Path, what: str) -> None:
    if shutil.which(cmd[0]) is None and not os.path.isabs(cmd[0]):
        raise FetchError(f"{what}: `{cmd[0]}` not found on PATH")
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        tail = " ".join((proc.stderr or proc.stdout).split())[-400:]
        raise FetchError(f"{what}: `{' '.join(cmd)}` failed ({tail})")


def _replace(partial: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    partial.rename(dest)


# -- the sets ----------------------------------------------------------------------------------
def has_fashion_mnist(dest: Path) -> bool:
    return all((dest / f).is_file() and (dest / f).stat().st_size > 0 for f in FASHION_MNIST_FILES)


def install_fashion_mnist(src: Path, dest: Path) -> None:
    """Copy the four IDX files from the package's folder ``src`` into ``dest``."""
    missing = [f for f in FASHION_MNIST_FILES if not (src / f).is_file()]
    if missing:
        raise FetchError(f"Fashion-MNIST: {src / missing[0]} missing from the package")
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for f in FASHION_MNIST_FILES:
        shutil.copyfile(src / f, partial / f)
    _replace(partial, dest)


def unpack_deb(deb: Path, into: Path) -> Path:
    """``dpkg -x`` the package; -> its Fashion-MNIST folder."""
    _run(["dpkg", "-x", str(deb), str(into)], deb.parent, "Fashion-MNIST")
    return into / "usr" / "share" / "datasets" / "fashion-mnist"


def fetch_fashion_mnist(dest: Path, work: Path, say: Callable[[str], None]) -> None:
    say(f"Fashion-MNIST: apt-get download {FASHION_MNIST_PACKAGE}")
    try:
        try:
            _run(["apt-get", "download", FASHION_MNIST_PACKAGE], work, "Fashion-MNIST")
        except FetchError:
            if os.geteuid() != 0:
                raise
            # a fresh machine may have no package lists yet: refresh them once (as root) and retry
            _run(["apt-get", "update", "-qq"], work, "Fashion-MNIST")
            _run(["apt-get", "download", FASHION_MNIST_PACKAGE], work, "Fashion-MNIST")
        (deb,) = sorted(work.glob(f"{FASHION_MNIST_PACKAGE}_*.deb"))
        src = unpack_deb(deb, work / "fmnist")
    except FetchError as e:
        if not has_fashion_mnist(FASHION_MNIST_SYSTEM):
            raise FetchError(f"{e}; try `apt-get update` first, or `apt-get install {FASHION_MNIST_PACKAGE}`") from None
        say(f"apt-get download failed; copying the installed {FASHION_MNIST_SYSTEM}")
        src = FASHION_MNIST_SYSTEM
    install_fashion_mnist(src, dest)


def has_emoji(dest: Path) -> bool:
    images = dest / EMOJI_IMAGES
    return (dest / "emoji.json").is_file() and images.is_dir() and \
        sum(1 for p in images.iterdir() if p.suffix == ".png") >= EMOJI_MIN_IMAGES


def install_emoji(tgz: Path, dest: Path) -> int:
    """Extract ``package/emoji.json`` and ``package/img/google/64/*.png`` of the npm tarball
    into ``dest``; -> the number of images."""
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / EMOJI_IMAGES).mkdir(parents=True)
    images = 0
    with tarfile.open(tgz, "r:gz") as tf:
        for m in tf:
            if not m.isfile():
                continue
            if m.name == "package/emoji.json":
                out = partial / "emoji.json"
            elif m.name.startswith(f"package/{EMOJI_IMAGES}/") and m.name.endswith(".png") and "/" not in \
                    m.name[len(f"package/{EMOJI_IMAGES}/"):]:
                out = partial / EMOJI_IMAGES / os.path.basename(m.name)
                images += 1
            else:
                continue
            with tf.extractfile(m) as f, open(out, "wb") as g:
                shutil.copyfileobj(f, g)
    if not (partial / "emoji.json").is_file():
        raise FetchError(f"emoji: {tgz} holds no package/emoji.json")
    _replace(partial, dest)
    return images


def fetch_emoji(dest: Path, work: Path, say: Callable[[str], None]) -> None:
    say(f"emoji: npm pack {EMOJI_PACKAGE}")
    _run(["npm", "pack", "--silent", EMOJI_PACKAGE], work, "emoji")
    (tgz,) = sorted(work.glob("emoji-datasource-google-*.tgz"))
    n = install_emoji(tgz, dest)
    say(f"emoji: {n} images")


def has_digits(dest: Path) -> bool:
    f = dest / "digits.csv.gz"
    return f.is_file() and f.stat().st_size > 0


def install_digits(wheel: Path, dest: Path) -> None:
    """Copy ``digits.csv.gz`` out of the scikit-learn wheel into ``dest``."""
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        with zipfile.ZipFile(wheel) as z:
            (partial / "digits.csv.gz").write_bytes(z.read(DIGITS_MEMBER))
    except KeyError:
        raise FetchError(f"digits: {wheel.name} holds no {DIGITS_MEMBER}") from None
    _replace(partial, dest)


def fetch_digits(dest: Path, work: Path, say: Callable[[str], None]) -> None:
    say(f"digits: pip download {SKLEARN_PACKAGE} (one file of it)")
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", SKLEARN_PACKAGE,
          "-d", str(work / "skl")], work, "digits")
    (wheel,) = sorted((work / "skl").glob("*.whl"))
    install_digits(wheel, dest)


def damage(name: str, dest: Path) -> str | None:
    """Why the set ``name`` in ``dest`` cannot be read by its source (None: it can)."""
    from .check import check_images
    from .digits import Digits
    from .emoji import Emoji
    from .fashion_mnist import FashionMNIST
    from .images import DamagedSet

    try:
        if name == "fashion-mnist":
            FashionMNIST(dest, "train"), FashionMNIST(dest, "test")
        elif name == "emoji":
            images = check_images(Emoji(dest, split="all"), sample=0, progress=False)  # 1,911 small files: cheap
            if images["broken"]:
                return f"{images['broken']} unreadable image(s), first: {images['where'][0]['first'][0]}"
        else:
            Digits(dest, split="all")
    except DamagedSet as e:
        return f"{e.where}: {e.why}" if e.where else e.why
    except (ValueError, FileNotFoundError) as e:
        return str(e)
    return None


_FETCH = {"fashion-mnist": (has_fashion_mnist, fetch_fashion_mnist),
          "emoji": (has_emoji, fetch_emoji),
          "digits": (has_digits, fetch_digits)}


def fetch(sets: Sequence[str] = SETS, root: Path | None = None, say: Callable[[str], None] = print) -> list[str]:
    """Fetch each of ``sets`` that is not in place under ``root`` (default :func:`data_root`);
    -> the sets fetched."""
    unknown = [s for s in sets if s not in _FETCH]
    if unknown:
        raise ValueError(f"unknown data set {unknown[0]!r}: expected {', '.join(SETS)}")
    root = Path(root) if root is not None else data_root()
    root.mkdir(parents=True, exist_ok=True)
    fetched = []
    for name in dict.fromkeys(sets):
        present, get = _FETCH[name]
        dest = root / name
        if present(dest):
            why = damage(name, dest)
            if why is None:
                say(f"{name}: already in {dest}")
                continue
            say(f"{name}: damaged in {dest} ({why}); fetching it again")
        with tempfile.TemporaryDirectory(prefix="m3i-fetch-") as work:
            get(dest, Path(work), say)
        say(f"{name}: installed in {dest}")
        fetched.append(name)
    return fetched
