import json
import re

import pytest
import torch

from conftest import needs_data
from m3i.backbones import build_backbone
from m3i.cli import main
from m3i.config import ConfigError, load_recipe
from m3i.train.finetune import (FinetuneCfg, finetune, initial_model, layer_decay_groups, load_config,
                                train_settings)
from m3i.eval.run import load_evalset, score, splits
from m3i.runs import checkpoint as ckpt
from m3i.runs import load_run
from m3i.train.loop import lr_lambda, pretrain

TINY_BACKBONE = ["backbone.name=vit_nano", "backbone.depth=2"]
TINY = TINY_BACKBONE + ["data.batch_size=8", "data.num_workers=0", "train.steps=1"]
QUICK = {"batch_size": 16, "test_limit": 64, "eval_batch_size": 64, "log_every": 1}


def vit_level(name: str, depth: int) -> int:
    """BEiT's layer ids, written out: embedding 0, block i -> i + 1, the rest depth + 1."""
    m = re.match(r"blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return 0 if name.split(".")[0] in ("patch_embed", "cls_token", "pos_embed") else depth + 1


def convnext_level(name: str, depths) -> int:
    """Blocks numbered 1.. across the stages; a downsampling joins its stage's first block."""
    first = [1 + sum(depths[:s]) for s in range(len(depths))]
    m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", name)
    if m:
        return first[int(m.group(1))] + int(m.group(2))
    m = re.match(r"stages\.(\d+)\.downsample\.", name)
    if m:
        return first[int(m.group(1))]
    return 0 if name.startswith("stem.") else sum(depths) + 1


@pytest.mark.parametrize("name, kw, level, top", [
    ("vit_nano", {"img_size": 32, "patch_size": 4, "depth": 3}, lambda n: vit_level(n, 3), 4),
    ("convnext_atto", {"img_size": 32, "stem_stride": 1, "depths": (1, 2, 1, 1)},
     lambda n: convnext_level(n, (1, 2, 1, 1)), 6),
    ("resnet_nano", {"img_size": 32, "depths": (2, 1, 1)}, lambda n: convnext_level(n, (2, 1, 1)), 5),
])
def test_layer_decay_gives_each_block_the_formula_lr(one_thread, name, kw, level, top):
    backbone = build_backbone(name, **kw)
    assert backbone.num_layers == top
    head = torch.nn.Linear(backbone.embed_dim, 5)
    lr, decay = 1e-3, 0.7
    cfg = FinetuneCfg(steps=10, warmup_steps=3, lr=lr, layer_decay=decay)
    groups = layer_decay_groups(backbone, head, cfg.lr, 0.05, decay)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train_settings(cfg)))
    for _ in range(3):  # to the end of warm-up: the schedule's factor is 1 there
        opt.step()
        sched.step()
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    names = {n: p for n, p in backbone.named_parameters() if p.requires_grad}  # not the fixed sin-cos table
    assert sum(len(g["params"]) for g in opt.param_groups) == len(names) + 2  # each parameter once
    seen_levels = set()
    for n, p in names.items():
        seen_levels.add(level(n))
        assert lr_of[id(p)] == pytest.approx(lr * decay ** (top - level(n)), rel=1e-9), n
    for p in head.parameters():
        assert lr_of[id(p)] == pytest.approx(lr)
    assert seen_levels == set(range(top + 1))  # every block has its own level
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert {n for n, p in names.items() if p.ndim <= 1} <= no_decay
    assert not any(n.endswith("weight") and names[n].ndim > 1 for n in no_decay if n in names)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"finetune: lr: .*greater than 0"):
        load_config(["lr=-1"])
    with pytest.raises(ConfigError, match=r"finetune: layer_decy: unknown key"):
        load_config(["layer_decy=0.5"])
    with pytest.raises(ConfigError, match=r"finetune: min_lr: 0.01 is above lr=0.001"):
        load_config(["lr=1e-3", "min_lr=1e-2"])
    cfg, backbone = load_config(["backbone=convnext_atto", "mix_prob=0.5"], steps=7)
    assert backbone == ["backbone=convnext_atto"] and cfg.mix_prob == 0.5 and cfg.steps == 7
    assert cfg.warmup() == 0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    pretrain(load_recipe("mae", overrides=TINY), root / "mae", progress=False)
    return root / "mae"


