"""Every built-in CPU recipe trains with its real parts (the frozen MiniLM text tower with its
caption cache included) under `train.strategy=ddp` and `fsdp` on 2 gloo ranks, as `m3i pretrain`
under torchrun: one launch of 2 ranks per strategy runs every recipe in turn, for 2 steps of a
batch of 8. Two runs beside the recipes reach the part kinds no built-in recipe uses (the mask-token
input, a frozen target model), so every registered kind of target, target encoder, decoder,
estimator and input mode trains under each strategy. Both strategies start from the same weights
and batches, so their first steps agree. The `m3i` run also scores its monitors (k-NN, and
retrieval through the text tower) after every step, and under FSDP it resumes exactly; under FSDP
a batch-norm backbone in bf16 is monitored too."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from m3i.config import PARTS, load_recipe, recipe_names, registered_parts
from conftest import needs_data
from ranks import run_ranks

WORLD = 2
STEPS = 2
STRATEGIES = ("ddp", "fsdp")
# the CPU recipes: the paper-scale ones (*-vit*) read data sets no test machine holds
RECIPES = [n for n in recipe_names() if "-vit" not in n]
COMMON = ["--steps", str(STEPS), "--no-progress", "--device", "cpu", "data.batch_size=8", "data.num_workers=0",
          "train.log_every=1", "train.warmup_steps=1", "train.precision=fp32"]
MONITORED = "m3i"  # every target kind, the text tower, the mixed input: monitored, and resumed under FSDP
MONITORS = ["train.eval_every=1", "train.eval_limit=40"]


def runs(frozen_weights: str, how: str) -> dict[str, tuple[str, list[str]]]:
    """Run name -> (recipe, overrides): each built-in recipe as it is, and the kinds none of them uses."""
    out = {name: (name, []) for name in RECIPES}
    out[MONITORED] = (MONITORED, ["train.ckpt_every=1", *MONITORS])
    out["data2vec-fill"] = ("data2vec", ["views.input_mode=fill"])  # masked patches as a learned mask token
    out["byol-frozen"] = ("byol", [f"terms.0.target_encoder={{kind: frozen, head: true, weights: {frozen_weights}}}"])
    if how == "fsdp":  # blocks gathered in bfloat16, and batch norm in them, in the monitors' eval mode
        out["resnet-bf16"] = ("supervised", ["backbone.name=resnet_nano", "backbone.patch_size=8",
                                             "train.precision=bf16", *MONITORS])
    return out


def _train_every_recipe(rank, how: str, root: str, plan: dict):
    from m3i.cli import main

    for name, (recipe, overrides) in plan.items():
        args = ["pretrain", "--recipe", recipe, "--out", f"{root}/{name}", *COMMON, f"train.strategy={how}"]
        assert main(args + overrides) == 0, f"{name} under {how}"
    if how == "fsdp":  # a branch from step 1: step 2 again, from the sharded optimizer state
        assert main(["pretrain", "--resume", f"{root}/{MONITORED}/checkpoints/step_000001", "--out",
                     f"{root}/{MONITORED}-resumed", *COMMON, f"train.strategy={how}"]) == 0


@pytest.fixture(scope="module")
def frozen_weights(tmp_path_factory) -> str:
    """A frozen target model: a backbone of byol's shape, its weights in a run's layout (under "backbone.")."""
    import torch
    from safetensors.torch import save_file

    from m3i.backbones import build_backbone

    torch.manual_seed(7)
    cfg = load_recipe("byol").backbone
    net = build_backbone(cfg.name, **cfg.kwargs())
    path = tmp_path_factory.mktemp("frozen") / "teacher.safetensors"
    save_file({f"backbone.{k}": v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, frozen_weights):
    """strategy -> the folder of its runs; each strategy's 2 ranks launched once, when first asked for."""
    roots: dict[str, Path] = {}

    def get(how: str) -> Path:
        if how not in roots:
            root = tmp_path_factory.mktemp(how)
            run_ranks(_train_every_recipe, how, str(root), runs(frozen_weights, how), world=WORLD, rendezvous="env")
            roots[how] = root
        return roots[how]

    return get


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def logged(row: dict) -> list[str]:
    """The loss and, per term, its value and sample count."""
    return [k for k in row if k == "loss" or k.startswith("n_") or f"n_{k}" in row]


