"""Fuzzed configurations (Hypothesis): random values in recipe YAML files, random key=value
overrides and random YAML text. Whatever is invalid gets exit code 2 and one line naming the
field; nothing raises anything else (no traceback)."""
from __future__ import annotations

import contextlib
import io
import re
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import torch

from faultkit import RECIPE
from m3i.cli import main
from m3i.config import ConfigError, load_recipe
from m3i.objective import Objective

BASE = yaml.safe_load(Path(RECIPE).read_text())


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

OUT = tempfile.mkdtemp(prefix="m3i-fuzz-")  # never written: every accepted input stops before training


def leaves(node, prefix=()):
    """Dotted paths of every value of the resolved recipe (groups and list items included)."""
    if prefix:
        yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, prefix + (str(k),))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaves(v, prefix + (str(i),))


PATHS = sorted(set(leaves(load_recipe(RECIPE).model_dump(mode="json"))))
names = st.text(st.characters(codec="utf-8", exclude_characters="=."), min_size=1, max_size=8)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10 ** 12), 10 ** 12), st.integers(-3, 3),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["bf16", "fp32", "block", "mix", "batch", "label", "ema", "vit_nano", "1e-3"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(names, inner, max_size=3)), max_leaves=6)
keys = st.one_of(st.sampled_from(PATHS).map(".".join),
                 st.tuples(st.sampled_from(PATHS).map(".".join), names).map(".".join),  # unknown sub-keys
                 st.lists(names, min_size=1, max_size=3).map(".".join))


def run_cli(argv: list[str]) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, [ln for ln in err.getvalue().splitlines() if ln.strip()]


def accepted(**kw) -> bool:
    """Whether the recipe loads; any exception but ConfigError fails the test."""
    try:
        load_recipe(**kw)
    except ConfigError:
        event("refused")
        return False
    event("accepted")
    return True


def check_refusal(argv: list[str], field: str | None) -> None:
    code, lines = run_cli(argv)
    assert code == 2 and len(lines) == 1, (argv, lines)
    line = lines[0]
    assert line.startswith("m3i pretrain: error: ") and "Traceback" not in line
    if field is not None:  # names the field: the one given, or (for a cross-field check) the one at fault
        assert field in line or re.search(r": ([a-z_]+)(\.\w+)*: ", line), (field, line)


@fuzz(300)
@given(key=keys, value=values)
def test_fuzzed_overrides(key, value):
    item = f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip().removesuffix('...').strip()}"
    if not accepted(name_or_path=RECIPE, overrides=[item]):
        check_refusal(["pretrain", "--recipe", RECIPE, "--out", OUT, item], key.split(".")[0])


@fuzz(150)
@given(key=keys, raw=st.text(max_size=30))
def test_fuzzed_raw_override_text(key, raw):
    item = f"{key}={raw}"
    if not accepted(name_or_path=RECIPE, overrides=[item]):
        check_refusal(["pretrain", "--recipe", RECIPE, "--out", OUT, item], key.split(".")[0])


def replace(doc, path, value):
    node = doc
    for part in path[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(path[-1])] = value
    elif value is _DELETE:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


_DELETE = object()
RECIPE_PATHS = sorted(p for p in set(leaves(BASE)))


@fuzz(200)
@given(path=st.sampled_from(RECIPE_PATHS), value=st.one_of(values, st.just(_DELETE)))
def test_fuzzed_recipe_yaml_values(path, value):
    doc = yaml.safe_load(Path(RECIPE).read_text())
    if value is _DELETE and path[-1].isdigit():
        value = None
    replace(doc, path, value)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(doc, f)
    if not accepted(name_or_path=f.name):
        check_refusal(["pretrain", "--recipe", f.name, "--out", OUT], None)
    Path(f.name).unlink()


@fuzz(100)
@given(text=st.one_of(st.text(max_size=60), values.map(lambda v: yaml.safe_dump(v))))
def test_fuzzed_config_file_text(text):
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)
    if not accepted(name_or_path=RECIPE, config=f.name):
        check_refusal(["pretrain", "--recipe", RECIPE, "--config", f.name, "--out", OUT], None)
    Path(f.name).unlink()


@fuzz(200)
@given(key=st.sampled_from(PATHS).map(".".join),
       value=st.one_of(st.integers(-3, 3), st.integers(0, 64), st.floats(-2, 2), st.sampled_from([0.0, -1.0, 1.5])))
def test_fuzzed_numbers_the_schema_accepts_build_and_train_or_are_refused_in_one_line(key, value):
    """Small numbers anywhere: a recipe that loads either builds and takes a training step, or
    is refused with a ValueError (one line, exit 2 on the command line), never anything else."""
    try:
        recipe = load_recipe(RECIPE, overrides=[f"{key}={value}"])
    except ConfigError:
        return
    batch = {"image": torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8),
             "label": torch.arange(8) % 2, "caption": [None] * 8}
    try:
        Objective(recipe, num_classes=2)(batch)["loss"].backward()
    except ValueError as e:
        event("refused when built")
        assert "\n" not in str(e)
        return
    event("built and trained")