def _blocks(state: dict) -> dict[int, list[torch.Tensor]]:
    out: dict[int, list[torch.Tensor]] = {}
    for k, v in state.items():
        m = re.match(r"blocks\.(\d+)\.", k)
        if m:
            out.setdefault(int(m.group(1)), []).append(v)
    return out


@needs_data
@pytest.mark.slow
def test_finetuning_changes_the_backbone_a_frozen_probe_does_not(one_thread, run, tmp_path, capsys):
    before = {k: v.clone() for k, v in load_run(run).backbone.state_dict().items()}

    obj = load_run(run)  # a frozen probe: linear on the backbone's features
    data = load_evalset("emoji:category", obj.backbone.img_size, limit=80, progress=False)
    score(obj, "linear", data, progress=False)
    assert all(torch.equal(v, obj.backbone.state_dict()[k]) for k, v in before.items())

    r = finetune(run, "emoji:category", steps=3, overrides=QUICK, out=tmp_path / "ft", progress=False, verbose=False)
    tuned = load_run(r["out"]).backbone.state_dict()  # the written run loads like any other
    assert set(tuned) == set(before)
    for i, (old, new) in enumerate(zip(_blocks(before).values(), _blocks(tuned).values())):
        assert any(not torch.equal(a, b) for a, b in zip(old, new)), f"block {i} did not change"
    assert not torch.equal(before["patch_embed.proj.weight"], tuned["patch_embed.proj.weight"])

    # m3i eval and m3i export take the fine-tuned run
    assert main(["eval", "--checkpoint", r["out"], "--task", "knn", "--dataset", "emoji:category",
                 "--no-progress"]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "ft"), "--out", str(tmp_path / "ft.safetensors")]) == 0
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "ft.safetensors"))
    assert torch.equal(exported["blocks.0.attn.qkv.weight"], tuned["blocks.0.attn.qkv.weight"])


@needs_data
@pytest.mark.slow
def test_scratch_and_checkpoint_start_apart_and_run_the_same_schedule(one_thread, run):
    num_classes = 10
    start_ckpt = initial_model(run, num_classes).backbone.state_dict()
    start_scratch = initial_model("scratch", num_classes, "mae", TINY_BACKBONE).backbone.state_dict()
    assert set(start_ckpt) == set(start_scratch)
    assert all(start_ckpt[k].shape == start_scratch[k].shape for k in start_ckpt)
    assert not torch.equal(start_ckpt["blocks.0.attn.qkv.weight"], start_scratch["blocks.0.attn.qkv.weight"])

    kw = dict(steps=5, overrides={**QUICK, "warmup_steps": 2}, progress=False, verbose=False)
    a = finetune(run, "fashion-mnist", **kw)
    b = finetune("scratch", "fashion-mnist", recipe="mae", **{**kw, "overrides": [
        *(f"{k}={v}" for k, v in kw["overrides"].items()), *TINY_BACKBONE]})
    assert a["n_train"] == b["n_train"] == 5 * QUICK["batch_size"] and a["n_test"] == b["n_test"]
    assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]] == [1, 2, 3, 4, 5]
    for ha, hb in zip(a["history"], b["history"]):
        assert ha["lr"] == pytest.approx(hb["lr"], rel=1e-12)
    assert [h["loss"] for h in a["history"]] != [h["loss"] for h in b["history"]]
    # the schedule itself: warm-up to the peak at step 2, then cosine down
    head_lr = [h["lr"][-1] for h in a["history"]]
    assert head_lr[0] < head_lr[1] < head_lr[2] == pytest.approx(a["config"]["lr"]) and head_lr[3] < head_lr[2]


