"""End-to-end runs of the trainer on the real built-in data, at small sizes."""
import json

import pytest
import torch
from safetensors.torch import load_file

from m3i.cli import main
from m3i.config import load_recipe
from m3i.runs import checkpoint as ckpt
from m3i.train import loop
from conftest import killed_and_resumed, needs_data

pytestmark = needs_data

SMALL = ["backbone.name=vit_nano", "backbone.depth=2", "data.batch_size=8", "data.num_workers=0",
         "train.log_every=1", "train.warmup_steps=1", "data.sources=[{spec: fashion-mnist}]"]


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kill_and_resume_reproduces_uninterrupted_losses(tmp_path, monkeypatch):
    recipe = load_recipe("sim", overrides=SMALL + ["train.steps=6", "train.ckpt_every=3"])
    loop.pretrain(recipe, tmp_path / "a", progress=False)
    full = read_metrics(tmp_path / "a")

    killed_and_resumed(monkeypatch, recipe, tmp_path / "b", 3)  # a crash right after the step-3 checkpoint
    resumed = read_metrics(tmp_path / "b")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, resumed):
        assert a["dense"] == pytest.approx(b["dense"], rel=1e-6, abs=1e-7), a["step"]
    assert full[0]["dense"] != full[-1]["dense"]  # the run did train


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    w = {"a": torch.ones(3)}
    ckpt.save(tmp_path, 1, w, {"step": 1, "optimizer": {}, "scheduler": {}, "rng": {}})

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(ckpt.CheckpointWriteError, match="step_000001 is whole"):
        ckpt.save(tmp_path, 2, {"a": torch.zeros(3)}, {"step": 2})
    weights, state = ckpt.load(tmp_path)  # the previous checkpoint is whole and still "latest"
    assert state["step"] == 1 and torch.equal(weights["a"], torch.ones(3))


@pytest.mark.slow
def test_nan_steps_are_skipped_counted_then_stop(tmp_path, monkeypatch):
    from m3i.objective import Objective

    real = Objective.forward
    calls = {"n": 0}

    def sometimes_nan(self, batch, views=None):
        out = real(self, batch, views)
        calls["n"] += 1
        if calls["n"] >= 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Objective, "forward", sometimes_nan)
    recipe = load_recipe("sim", overrides=SMALL + ["train.steps=20", "train.ckpt_every=2", "train.max_bad_steps=3"])
    with pytest.raises(loop.TrainingError, match="not finite for 3 steps"):
        loop.pretrain(recipe, tmp_path, progress=False)
    # the last good checkpoint (step 2) is kept
    assert ckpt.find(tmp_path).name == "step_000002"


@pytest.mark.slow
def test_resume_rejects_another_model_shape(tmp_path):
    recipe = load_recipe("sim", overrides=SMALL + ["train.steps=1"])
    loop.pretrain(recipe, tmp_path, progress=False)
    wider = load_recipe("sim", overrides=SMALL + ["train.steps=2", "backbone.embed_dim=64"])
    with pytest.raises(ValueError, match="another model shape"):
        loop.pretrain(wider, tmp_path / "x", resume=tmp_path, progress=False)


@pytest.mark.parametrize("name", ["supervised", "clip", "simclr", "mocov3", "byol", "mae", "data2vec", "sim", "m3i"])
@pytest.mark.slow
def test_every_recipe_trains_from_the_command_line(tmp_path, name, capsys):
    out = tmp_path / name
    args = ["pretrain", "--recipe", name, "--out", str(out), "--steps", "2", "--no-progress",
            "backbone.name=vit_nano", "backbone.depth=3", "data.batch_size=8", "data.num_workers=0",
            "train.log_every=1", "train.warmup_steps=1"]  # m3i's own warm-up is longer than 2 steps
    if name in ("clip", "m3i"):
        args.append(f"terms.{0 if name == 'clip' else 2}.target_encoder.tower=scratch")
    assert main(args) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    terms = [t.name for t in load_recipe(name).terms]
    for r in rows:
        assert all(k in r for k in ["loss", *terms]) and all(r[t] == r[t] for t in terms)  # no NaN
    assert (out / "config.yaml").is_file()
    assert (out / "checkpoints" / "step_000002" / "model.safetensors").is_file()
    assert "checkpoint:" in capsys.readouterr().out


