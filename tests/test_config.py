import json
import math
import warnings

import pytest

from m3i.cli import main
from m3i.config import ConfigError, describe_term, load_recipe, recipe_names

NINE = ["byol", "clip", "data2vec", "m3i", "mae", "mocov3", "sim", "simclr", "supervised"]
SCALE = ["clip-vitb16", "m3i-vitb16", "m3i-vitl16", "mae-vitb16", "sim-vitb16", "supervised-vitb16"]
NINE += ["coca", "m3i-one", "siglip"]  # image-text: the sigmoid estimator, captioning
SCALE += ["coca-vitb16", "m3i-one-vitb16", "siglip-vitb16"]
NINE += ["dino", "dinov2"]  # self-distillation
SCALE += ["dino-vitb16", "dinov2-vitl14"]
SCALE += ["m3i-vitg14"]  # the billion-parameter backbone


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


# -- a run shorter than its warm-up ------------------------------------------------------------
def cosine_with_warmup(step: int, steps: int, warmup: int, floor: float) -> float:
    """The schedule written out: linear warm-up over ``warmup`` steps, then cosine to ``floor``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    done = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (1 - floor) * (1 + math.cos(math.pi * done)) / 2


@pytest.mark.parametrize("overrides, warmup", [
    (["train.steps=12"], 1),                              # --steps alone: the recipe's 100 of 1123, scaled
    (["train.steps=12", "train.warmup_steps=100"], 100),  # both given: cut short
    (["train.steps=600"], 100),                           # long enough: the recipe's own
])
def test_the_schedule_of_a_run_shorter_than_its_warm_up(overrides, warmup):
    from m3i.train.loop import lr_lambda

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        tr = load_recipe("m3i", overrides=overrides + ["train.min_lr=1e-4"]).train
    assert tr.warmup_steps == warmup and len(said) == (tr.steps < 100)
    f = lr_lambda(tr)
    values = [f(s) for s in range(tr.steps)]
    assert values == pytest.approx([cosine_with_warmup(s, tr.steps, warmup, 1e-4 / tr.lr) for s in range(tr.steps)])
    if warmup > tr.steps:  # cut short: it only rises, and the last step is at steps / (warmup + 1) of lr
        assert all(a < b for a, b in zip(values, values[1:])) and values[-1] == pytest.approx(12 / 101)
    else:  # it reaches lr at the end of the warm-up and decays to min_lr by the last step
        assert values[warmup] == pytest.approx(1.0) and values[-1] < values[warmup]


def test_a_runs_own_schedule_is_never_rescaled(tmp_path):
    """A run's config.yaml (--resume with --steps): a warm-up longer than the steps is cut short,
    not scaled, so the resumed run follows the schedule it started with."""
    saved = tmp_path / "config.yaml"
    saved.write_text(BASE + "train: {steps: 40, warmup_steps: 10}\n")
    with pytest.warns(UserWarning, match="train.warmup_steps 10 is more than train.steps 4: the warm-up is cut short"):
        assert load_recipe(str(saved), overrides=["train.steps=4"], saved=True).train.warmup_steps == 10
    saved.write_text(BASE + "train: {steps: 4, warmup_steps: 10}\n")  # a run that trained so
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval and export read it as it is, without a word
        assert load_recipe(str(saved), saved=True).train.warmup_steps == 10
