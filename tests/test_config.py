import json

import pytest

from m3i.cli import main
from m3i.config import ConfigError, describe_term, load_recipe, recipe_names

NINE = ["byol", "clip", "data2vec", "m3i", "mae", "mocov3", "sim", "simclr", "supervised"]
SCALE = ["clip-vitb16", "m3i-vitb16", "m3i-vitl16", "mae-vitb16", "sim-vitb16", "supervised-vitb16"]


def test_nine_recipes_ship_with_six_at_paper_scale():
    assert recipe_names() == sorted(NINE + SCALE)


@pytest.mark.parametrize("name", NINE)
def test_every_recipe_validates(name):
    r = load_recipe(name)
    assert r.name == name and r.terms


def test_recipes_json_lists_table_from_files(capsys):
    assert main(["recipes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == sorted(NINE + SCALE)
    for row in rows:
        for t in row["terms"]:
            assert set(t) == {"input", "target", "target_encoder", "estimator"}
    by = {r["name"]: r["terms"] for r in rows}
    # the paper's special-case table (the README's), read back from the files
    assert by["supervised"][0]["estimator"] == "Boltzmann over all classes"
    assert by["clip"][0]["target"] == "paired caption"
    assert by["mae"][0]["target_encoder"] == "identity"
    assert by["sim"][0]["estimator"].startswith("UniGrad")
    assert by["byol"][0]["estimator"] == "Gaussian on normalised features"
    assert {t["target"] for t in by["m3i"]} == {"dense features of view 2", "category", "paired caption", "view 2"}


def test_table_follows_the_file(tmp_path):
    # edit a recipe file and the table changes with it: nothing is hard-coded per recipe
    src = load_recipe("simclr")
    data = src.model_dump(mode="json")
    data["terms"][0]["estimator"]["candidates"] = "batch"
    data["terms"][0]["estimator"]["directions"] = 2
    from m3i.config import validate

    assert describe_term(validate(data, "x").terms[0])["estimator"] == "Boltzmann over the batch, both directions"


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


BASE = """
name: x
terms:
  - name: t
    target: {kind: label}
    target_encoder: {kind: class_table}
    estimator: {kind: boltzmann, candidates: classes}
"""


def test_valid_minimal_file(tmp_path):
    assert load_recipe(write(tmp_path, BASE)).terms[0].name == "t"


@pytest.mark.parametrize("text, field, expect", [
    (BASE + "bogus: 1\n", "bogus", "unknown key"),
    (BASE.replace("kind: boltzmann", "kind: boltzman"), "terms.0.estimator.kind", "boltzmann"),
    (BASE.replace("kind: class_table", "kind: teacher"), "terms.0.target_encoder.kind", "class_table"),
    (BASE + "train: {steps: many}\n", "train.steps", "integer"),
    (BASE.replace("kind: class_table", "kind: ema"), "terms.0", "class_table"),
])
def test_bad_files_name_file_field_and_expectation(tmp_path, text, field, expect):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert path in msg and field in msg and expect in msg


def test_overrides_and_errors():
    r = load_recipe("sim", overrides=["train.steps=7", "backbone=convnext_atto", "views.input_mode=fill",
                                      "terms.0.weight=2"])
    assert r.train.steps == 7 and r.backbone.name == "convnext_atto" and r.terms[0].weight == 2
    # a convolutional backbone cannot drop the masked tokens: refused when the recipe is read, not at build
    with pytest.raises(ConfigError, match="views.input_mode: convnext_atto takes masked views as 'mix' or 'fill'"):
        load_recipe("sim", overrides=["backbone=convnext_atto"])
    with pytest.raises(ConfigError, match="backbone.name: unknown backbone 'convnext_giant'"):
        load_recipe("sim", overrides=["backbone=convnext_giant"])
    with pytest.raises(ConfigError, match="train.stepz: unknown key"):
        load_recipe("sim", overrides=["train.stepz=7"])
    with pytest.raises(ConfigError, match="not an index"):
        load_recipe("sim", overrides=["terms.5.weight=1"])
    with pytest.raises(ConfigError, match="not an index"):
        load_recipe("sim", overrides=["terms.2={name: x}"])
    two = load_recipe("supervised", overrides=["terms.1={name: again, target: {kind: label}, "
                                               "target_encoder: {kind: class_table}, "
                                               "estimator: {kind: boltzmann, candidates: classes}}"])
    assert [t.name for t in two.terms] == ["category", "again"]
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe("sim", overrides=["train.steps"])
    with pytest.raises(ConfigError, match="unknown recipe 'simm'"):
        load_recipe("simm")


def test_impossible_shapes_are_reported():
    from m3i.objective import Objective

    with pytest.raises(ValueError, match="img_size"):
        Objective(load_recipe("sim", overrides=["backbone.img_size=30", "backbone.patch_size=4"]))
    with pytest.raises(ConfigError, match="decoder.width"):
        load_recipe("sim", overrides=["terms.0.decoder.width=100", "terms.0.decoder.heads=3"])
    with pytest.raises(ConfigError, match="batch_size"):
        load_recipe("m3i", overrides=["data.batch_size=7"])


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["pretrain", "--recipe", "sim", "train.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "train.nope: unknown key" in err and "Traceback" not in err