@needs_data
@pytest.mark.slow
def test_tiny_run_on_fashion_mnist_improves_over_its_start(one_thread):
    r = finetune("scratch", "fashion-mnist", steps=100, recipe="supervised",
                 overrides=TINY_BACKBONE + ["backbone.patch_size=8", "batch_size=32", "test_limit=300",
                                            "score_start=true", "lr=3e-3", "drop_path=0", "crop_scale=[1,1]"],
                 progress=False, verbose=False)
    m = r["metrics"]
    assert m["start_top1"] < 0.25  # an untrained head is near chance (10 classes)
    assert m["top1"] > m["start_top1"] + 0.2


@needs_data
@pytest.mark.slow
def test_cli_convnext_scratch_with_mixing_and_clear_errors(one_thread, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["finetune", "--checkpoint", "scratch", "--dataset", "emoji:category", "--steps", "2",
                 "--split", "val", "--out", str(tmp_path / "cx"), "--json", str(out), "--no-progress",
                 "backbone=convnext_atto", "backbone.depths=[1,1,1,1]", "batch_size=8", "mix_prob=1.0"]) == 0
    r = json.loads(out.read_text())
    assert r["backbone"] == "convnext_atto" and set(r["metrics"]) == {"top1", "top5"}
    assert r["split"] == "val" and r["n_test"] == len(splits("emoji:category", "val")[3])  # scored on val
    assert type(load_run(tmp_path / "cx").backbone).__name__ == "ConvNeXt"

    assert main(["finetune", "--checkpoint", "scratch", "--dataset", "fashion-mnist", "lr=abc"]) == 2
    err = capsys.readouterr().err
    assert "m3i finetune: error: finetune: lr:" in err and "Traceback" not in err
    assert main(["finetune", "--checkpoint", str(tmp_path / "cx"), "--dataset", "fashion-mnist",
                 "backbone=vit_nano"]) == 2
    assert "--recipe and backbone=... overrides are for --checkpoint scratch" in capsys.readouterr().err
    assert main(["finetune", "--checkpoint", str(tmp_path / "nothing"), "--dataset", "fashion-mnist"]) == 2
    assert "no such run or checkpoint directory" in capsys.readouterr().err


@pytest.mark.parametrize("cutmix_share", [0.0, 1.0])
def test_mixed_targets_weigh_each_label_by_its_share_of_the_image(one_thread, cutmix_share):
    from m3i.train.finetune import MixCut

    torch.manual_seed(0)
    n, classes, eps = 16, 4, 0.1
    y = torch.arange(n) % classes
    x = (y.float() + 1).view(n, 1, 1, 1).expand(n, 1, 8, 8).contiguous()  # image value = label + 1
    mix = MixCut(FinetuneCfg(mix_prob=1.0, cutmix_share=cutmix_share, label_smoothing=eps), classes)
    xm, t = mix(x, y)
    assert torch.allclose(t.sum(1), torch.ones(n))
    assert (t >= eps / classes - 1e-6).all()
    # mean pixel value = Σ_c share_c · (c + 1); undo the smoothing to read the shares off the target
    shares = (t - eps / classes) / (1 - eps)
    expected = (shares * (torch.arange(classes) + 1).float()).sum(1)
    assert torch.allclose(xm.mean((1, 2, 3)), expected, atol=1e-5)
    assert (shares.max(1).values < 1 - 1e-3).any()  # some images really were mixed


# -- fine-tuning through the pre-training loop -------------------------------------------------
SCRATCH_ARGS = ["finetune", "--checkpoint", "scratch", "--dataset", "emoji:category", "--no-progress", "--device",
                "cpu", *TINY_BACKBONE, "batch_size=8", "test_limit=16", "eval_batch_size=16", "log_every=1",
                "precision=fp32"]


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def nan_at(monkeypatch, bad_steps: set[int]):
    """The classifier's training forward pass gives NaN logits at these (1-based) steps: a step whose
    loss is not finite, as a too high learning rate gives; scoring (eval mode) is left alone."""
    from m3i.train.finetune import Classifier

    real, calls = Classifier.forward, [0]

    def forward(self, x):
        out = real(self, x)
        if self.training:
            calls[0] += 1
            if calls[0] in bad_steps:
                out = out * float("nan")
        return out

    monkeypatch.setattr(Classifier, "forward", forward)


