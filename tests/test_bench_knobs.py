"""benchmarks/knobs.py: each compared recipe's structural knob lands on the setting it names, in
every recipe that has it, and starts from the recipe's own value."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare  # noqa: E402
from knobs import KNOBS, Knob, current, knob_default, knob_settings, setting_path  # noqa: E402

from m3i.config import load_recipe  # noqa: E402

SHIPPED_VALUES = {  # what the shipped recipes' files say, read by eye from src/m3i/recipes/ and benchmarks/variants/
    "supervised": 0.35, "clip": 0.07, "siglip": 0.1, "coca": 2.0, "simclr": 0.2, "mocov3": 0.2, "byol": 0.25,
    "mae": 0.75, "data2vec": 0.6, "sim": 0.6, "dino": 0.04, "dinov2": 0.1, "m3i": 2.0, "m3i-one": 2.0,
    "m3i-distill": 2.0,
}


def test_every_recipe_the_comparison_can_run_has_a_knob():
    rows = {r for r in compare.recipe_choices() if r != "multistage" and not r.endswith(("-vitb16", "-vitl14",
                                                                                           "-vitl16", "-vitg14"))}
    assert rows == set(KNOBS) == set(SHIPPED_VALUES)


@pytest.mark.parametrize("recipe", sorted(KNOBS))
def test_a_knob_starts_at_the_recipes_value_and_lands_on_every_setting_it_names(recipe):
    knob = KNOBS[recipe]
    shipped = load_recipe(compare.recipe_ref(recipe))
    assert knob_default(shipped, knob) == pytest.approx(SHIPPED_VALUES[recipe])
    value = knob.low + 0.37 * (knob.high - knob.low)
    settings = knob_settings(shipped, knob, value)
    assert len(settings) == len(knob.paths)
    tuned = load_recipe(compare.recipe_ref(recipe), overrides=[f"{k}={v}" for k, v in settings.items()])
    for path in knob.paths:
        assert current(tuned, path) == pytest.approx(value, rel=1e-3)
    # nothing else moved: the same recipe once the knob's settings are put back
    back = load_recipe(compare.recipe_ref(recipe), overrides=[f"{k}={current(shipped, k)}" for k in settings])
    assert back == shipped


def test_a_term_is_found_by_its_name_wherever_the_recipe_puts_it():
    m3i, distill = load_recipe("m3i"), load_recipe(compare.recipe_ref("m3i-distill"))
    assert [t.name for t in m3i.terms].index("category") != [t.name for t in distill.terms].index("category")
    for r in (m3i, distill):
        at = setting_path(r, "term:category.weight")
        assert r.terms[int(at.split(".")[1])].name == "category"


def test_a_knob_on_a_term_the_recipe_lacks_names_the_term_and_the_terms_it_has():
    with pytest.raises(ValueError, match=r"'simclr' has no term 'category'.*\['view'\]"):
        knob_settings(load_recipe("simclr"), Knob("w", ("term:category.weight",), 0.5, 4.0), 1.0)
