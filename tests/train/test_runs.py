"""A run directory's saved config, from today's m3i and from an earlier one.

``fixtures/old_run_config.yaml`` is the ``config.yaml`` of a demo run (the m3i recipe) written
before every part had settings of its own kind: each part listed the fields of every kind (a
``temperature`` on the UniGrad estimator, a ``projector`` on the dense decoder, a text tower's
``width`` on the EMA encoder) and the dense view target was ``{kind: view, dense: true}``. Read as a
run's saved config it is today's m3i recipe; read as a recipe file it is refused.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from m3i.config import ConfigError, load_recipe, recipe_names
from m3i import runs

OLD = Path(__file__).resolve().parents[1] / "fixtures" / "old_run_config.yaml"
# what the m3i recipe chose after the fixture's run, as that run had it: bf16 (now the device's
# format, auto), the category term weighing 1 and every global term on the masked input, 1,800 steps
SINCE = ["train.precision=bf16", "terms.1.weight=1.0", "train.steps=1800",
         *(f"terms.{i}.source.masked=true" for i in (1, 2, 3))]


def run_with(tmp_path: Path, config: Path | str) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    if isinstance(config, Path):
        shutil.copy(config, run / runs.CONFIG)
    else:
        (run / runs.CONFIG).write_text(config)
    return run


def test_the_fixture_is_in_the_old_form():
    data = yaml.safe_load(OLD.read_text())
    dense = data["terms"][0]
    assert dense["target"] == {"kind": "view", "view": 1, "dense": True, "paired": False}
    assert "temperature" in dense["estimator"] and "projector" in dense["decoder"]


def test_old_run_config_reads_as_todays_recipe(tmp_path):
    recipe = runs.read_recipe(run_with(tmp_path, OLD))
    # today's recipe with the choices m3i has made since that run set back to that run's
    want = load_recipe("m3i", overrides=SINCE)
    # term by term first: a failure names the part that was read differently
    for got, expected in zip(recipe.terms, want.terms):
        assert got.model_dump() == expected.model_dump(), got.name
    # the description is the run's own words, kept as written
    assert recipe.description == yaml.safe_load(OLD.read_text())["description"] != want.description
    assert recipe.model_dump(exclude={"description"}) == want.model_dump(exclude={"description"})
    assert recipe.terms[0].target.kind == "dense_view"


def test_old_run_config_is_not_a_recipe_file():
    """Old configs are upgraded only when read as a run's own saved config."""
    with pytest.raises(ConfigError) as e:
        load_recipe(str(OLD))
    msg = str(e.value)
    assert "terms.0.target.dense: unknown key (not a setting of kind 'view')" in msg
    assert "terms.0.estimator.temperature: unknown key (not a setting of kind 'unigrad')" in msg


def test_old_mixed_input_reads_with_its_half_mask(tmp_path):
    """The earlier m3i ignored ``views.mask.ratio`` in the mixed input: every such run used 0.5."""
    data = yaml.safe_load(OLD.read_text())
    data["views"]["mask"]["ratio"] = 0.75
    with pytest.raises(ConfigError, match=r"views\.mask\.ratio"):
        load_recipe(str(run_with(tmp_path, yaml.safe_dump(data)) / runs.CONFIG))
    # the same mask settings, through the part of the upgrade that does not depend on the terms
    data["terms"] = yaml.safe_load(yaml.safe_dump(load_recipe("m3i").model_dump(mode="json")))["terms"]
    (tmp_path / "run" / runs.CONFIG).write_text(yaml.safe_dump(data))
    assert runs.read_recipe(tmp_path / "run").views.mask.ratio == 0.5


@pytest.mark.parametrize("name", recipe_names())
def test_todays_saved_config_reads_back_unchanged(tmp_path, name):
    """Every saved config passes through the upgrade; today's must come out as written."""
    recipe = load_recipe(name)
    runs.write_recipe(tmp_path / "run", recipe)
    assert runs.read_recipe(tmp_path / "run").model_dump() == recipe.model_dump()


def test_sim_decoder_settings_survive_a_saved_config(tmp_path):
    """A dense decoder's own ``norm`` (SIM's batch norm over tokens) is today's setting, kept."""
    recipe = load_recipe("sim", overrides=["terms.0.decoder.norm=batch", "terms.0.decoder.positions=after_projector",
                                           "terms.0.decoder.cls_token=true"])
    runs.write_recipe(tmp_path / "run", recipe)
    decoder = runs.read_recipe(tmp_path / "run").terms[0].decoder
    assert (decoder.norm, decoder.positions, decoder.cls_token) == ("batch", "after_projector", True)


def test_run_dir_of_a_checkpoint(tmp_path):
    run = run_with(tmp_path, load_recipe("mae").model_dump_json())
    step = run / "checkpoints" / "step_000010"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(b"")
    assert runs.run_dir(step) == run
    assert runs.run_dir(run) == run
    assert runs.run_dir(str(step)) == run
    # a folder that is neither is returned as given (read_recipe then says it holds no config)
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert runs.run_dir(other) == other
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        runs.read_recipe(other)
    # the recipe of a checkpoint is its run's
    runs.write_recipe(run, load_recipe("mae"))
    assert runs.read_recipe(step).model_dump() == load_recipe("mae").model_dump()