@pytest.mark.slow
def test_export_writes_timm_vit_layout(tmp_path):
    recipe = load_recipe("mae", overrides=SMALL + ["train.steps=1"])
    loop.pretrain(recipe, tmp_path / "run", progress=False)
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--format", "timm",
                 "--out", str(tmp_path / "vit.safetensors")]) == 0
    w = load_file(str(tmp_path / "vit.safetensors"))
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(2):
        for n in ["norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]:
            expected |= {f"blocks.{i}.{n}.weight", f"blocks.{i}.{n}.bias"}
    assert set(w) == expected
    assert tuple(w["pos_embed"].shape) == (1, 1 + 64, 128)


def test_missing_data_and_checkpoint_errors_are_clear(tmp_path, capsys):
    assert main(["pretrain", "--recipe", "sim", "--out", str(tmp_path), "--steps", "1",
                 f"data.sources=[{{spec: 'folder:{tmp_path}/nowhere'}}]"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "no such run" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["mix", "fill"])
@pytest.mark.slow
def test_convnext_trains_m3i_in_both_masked_input_modes_and_exports_timm_layout(tmp_path, mode):
    out = tmp_path / mode
    assert main(["pretrain", "--recipe", "m3i", "--out", str(out), "--steps", "2", "--no-progress",
                 "backbone=convnext_atto", "backbone.patch_size=8", f"views.input_mode={mode}",
                 "data.batch_size=8", "data.num_workers=0", "train.log_every=1", "train.warmup_steps=1",
                 "terms.2.target_encoder.tower=scratch"]) == 0
    rows = read_metrics(out)
    assert len(rows) == 2 and all(r["dense"] == r["dense"] for r in rows)
    assert main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "cnx.safetensors")]) == 0
    w = load_file(str(tmp_path / "cnx.safetensors"))
    # timm's ConvNeXt-atto names (conv_mlp=True: 1x1 conv MLP kernels), written out independently
    dims, depths = (40, 80, 160, 320), (2, 2, 6, 2)
    expected = {"stem.0.weight": (40, 3, 1, 1), "stem.0.bias": (40,), "stem.1.weight": (40,), "stem.1.bias": (40,),
                "head.norm.weight": (320,), "head.norm.bias": (320,)}
    for s, (d, n) in enumerate(zip(dims, depths)):
        if s:
            expected |= {f"stages.{s}.downsample.0.weight": (dims[s - 1],), f"stages.{s}.downsample.0.bias": (dims[s - 1],),
                         f"stages.{s}.downsample.1.weight": (d, dims[s - 1], 2, 2), f"stages.{s}.downsample.1.bias": (d,)}
        for b in range(n):
            p = f"stages.{s}.blocks.{b}."
            expected |= {p + "gamma": (d,), p + "conv_dw.weight": (d, 1, 7, 7), p + "conv_dw.bias": (d,),
                         p + "norm.weight": (d,), p + "norm.bias": (d,), p + "mlp.fc1.weight": (4 * d, d, 1, 1),
                         p + "mlp.fc1.bias": (4 * d,), p + "mlp.fc2.weight": (d, 4 * d, 1, 1), p + "mlp.fc2.bias": (d,)}
    assert {k: tuple(v.shape) for k, v in w.items()} == expected


def test_convnext_cannot_drop_tokens_clear_error(tmp_path, capsys):
    assert main(["pretrain", "--recipe", "mae", "--out", str(tmp_path), "--steps", "1",
                 "backbone=convnext_atto", "data.num_workers=0"]) == 2
    err = capsys.readouterr().err
    assert "views.input_mode" in err and "fill" in err