@pytest.mark.parametrize("how", STRATEGIES)
def test_the_matrix_reaches_every_kind_of_every_part(how):
    plan = runs("teacher.safetensors", how)
    recipes = [load_recipe(recipe, overrides=overrides) for recipe, overrides in plan.values()]
    for field in PARTS:
        own = {k for k, plugin in registered_parts()[field].items() if plugin is None}
        used = {getattr(t, field).kind for r in recipes for t in r.terms}
        assert used >= own, f"{field}: no run of the matrix uses {sorted(own - used)}"
    assert {r.views.input_mode for r in recipes if any(t.source.masked for t in r.terms)} == {"drop", "fill", "mix"}
    captions = [t.target_encoder for r in recipes for t in r.terms if t.target_encoder.kind == "text"]
    assert any(enc.frozen for enc in captions)  # the pre-trained MiniLM, its caption cache filled on the host


@needs_data
@pytest.mark.slow  # gloo ranks
@pytest.mark.parametrize("how", STRATEGIES)
def test_every_builtin_recipe_trains_on_two_ranks(trained, how, frozen_weights):
    from m3i.runs import checkpoint as ckpt

    root = trained(how)
    for name, (recipe, overrides) in runs(frozen_weights, how).items():
        terms = [t.name for t in load_recipe(recipe, overrides=overrides).terms]
        rows = metrics(root / name)
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), name
        for r in rows:
            assert r["bad_steps"] == 0, (name, r)
            assert all(isinstance(r[k], float) and abs(r[k]) < 1e4 for k in ["loss", *terms]), (name, r)
        weights, state = ckpt.load(root / name)
        assert state["step"] == STEPS and weights, name
        # the frozen pre-trained parts come from their package or file, not from the checkpoint
        assert not any(".text.model." in k or k.startswith("frozen.") for k in weights), name
        shards = root / name / "checkpoints" / f"step_{STEPS:06d}" / "optimizer"
        if how == "fsdp":  # AdamW's state written by each rank, sharded
            assert state["optimizer"] == "optimizer" and len(list(shards.glob("*.distcp"))) == WORLD, name
        else:
            assert not shards.exists(), name


@needs_data
@pytest.mark.slow  # gloo ranks
@pytest.mark.parametrize("how", STRATEGIES)
def test_the_monitors_score_a_sharded_or_replicated_model_between_steps(trained, how, frozen_weights):
    """k-NN, and retrieval through the caption term's heads, at every step, training going on after."""
    root = trained(how)
    monitored = [n for n, (_, overrides) in runs(frozen_weights, how).items() if MONITORS[0] in overrides]
    assert MONITORED in monitored
    for name in monitored:
        for r in metrics(root / name):
            scores = {k: v for k, v in r.items() if k.startswith("monitor/")}
            expected = {"knn_top1", "knn_top5"} | ({"retrieval_i2t_R@1", "retrieval_t2i_R@1"} if name == MONITORED else set())
            assert expected <= {k.removeprefix("monitor/") for k in scores}, (name, r)
            assert all(0.0 <= v <= 1.0 for v in scores.values()), (name, scores)


@needs_data
@pytest.mark.slow  # gloo ranks
def test_fsdp_and_ddp_take_the_same_first_step(trained, frozen_weights):
    """The same initial weights (seed) and global batches: the same losses before any update."""
    ddp, fsdp = trained("ddp"), trained("fsdp")
    for name in runs(frozen_weights, "ddp"):
        a, b = metrics(ddp / name)[0], metrics(fsdp / name)[0]
        assert len(logged(a)) > 2, name
        for key in logged(a):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (name, key)


@needs_data
@pytest.mark.slow  # gloo ranks
def test_an_fsdp_run_with_the_frozen_text_tower_resumes_exactly(trained):
    root = trained("fsdp")
    first, resumed = metrics(root / MONITORED), metrics(root / f"{MONITORED}-resumed")
    assert [r["step"] for r in resumed] == [2]
    assert "caption" in resumed[0] and "monitor/retrieval_i2t_R@1" in resumed[0]
    for key in logged(first[1]) + [k for k in first[1] if k.startswith("monitor/")]:
        assert resumed[0][key] == pytest.approx(first[1][key], rel=1e-5, abs=1e-6), key
