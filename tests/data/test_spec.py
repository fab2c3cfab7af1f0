"""The spec registry: a format registered with register_source is built by build_source, and an
unknown kind names every registered one."""
from __future__ import annotations

import pytest
from PIL import Image

from m3i.data import SPEC_FORMS, Source, Spec, build_source, register_source
from m3i.data import spec as spec_mod

BUILT_IN_FORMS = (
    "fashion-mnist[:train|test|fit|val]",
    "emoji[:category|subcategory|none][:train|test|fit|val|all]",
    "digits[:train|test|fit|val|all]",
    "folder:PATH",
    "manifest:PATH",
    "shards:PATTERN",
)


@pytest.fixture
def registry(monkeypatch):
    """The registry as m3i fills it; what a test registers is gone after it."""
    monkeypatch.setattr(spec_mod, "_KINDS", dict(spec_mod._KINDS))


class Solid(Source):
    """``n`` plain images, red and green in turn, labelled by colour."""

    COLORS = {"red": (255, 0, 0), "green": (0, 255, 0)}

    def __init__(self, n: int, labels: bool = True, captions: bool = True, name: str | None = None):
        super().__init__(labels=labels, captions=captions, name=name or f"solid:{n}")
        self.n = n
        self._class_names = list(self.COLORS)

    def __len__(self) -> int:
        return self.n

    def _image(self, i, draft):
        return Image.new("RGB", (4, 4), self.COLORS[self._class_names[i % 2]])

    def _label(self, i):
        return i % 2


def test_a_registered_format_is_built_from_its_spec(registry):
    seen: list[Spec] = []

    @register_source("solid", "solid:N", aliases=("plain",))
    def _solid(spec: Spec) -> Solid:
        seen.append(spec)
        if not (spec.arg or "").isdigit():
            raise spec.error(f"solid: needs a count, got {spec.arg!r}")
        return Solid(int(spec.arg), **spec.common)

    src = build_source("Solid:3?captions=false", name="s")
    assert isinstance(src, Solid) and len(src) == 3 and src.name == "s"
    assert seen[-1] == Spec(text="Solid:3?captions=false", kind="solid", arg="3", labels=True,
                            captions=False, name="s")
    assert src.class_names == ["red", "green"]
    s = src.get(1)
    assert s["label"] == 1 and s["caption"] is None and s["image"].getpixel((0, 0)) == (0, 255, 0)

    hidden = build_source("plain:2?labels=0")  # an alias, the option hides the labels
    assert seen[-1].kind == "solid" and seen[-1].arg == "2" and not seen[-1].labels
    assert hidden.name == "solid:2" and hidden.num_classes == 0 and hidden.get(0)["label"] == -1
    assert build_source("solid:2", labels=False).num_classes == 0

    assert tuple(SPEC_FORMS) == BUILT_IN_FORMS + ("solid:N",)
    with pytest.raises(ValueError, match=r"'solid:x' \(solid: needs a count, got 'x'\); accepted forms: .*, solid:N,"):
        build_source("solid:x")
    with pytest.raises(ValueError, match="'plain' is already registered"):
        register_source("tiles", "tiles:PATH", aliases=("plain",))(_solid)


def test_an_unknown_kind_lists_the_registered_kinds(registry):
    assert tuple(SPEC_FORMS) == BUILT_IN_FORMS
    with pytest.raises(ValueError) as e:
        build_source("tiles:/data")
    assert str(e.value) == (
        "unknown data source spec 'tiles:/data' (kind 'tiles' not recognised); accepted forms: "
        + ", ".join(BUILT_IN_FORMS) + ", optionally followed by ?labels=false and/or &captions=false"
    )

    register_source("tiles", "tiles:PATH")(lambda spec: Solid(len(spec.path()), **spec.common))
    assert len(build_source("tiles:/data")) == 5
    with pytest.raises(ValueError, match=r"'tiles' \(tiles: needs a path\); accepted forms: .*, tiles:PATH,"):
        build_source("tiles")
    with pytest.raises(ValueError, match=r"kind 'mosaic' not recognised\); accepted forms: "
                                         r"fashion-mnist.*, shards:PATTERN, tiles:PATH, optionally"):
        build_source("mosaic")


def test_a_kind_says_what_evaluation_and_the_monitors_score_of_it(registry, tmp_path, capsys):
    """``evaluated`` and ``monitored`` of a registered kind: `m3i eval --dataset` scores its seeded
    parts, the pre-training monitors pick it, and neither names a data set of its own."""
    import json

    from m3i.cli import main
    from m3i.config import load_recipe
    from m3i.eval import DATASETS
    from m3i.eval.monitor import monitor_sets

    sizes = {"train": 40, "test": 12, "fit": 30, "val": 10}

    @register_source("solid", "solid[:train|test|fit|val]", evaluated=("solid",), monitored=("solid", None))
    def _solid(spec: Spec) -> Solid:
        return Solid(sizes[spec.arg or "train"], **spec.common)

    assert list(DATASETS)[-1] == "solid" and "fashion-mnist" in DATASETS
    assert monitor_sets(load_recipe("simclr", overrides=["data.sources=[{spec: solid}]"])) == ("solid", None)
    assert monitor_sets(load_recipe("simclr", overrides=["data.sources=[{spec: 'manifest:/x'}, {spec: solid}]"])) \
        == ("solid", None)  # the first source whose kind is monitored
    out = tmp_path / "knn.json"
    assert main(["eval", "--checkpoint", "pixels", "--task", "knn", "--dataset", "solid", "--json", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    r = json.loads(out.read_text())
    assert (r["n_train"], r["n_test"]) == (sizes["train"], sizes["test"]) and r["metrics"]["top1"] == 1.0
    assert main(["eval", "--checkpoint", "pixels", "--task", "knn", "--dataset", "solid:test", "--no-progress",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--dataset solid:test: solid takes no suffix" in err and "Traceback" not in err