@needs_data
@pytest.mark.slow
def test_a_non_finite_step_is_skipped_and_counted_as_in_pre_training(one_thread, tmp_path, monkeypatch, capsys):
    """A NaN loss at step 2 of 4: the step is skipped (the weights as they were), counted in
    bad_steps from step 2 on, and the run ends with its checkpoint (it used to stop at once)."""
    nan_at(monkeypatch, {2})
    out = tmp_path / "ft"
    assert main([*SCRATCH_ARGS, "--steps", "4", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "step 2: 1 step(s) skipped since step 1 (loss or gradients not finite; 1 in a row now, 1 in all)" \
        in captured.out
    assert [(r["step"], r["bad_steps"]) for r in rows(out)] == [(1, 0), (2, 1), (3, 1), (4, 1)]
    _, state = ckpt.load(out)
    assert state["step"] == 4 and state["bad_steps"] == 1 and "finetune" in state
    assert all(torch.isfinite(v).all() for v in load_run(out).backbone.state_dict().values() if v.is_floating_point())


@needs_data
@pytest.mark.slow
def test_max_bad_steps_in_a_row_stop_the_run_with_one_line(one_thread, tmp_path, monkeypatch, capsys):
    nan_at(monkeypatch, set(range(1, 100)))
    out = tmp_path / "ft"
    assert main([*SCRATCH_ARGS, "--steps", "6", "--out", str(out), "max_bad_steps=2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["m3i finetune: error: the loss or its gradients were not finite for 2 steps in a row (by step 2); "
                   "stopping. The last good checkpoint is none yet. Lower lr or check the data."]
    assert not (out / "checkpoints").exists()


@needs_data
@pytest.mark.slow
def test_a_warm_up_longer_than_the_run_is_cut_short_as_in_pre_training(one_thread, tmp_path, capsys):
    """warmup_steps 5 of 2 steps: one warning line, and the run trains with the rate rising as the
    schedule says, lr · s / 6 at step s (it used to be refused)."""
    result = tmp_path / "r.json"
    assert main([*SCRATCH_ARGS, "--steps", "2", "--out", str(tmp_path / "ft"), "--json", str(result),
                 "warmup_steps=5", "lr=3e-3"]) == 0
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.startswith("m3i: warning: ")] == [
        "m3i: warning: finetune: warmup_steps 5 is more than steps 2: the warm-up is cut short, the run ending at 33% "
        "of lr"]
    history = json.loads(result.read_text())["history"]
    assert [h["step"] for h in history] == [1, 2]
    for h in history:
        assert h["lr"][-1] == pytest.approx(3e-3 * h["step"] / 6, rel=1e-12)  # the head's group, at level L
    assert [r["lr"] for r in rows(tmp_path / "ft")] == [h["lr"] for h in history]


@needs_data
@pytest.mark.slow
def test_a_fine_tuning_run_is_a_run_folder_pre_training_does_not_resume(one_thread, run, tmp_path, capsys):
    """Written as pre-training writes a run (config, metrics, a checkpoint with the training state
    beside the head and the scores); `m3i pretrain --resume` of it is refused with one line and
    changes nothing, `--init-from` takes its weights."""
    out = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", str(run), "--dataset", "emoji:category", "--steps", "2", "--out",
                 str(out), "--no-progress", "batch_size=8", "test_limit=16", "log_every=1"]) == 0
    capsys.readouterr()
    weights, state = ckpt.load(out)
    assert {"optimizer", "scheduler", "rng", "head", "classes", "bad_steps"} <= set(state)
    assert state["finetune"]["metrics"].keys() == {"top1", "top5"} and state["classes"] == splits("emoji:category")[4]
    assert rows(out)[-1]["top1"] == state["finetune"]["metrics"]["top1"]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(["pretrain", "--resume", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"m3i pretrain: error: --resume {out}: a fine-tuning run (m3i finetune) is not continued by pre-training; "
        f"start from its weights with --init-from {out}")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
