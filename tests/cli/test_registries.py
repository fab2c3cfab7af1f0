"""Plugins on the command line: a part registered under a name already taken is refused in one
line naming the name, the registry and both definitions (every registry: backbones, target kinds,
target encoders, decoders, estimators, data sources); a plugin that cannot be imported is one line
naming it and why (not installed, a module it imports is not, or the exception its code raised);
and a run's ``config.yaml`` records every plugin that was loaded, however it was named, so that
``export`` without it names the missing module."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from clikit import ENV, FAST, TINY, class_root, error_line, sources
from m3i import plugins
from m3i.backbones import build_backbone
from m3i.cli import main
from m3i.data.spec import module_of_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def write_plugin(folder: Path, name: str, code: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(code))
    return name


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """A folder on sys.path for the test's plugin modules; the plugins loaded are forgotten after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_loaded", {})
    return tmp_path


# a plugin of each registry registering a name m3i's own part holds: (plugin code, the line's start,
# the built-in definition, the plugin's part)
DUPLICATES = {
    "backbone": ("""
        from m3i.backbones import register
        from m3i.backbones.vit import VisionTransformer
        register("vit_nano", embed_dim=32, depth=2, num_heads=2)(VisionTransformer)
        """, "backbone 'vit_nano'", "m3i.backbones.vit (VisionTransformer)", "VisionTransformer"),
    "estimator": ("""
        from typing import Literal
        from m3i.estimators import ESTIMATORS, Estimator, EstimatorCfg
        class MyCfg(EstimatorCfg):
            kind: Literal["gaussian"]
        @ESTIMATORS.register
        class MyGaussian(Estimator):
            kind, Config = "gaussian", MyCfg
        """, "estimator 'gaussian'", "m3i.estimators.gaussian (Gaussian)", "MyGaussian"),
    "target": ("""
        from typing import Literal
        from m3i.targets import TARGETS, Target, TargetCfg
        class MyCfg(TargetCfg):
            kind: Literal["label"]
        @TARGETS.register
        class MyLabel(Target):
            kind, Config = "label", MyCfg
        """, "target kind 'label'", "m3i.targets.label (Label)", "MyLabel"),
    "target encoder": ("""
        from typing import Literal
        from m3i.encoders import TARGET_ENCODERS, TargetEncoderCfg
        @TARGET_ENCODERS.register
        class MyEMA(TargetEncoderCfg):
            kind: Literal["ema"]
        """, "target encoder kind 'ema'", "m3i.encoders.copies (EMAEncoderCfg)", "MyEMA"),
    "decoder": ("""
        from typing import Literal
        from m3i.decoders import DECODERS, DecoderCfg
        @DECODERS.register
        class MyGlobal(DecoderCfg):
            kind: Literal["global"] = "global"
        """, "decoder kind 'global'", "m3i.decoders.mlp (GlobalDecoderCfg)", "MyGlobal"),
    "data source": ("""
        from m3i.data import register_source
        @register_source("emoji", "emoji:MINE")
        def my_emoji(spec):
            raise AssertionError("never built")
        """, "data source kind 'emoji'", "m3i.data.emoji (_build)", "my_emoji"),
}


@pytest.mark.parametrize("registry", list(DUPLICATES))
def test_a_plugin_cannot_replace_a_part_of_any_registry(registry, plugin_dir, capsys):
    code, start, held, part = DUPLICATES[registry]
    name = write_plugin(plugin_dir, "dup_" + registry.replace(" ", "_"), code)
    params = sum(p.numel() for p in build_backbone("vit_nano").parameters())
    status, _, err = cli(capsys, "--plugin", name, "pretrain", "--recipe", TINY, "--dry-run")
    assert status == 2
    assert error_line(err) == (f"m3i pretrain: error: --plugin: plugin {name!r}: {start} is already registered by "
                               f"{held}; {name} ({part}) registers it again: give it another name")
    # m3i's own part is still the one a recipe gets
    assert sum(p.numel() for p in build_backbone("vit_nano").parameters()) == params
    assert module_of_spec("emoji") == "m3i.data.emoji"


@pytest.mark.parametrize("name, code, says", [
    ("timm_name", """
     from m3i.backbones import register
     from m3i.backbones.vit import VisionTransformer
     register("timm/vit_tiny_patch16_224", embed_dim=32, depth=1, num_heads=2)(VisionTransformer)
     """, "backbone 'timm/vit_tiny_patch16_224', registered by {name} (VisionTransformer): names under timm/ are "
          "timm's models; give it another name"),
    ("two_kinds", """
     from typing import Literal
     from m3i.estimators import ESTIMATORS, Estimator, EstimatorCfg
     class MyCfg(EstimatorCfg):
         kind: Literal["mine"]
     @ESTIMATORS.register
     class Mine(Estimator):
         kind, Config = "other", MyCfg
     """, "estimator 'other' (Mine): its settings class MyCfg declares kind 'mine'; the two must be the same"),
])
def test_a_name_the_schema_would_not_reach_is_refused(name, code, says, plugin_dir, capsys):
    write_plugin(plugin_dir, name, code)
    status, _, err = cli(capsys, "--plugin", name, "recipes")
    assert status == 2
    assert error_line(err) == f"m3i recipes: error: --plugin: plugin {name!r}: {says.format(name=name)}"


IMPORT_FAILURES = {
    "raises": ("import m3i\nraise RuntimeError('no licence key found')\n",
               "failed on import: RuntimeError: no licence key found, at {file}:2"),
    "dependency": ("import m3i\nimport m3i_missing_dependency.sub\n",
                   "failed on import: ModuleNotFoundError: No module named 'm3i_missing_dependency', at {file}:2; "
                   "the plugin needs 'm3i_missing_dependency': install it or put it on PYTHONPATH"),
    "syntax": ("def parts(:\n    pass\n", "failed on import: SyntaxError: invalid syntax, at {file}:1"),
}


@pytest.mark.parametrize("how", ["--plugin", "M3I_PLUGINS"])
@pytest.mark.parametrize("case", list(IMPORT_FAILURES))
def test_a_plugin_that_fails_on_import_is_one_line_naming_it_and_why(case, how, plugin_dir, monkeypatch, capsys):
    code, says = IMPORT_FAILURES[case]
    name = write_plugin(plugin_dir, f"broken_{case}", code)
    args = ["pretrain", "--recipe", TINY, "--dry-run"]
    if how == "--plugin":
        args = ["--plugin", name, *args]
    else:
        monkeypatch.setenv("M3I_PLUGINS", name)
        monkeypatch.setattr(plugins, "_configured", False)
    status, _, err = cli(capsys, *args)
    assert status == 2
    where = "--plugin" if how == "--plugin" else "M3I_PLUGINS"
    assert error_line(err) == (f"m3i pretrain: error: {where}: plugin {name!r} "
                               + says.format(file=plugin_dir / f"{name}.py"))


def test_a_plugin_that_is_not_there_is_said_to_be_missing(plugin_dir, capsys):
    status, _, err = cli(capsys, "--plugin", "m3i_no_such_plugin", "recipes")
    assert status == 2
    assert error_line(err) == ("m3i recipes: error: --plugin: cannot import plugin 'm3i_no_such_plugin' (No module "
                               "named 'm3i_no_such_plugin'); install it or put it on PYTHONPATH")


@pytest.mark.slow  # command lines in child processes
def test_a_run_records_every_plugin_loaded_and_export_names_the_missing_one(tmp_path):
    """One plugin registers a backbone of m3i's class under a new name (the recipe uses it; the
    class's module is m3i's), another, named by M3I_PLUGINS, registers nothing the recipe names."""
    folder = tmp_path / "plugins"
    write_plugin(folder, "pico_backbone", """
        from m3i.backbones import register
        from m3i.backbones.vit import VisionTransformer
        register("vit_pico_test", embed_dim=16, depth=1, num_heads=2)(VisionTransformer)
        """)
    write_plugin(folder, "quiet_plugin", "SETTING = 1\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(folder), ENV.get("PYTHONPATH", "")]),
           "M3I_PLUGINS": "quiet_plugin"}
    data = class_root(tmp_path / "data", n=4)

    def m3i(*args, env=env):
        return subprocess.run([sys.executable, "-m", "m3i.cli", *map(str, args)], env=env, capture_output=True,
                              text=True, timeout=600, cwd=tmp_path)

    run = tmp_path / "run"
    proc = m3i("--plugin", "pico_backbone", "pretrain", "--recipe", TINY, "--out", run, "--steps", "1", *FAST,
               "backbone=vit_pico_test", sources(f"folder:{data}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["plugins"] == ["pico_backbone", "quiet_plugin"]
    # with the plugins on the path, export imports them itself; without, it names the first
    proc = m3i("export", "--checkpoint", run, "--out", tmp_path / "pico.safetensors", env={**env, "M3I_PLUGINS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    bare = {k: v for k, v in ENV.items() if k != "M3I_PLUGINS"}
    proc = m3i("export", "--checkpoint", run, "--out", tmp_path / "x.safetensors", env=bare)
    assert proc.returncode == 2
    assert error_line(proc.stderr) == (f"m3i export: error: {run / 'config.yaml'}: plugins: cannot import plugin "
                                       f"'pico_backbone' (No module named 'pico_backbone'); install it or put it "
                                       f"on PYTHONPATH")


def test_a_backbone_is_built_by_its_class_not_by_its_name(plugin_dir, monkeypatch, capsys):
    """A ConvNeXt registered under a name of the plugin's own takes ``patch_size`` (its stem picks
    the stride) as m3i's ConvNeXts do, and a ViT named ``convnext_*`` takes it as a ViT."""
    from m3i.backbones import registry as base
    from m3i.config import load_recipe

    for table in ("_REGISTRY", "_CLASSES", "_DEFINERS"):
        monkeypatch.setattr(base, table, dict(getattr(base, table)))
    name = write_plugin(plugin_dir, "own_names", """
        from m3i.backbones import register
        from m3i.backbones.convnext import ConvNeXt
        from m3i.backbones.vit import VisionTransformer
        register("small_cnx", dims=(8, 16, 24, 32), depths=(1, 1, 1, 1))(ConvNeXt)
        register("convnext_like_vit", embed_dim=32, depth=1, num_heads=2)(VisionTransformer)
        """)
    for backbone in ("small_cnx", "convnext_like_vit"):
        args = [f"backbone={backbone}", "backbone.patch_size=8", "views.input_mode=fill"]
        status, out, err = cli(capsys, "--plugin", name, "pretrain", "--recipe", "supervised", "--dry-run", *args)
        assert status == 0, err[-3000:]
        cfg = load_recipe("supervised", overrides=args).backbone
        built = build_backbone(backbone, **cfg.kwargs())
        assert (built.patch_size, built.grid_size) == (8, (cfg.img_size // 8,) * 2)


@pytest.mark.parametrize("where", ["before", "after"])
def test_plugin_is_taken_before_or_after_the_command(where, plugin_dir, capsys):
    args = (["--plugin", "m3i_no_such_plugin", "recipes"] if where == "before"
            else ["recipes", "--plugin=m3i_no_such_plugin"])
    status, _, err = cli(capsys, *args)
    assert status == 2  # the plugin was read (and is missing), not refused as an unknown option
    assert "cannot import plugin 'm3i_no_such_plugin'" in error_line(err)
