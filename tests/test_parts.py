"""Parts of the objective from outside m3i: a plugin package.

``tests/fixtures/m3i_example_parts`` is a package of its own (its own ``pyproject.toml``, an
``m3i.parts`` entry point) adding Barlow Twins as an estimator and MaskFeat's HOG as a kind of
target. With the installed m3i untouched, fresh interpreters that import it (``M3I_PLUGINS``,
``--plugin``, or the entry point of the installed package) load recipes that use the new parts;
a run with both trains, resumes, evaluates and exports, its ``config.yaml`` naming the plugin so
that the later commands need no flag; without the plugin, the same commands say in one line what
is missing. The values the new parts compute are checked against formulas written in this file.

The rest of the file holds the schema to the registries: the recipe schema accepts exactly the
registered kinds, fields of another kind are errors, and the checks that tie parts together
(a Gaussian estimate against the online encoder, the mixed input's mask ratio) name their field.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

import m3i
from m3i.config import ConfigError, TermCfg, load_recipe, recipe_schema
from m3i.estimators import ESTIMATORS
from m3i.objective import Objective
from m3i.targets import TARGETS
from conftest import HANG

pytestmark = pytest.mark.usefixtures("one_thread")

PLUGIN = Path(__file__).resolve().parent / "fixtures" / "m3i_example_parts"
PLUGIN_SRC = PLUGIN / "src"
PATCH = 8
SMALL = ["backbone.name=vit_micro", "backbone.depth=2", "backbone.embed_dim=32", "backbone.num_heads=2",
         f"backbone.patch_size={PATCH}"]
BARLOW = SMALL + ["terms.0.estimator={kind: barlow, lam: 0.005}"]
HOG = SMALL + ["terms.0.target={kind: hog, view: 0}", "terms.0.target_encoder={kind: identity}"]
LAM = 0.005


# ---------------------------------------------------------------------------- fresh interpreters
def env_with(*paths: Path, plugins: str | None = None) -> dict:
    """The environment of a child process with ``paths`` put before the current PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "M3I_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in paths] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    if plugins:
        env["M3I_PLUGINS"] = plugins
    return env


def run_on(script: str, out: Path) -> dict:
    """Run ``script`` (it reads the output folder as ``sys.argv[1]``) with the plugin package on the
    path and named by ``M3I_PLUGINS``; returns the JSON it prints last."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", script, str(out)], env=env_with(PLUGIN_SRC, plugins="m3i_example_parts"),
                          capture_output=True, text=True, timeout=HANG, cwd=out, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def m3i_cli(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "m3i.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=cwd, check=False)


COMMON = r"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import m3i
from m3i.config import TermCfg, describe_term, load_recipe, recipe_schema
from m3i.estimators import ESTIMATORS
from m3i.objective import Objective
from m3i.targets import TARGETS

out = Path(sys.argv[1])
from m3i import plugins
plugins.load_configured()  # M3I_PLUGINS=m3i_example_parts
info = {"plugins": plugins.loaded(), "package": str(Path(m3i.__file__).parent), "estimators": ESTIMATORS.kinds(),
        "targets": TARGETS.kinds()}
# the kinds the recipe schema accepts, read off the validation error of a term of no known kind
from pydantic import ValidationError
def accepted(field):
    term = {"name": "t", "target": {"kind": "label"}, "target_encoder": {"kind": "class_table"},
            "estimator": {"kind": "boltzmann", "candidates": "classes"}}
    term[field] = {"kind": "no-such-kind"}
    recipe_schema()
    try:
        TermCfg.model_validate(term)
    except ValidationError as e:
        return [err["ctx"]["expected_tags"] for err in e.errors() if err["type"] == "union_tag_invalid"]
info["schema_estimators"] = accepted("estimator")
info["schema_targets"] = accepted("target")

def train_step(recipe, seed, visible=None):
    torch.manual_seed(seed)
    obj = Objective(recipe, num_classes=10).train()
    g = torch.Generator().manual_seed(seed)
    batch = {"image": torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8),
             "label": torch.randint(0, 10, (8,), generator=g), "caption": [None] * 8}
    views = obj.make_views(batch["image"])
    if visible is not None:
        views.visible = {0: visible}
    res = obj(batch, views)
    res["loss"].backward()
    grads = [p.grad for p in obj.backbone.parameters() if p.requires_grad]
    info["loss"] = float(res["loss"])
    info["backbone_grads_finite"] = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    info["backbone_grads_nonzero"] = sum(int(g is not None and bool(g.abs().sum() > 0)) for g in grads)
    info["backbone_params"] = len(grads)
    info["describe"] = describe_term(recipe.terms[0], recipe.views.input_mode)
    return obj, batch, views, res
"""

BARLOW_SCRIPT = COMMON + r"""
recipe = load_recipe("byol", overrides=OVERRIDES)
obj, batch, views, res = train_step(recipe, 0)
term = obj.terms[0]
with torch.no_grad():  # the term's own modules on the step's views: predictions and EMA targets
    p = [term.predict(obj.backbone.forward_features(v).pooled) for v in views.images]
    z = [obj.teacher.heads[term.name](obj.teacher.backbone.forward_features(v).pooled) for v in views.images]
    own = sum(float(term.estimator.paired(p[s], z[t], None, term.temperature)) for s, t in ((0, 1), (1, 0)))
info["term"] = float(res[term.name])
info["estimator_on_modules"] = own
# the estimator alone, on random embeddings: a pair, the same embedding on both sides, and rows left out
est = ESTIMATORS["barlow"](ESTIMATORS["barlow"].Config(kind="barlow", lam=LAM))
g = torch.Generator().manual_seed(1)
a, b = torch.randn(16, 6, generator=g), torch.randn(16, 6, generator=g)
avail = torch.arange(16) % 3 != 0
t = torch.tensor(1.0)
torch.save({"a": a, "b": b, "avail": avail, "pair": est.paired(a, b, None, t), "same": est.paired(a, a, None, t),
            "avail_pair": est.paired(a, b, avail, t)}, out / "barlow.pt")
print(json.dumps(info))
"""

HOG_SCRIPT = COMMON + r"""
from m3i_example_parts.hog import hog
recipe = load_recipe("mae", overrides=OVERRIDES)
g = torch.Generator().manual_seed(2)
grid = 32 // 8
vis = torch.zeros(8, grid * grid, dtype=torch.bool)
for i in range(8):  # 4 of 16 patches seen (the recipe's ratio 0.75)
    vis[i, torch.randperm(grid * grid, generator=g)[:4]] = True
obj, batch, views, res = train_step(recipe, 0, vis)
term = obj.terms[0]
info["term"] = float(res[term.name])
# the decoder's predictions at the masked patches against the histograms of those patches
with torch.no_grad():
    pos = lambda idx: torch.stack([idx // grid, idx % grid, 0 * idx, 0 * idx], -1).float()
    seen = torch.stack([row.nonzero().squeeze(1) for row in vis])
    hidden = torch.stack([(~row).nonzero().squeeze(1) for row in vis])
    feats = obj.backbone.forward_features(views.images[0], vis, mode="drop")
    pred = term.decoder.predict(term.decoder.project(feats.tokens, pos(seen)), pos(hidden), pos=pos(seen))
    target = hog(views.images[0], 8, BINS)
    target = torch.stack([target[i, hidden[i]] for i in range(8)])
    info["term_by_hand"] = float((pred - target).pow(2).mean())
info["out_dim"] = term.decoder.out.out_features
images = torch.load(out / "images.pt")
torch.save({name: hog(x, PATCH, BINS) for name, x in images.items()}, out / "hog.pt")
print(json.dumps(info))
"""


def script(text: str, **consts) -> str:
    return "".join(f"{k} = {v!r}\n" for k, v in consts.items()) + text


@pytest.fixture(scope="module")
def barlow_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("barlow")
    out = tmp / "out"
    info = run_on(script(BARLOW_SCRIPT, OVERRIDES=BARLOW, LAM=LAM), out)
    return info, torch.load(out / "barlow.pt")


# ---------------------------------------------------------------------------- HOG test images
HOG_BINS = 9


def edge_images() -> dict[str, torch.Tensor]:
    """8 × 8 images (values 0 and 1, the same in the three channels) and random integer images."""
    y, x = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")

    def rgb(img):
        return img.float().expand(1, 3, 8, 8).clone()

    g = torch.Generator().manual_seed(3)
    gray = torch.randint(0, 256, (2, 1, 16, 16), generator=g).float()
    return {
        "vertical": rgb(x >= 4),        # dark left half, bright right half: gradient along x only
        "vertical_falling": rgb(x < 4),  # bright left half: the gradient points the other way
        "horizontal": rgb(y >= 4),      # dark top, bright bottom: gradient along y only
        "flat": torch.full((1, 3, 8, 8), 7.0),
        "random": gray.expand(2, 3, 16, 16).clone(),
    }


@pytest.fixture(scope="module")
def hog_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hog")
    out = tmp / "out"
    out.mkdir()
    torch.save(edge_images(), out / "images.pt")
    info = run_on(script(HOG_SCRIPT, OVERRIDES=HOG, PATCH=4, BINS=HOG_BINS), out)
    return info, torch.load(out / "hog.pt")


# ---------------------------------------------------------------------------- reference formulas
def barlow_reference(a: np.ndarray, b: np.ndarray, lam: float) -> tuple[float, np.ndarray]:
    """Barlow Twins: C_ij = Σ_n â_ni b̂_nj / sqrt(Σ_n â_ni² · Σ_n b̂_nj²), â, b̂ centred over the batch;
    L = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij². Returns (L, C)."""
    a = a.astype(np.float64) - a.mean(0)
    b = b.astype(np.float64) - b.mean(0)
    c = (a.T @ b) / np.sqrt(np.outer((a ** 2).sum(0), (b ** 2).sum(0)))
    off = (c ** 2).sum() - (np.diag(c) ** 2).sum()
    return float(((1 - np.diag(c)) ** 2).sum() + lam * off), c


def hog_reference(images: np.ndarray, patch: int, bins: int) -> np.ndarray:
    """Per patch, the gradient magnitude of the gray image (central differences, edges replicated)
    summed into unsigned orientation bins of width π / bins, L2-normalised. (B, N, bins)."""
    gray = images.astype(np.float64).mean(1)
    b, h, w = gray.shape
    out = np.zeros((b, (h // patch) * (w // patch), bins))
    for n in range(b):
        for i in range(h):
            for j in range(w):
                gx = gray[n, i, min(j + 1, w - 1)] - gray[n, i, max(j - 1, 0)]
                gy = gray[n, min(i + 1, h - 1), j] - gray[n, max(i - 1, 0), j]
                angle = math.atan2(gy, gx) % math.pi
                k = min(int(angle / math.pi * bins), bins - 1)
                out[n, (i // patch) * (w // patch) + j // patch, k] += math.hypot(gx, gy)
    norm = np.linalg.norm(out, axis=-1, keepdims=True)
    return out / np.maximum(norm, 1e-12)


# ---------------------------------------------------------------------------- Barlow Twins from a plugin
@pytest.mark.slow
def test_barlow_from_the_plugin_trains_with_m3i_untouched(barlow_run):
    info, _ = barlow_run
    assert info["package"] == str(Path(m3i.__file__).parent)  # the installed m3i, not a copy
    assert info["plugins"] == ["m3i_example_parts"]
    assert "barlow" in info["estimators"]
    assert math.isfinite(info["loss"]) and info["loss"] > 0
    assert info["backbone_grads_finite"]
    assert info["backbone_grads_nonzero"] == info["backbone_params"]
    assert info["describe"]["estimator"] == f"Barlow Twins (λ={LAM})"
    # the recipe's term is the estimator on the term's predictions and its EMA targets, both ways
    assert info["term"] == pytest.approx(info["estimator_on_modules"], rel=1e-4, abs=1e-5)
    assert info["loss"] == pytest.approx(info["term"], rel=1e-6)


@pytest.mark.slow
def test_barlow_plugin_adds_its_kind_to_the_schema(barlow_run):
    info, _ = barlow_run
    tags = info["schema_estimators"]
    assert len(tags) == 1 and sorted(re.findall(r"'([^']+)'", tags[0])) == info["estimators"]


@pytest.mark.slow
def test_barlow_is_the_cross_correlation_loss(barlow_run):
    _, saved = barlow_run
    a, b, avail = saved["a"].numpy(), saved["b"].numpy(), saved["avail"].numpy()
    ref, _ = barlow_reference(a, b, LAM)
    assert float(saved["pair"]) == pytest.approx(ref, rel=1e-4)
    assert float(saved["avail_pair"]) == pytest.approx(barlow_reference(a[avail], b[avail], LAM)[0], rel=1e-4)
    # both sides the same embedding: every C_ii is 1, only the redundancy term is left
    _, c = barlow_reference(a, a, LAM)
    off = LAM * ((c ** 2).sum() - (np.diag(c) ** 2).sum())
    assert float(saved["same"]) == pytest.approx(off, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("recipe, overrides, field, kind, registry", [
    ("byol", BARLOW, "estimator", "barlow", ESTIMATORS),
    ("mae", HOG, "target", "hog", TARGETS),
])
def test_without_the_plugin_the_kind_is_refused(recipe, overrides, field, kind, registry):
    with pytest.raises(ConfigError) as e:
        load_recipe(recipe, overrides=overrides)
    msg = str(e.value)
    listed = re.search(rf"terms\.0\.{field}\.kind: expected one of (.*?) \(got '{kind}'\)", msg)
    assert listed, msg
    assert sorted(re.findall(r"'([^']+)'", listed.group(1))) == registry.kinds()


# ---------------------------------------------------------------------------- HOG from a plugin
@pytest.mark.slow
def test_hog_from_the_plugin_trains(hog_run):
    info, _ = hog_run
    assert "hog" in info["targets"]
    assert math.isfinite(info["loss"]) and info["loss"] > 0
    assert info["backbone_grads_finite"]
    assert info["backbone_grads_nonzero"] > 0
    assert info["out_dim"] == HOG_BINS
    # the term regresses the histograms of the masked patches (a Gaussian: their mean squared error)
    assert info["term"] == pytest.approx(info["term_by_hand"], rel=1e-4, abs=1e-6)
    assert info["describe"]["target"] == "oriented-gradient histograms of the masked patches"
    tags = info["schema_targets"]
    assert len(tags) == 1 and sorted(re.findall(r"'([^']+)'", tags[0])) == info["targets"]


@pytest.mark.slow
def test_hog_of_edges(hog_run):
    _, out = hog_run
    first = torch.zeros(HOG_BINS)
    first[0] = 1.0
    # a vertical edge: the gradient is along x (angle 0), every patch touches the edge
    assert out["vertical"].shape == (1, 4, HOG_BINS)
    torch.testing.assert_close(out["vertical"], first.expand(1, 4, -1))
    # the opposite contrast points the gradient to π: the same unsigned orientation
    torch.testing.assert_close(out["vertical_falling"], first.expand(1, 4, -1))
    # a horizontal edge: the gradient is along y (angle π/2), the bin [4π/9, 5π/9)
    mid = torch.zeros(HOG_BINS)
    mid[int(HOG_BINS * 0.5)] = 1.0
    torch.testing.assert_close(out["horizontal"], mid.expand(1, 4, -1))
    # no gradient: no votes, a zero histogram
    assert torch.equal(out["flat"], torch.zeros(1, 4, HOG_BINS))


@pytest.mark.slow
def test_hog_matches_the_histogram_formula(hog_run):
    _, out = hog_run
    ref = hog_reference(edge_images()["random"].numpy(), 4, HOG_BINS)
    assert out["random"].shape == (2, 16, HOG_BINS)
    np.testing.assert_allclose(out["random"].numpy(), ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- a run with plugin parts, end to end
# a one-block ViT on 16 px: a masked HOG term and a Barlow Twins view term, both from the plugin
RECIPE = {
    "name": "plugin-parts",
    "backbone": {"name": "vit_nano", "img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2},
    "views": {"count": 2, "augment": [{"crop_scale": [0.5, 1.0], "jitter_p": 0.0, "gray_p": 0.0}],
              "mask": {"kind": "random", "ratio": 0.5}},
    "train": {"steps": 2, "warmup_steps": 1, "precision": "fp32", "log_every": 1, "ckpt_every": 1},
    "terms": [
        {"name": "hog", "source": {"view": 0, "masked": True}, "target": {"kind": "hog", "view": 0, "bins": 6},
         "target_encoder": {"kind": "identity"}, "decoder": {"kind": "dense", "width": 16, "depth": 1, "heads": 2},
         "estimator": {"kind": "gaussian"}},
        {"name": "view", "source": {"view": 0}, "target": {"kind": "view", "view": 1},
         "target_encoder": {"kind": "ema", "head": True}, "decoder": {"kind": "global", "projector": [16]},
         "estimator": {"kind": "barlow", "lam": 0.01}, "swap_views": True},
    ],
}


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory):
    """A recipe using both plugin parts, its image folder, and a run of it trained with --plugin."""
    tmp = tmp_path_factory.mktemp("plugin_run")
    g = np.random.default_rng(0)
    for c in "ab":
        (tmp / "data" / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(g.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp / "data" / c / f"{i}.png")
    recipe = dict(RECIPE, data={"sources": [{"spec": f"folder:{tmp / 'data'}"}], "image_size": 16, "batch_size": 8,
                                "num_workers": 0})
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = env_with(PLUGIN_SRC)
    proc = m3i_cli(["--plugin", "m3i_example_parts", "pretrain", "--recipe", str(tmp / "recipe.yaml"),
                    "--out", str(tmp / "run"), "--device", "cpu", "--no-progress"], env, tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_run_with_plugin_parts_records_them_and_resumes_evaluates_exports_without_the_flag(plugin_run):
    tmp, env = plugin_run, env_with(PLUGIN_SRC)
    run = tmp / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    # the plugin named by --plugin, then the modules that registered the parts the recipe uses
    assert saved["plugins"] == ["m3i_example_parts", "m3i_example_parts.hog", "m3i_example_parts.barlow"]
    first = metrics(run)
    assert [m["step"] for m in first] == [1, 2] and all(math.isfinite(m["hog"]) and math.isfinite(m["view"])
                                                        for m in first)
    # --resume, eval and export read config.yaml and import the plugin themselves
    proc = m3i_cli(["pretrain", "--resume", str(run), "--steps", "3", "--device", "cpu", "--no-progress"], env, tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]
    proc = m3i_cli(["eval", "--checkpoint", str(run), "--task", "knn", "--dataset", f"folder:{tmp / 'data'}",
                    "--json", str(tmp / "knn.json"), "--device", "cpu", "--no-progress"], env, tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 0.0 <= json.loads((tmp / "knn.json").read_text())["metrics"]["top1"] <= 1.0
    proc = m3i_cli(["export", "--checkpoint", str(run), "--out", str(tmp / "vit.safetensors")], env, tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    weights = load_file(str(tmp / "vit.safetensors"))
    assert weights["patch_embed.proj.weight"].shape == (32, 3, 4, 4)


@pytest.mark.slow
def test_without_the_plugin_a_recorded_run_says_which_module_is_missing(plugin_run):
    tmp = plugin_run
    for args in (["eval", "--checkpoint", str(tmp / "run"), "--task", "knn", "--dataset", f"folder:{tmp / 'data'}"],
                 ["export", "--checkpoint", str(tmp / "run"), "--out", str(tmp / "x.safetensors")],
                 ["pretrain", "--resume", str(tmp / "run"), "--steps", "4"]):
        proc = m3i_cli(args, env_with(), tmp)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert "config.yaml: plugins: cannot import plugin 'm3i_example_parts'" in lines[0], lines[0]
    # a recipe naming an unknown kind, with no plugin: the registered kinds, in one line
    proc = m3i_cli(["pretrain", "--recipe", str(tmp / "recipe.yaml"), "--out", str(tmp / "no")], env_with(), tmp)
    assert proc.returncode == 2 and "terms.0.target.kind: expected one of" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_the_installed_plugin_package_is_found_by_its_entry_point(tmp_path):
    """``pip install`` of the fixture package (into a folder of its own): its ``m3i.parts`` entry
    point is imported with no flag and no variable, and ``m3i recipes`` lists its kinds."""
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(site), str(PLUGIN)], capture_output=True, text=True,
                         timeout=300, check=False)
    assert pip.returncode == 0, pip.stderr[-3000:]
    proc = m3i_cli(["recipes"], env_with(site), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hog (m3i_example_parts.hog)" in proc.stdout and "barlow (m3i_example_parts.barlow)" in proc.stdout
    # without the package on the path, the kinds are not there
    assert "barlow" not in m3i_cli(["recipes"], env_with(), tmp_path).stdout


# ---------------------------------------------------------------------------- the schema is the registries
def expected_tags(field: str) -> list[str]:
    from pydantic import ValidationError

    term = {"name": "t", "target": {"kind": "label"}, "target_encoder": {"kind": "class_table"},
            "estimator": {"kind": "boltzmann", "candidates": "classes"}, field: {"kind": "no-such-kind"}}
    recipe_schema()
    with pytest.raises(ValidationError) as e:
        TermCfg.model_validate(term)
    tags = [err["ctx"]["expected_tags"] for err in e.value.errors() if err["type"] == "union_tag_invalid"]
    assert len(tags) == 1
    return sorted(re.findall(r"'([^']+)'", tags[0]))


def schema_kinds(field: str) -> list[str]:
    schema = recipe_schema() and TermCfg.model_json_schema()
    refs = [r["$ref"].rsplit("/", 1)[1] for r in schema["properties"][field]["oneOf"]]
    return sorted(schema["$defs"][r]["properties"]["kind"]["const"] for r in refs)


def test_schema_lists_exactly_the_registered_kinds():
    assert expected_tags("estimator") == ESTIMATORS.kinds() == schema_kinds("estimator")
    assert expected_tags("target") == TARGETS.kinds() == schema_kinds("target")
    # every registered part's settings class carries its own kind
    for registry in (ESTIMATORS, TARGETS):
        for part in registry:
            assert part.Config.model_fields["kind"].annotation.__args__ == (part.kind,)


# ---------------------------------------------------------------------------- fields of another kind
@pytest.mark.parametrize("override, field, kind", [
    ("terms.0.estimator.temperature=0.1", "terms.0.estimator.temperature", "gaussian"),
    ("terms.0.target_encoder.tower=scratch", "terms.0.target_encoder.tower", "ema"),
    ("terms.0.target.bins=9", "terms.0.target.bins", "view"),
    ("terms.0.decoder.queries=masked", "terms.0.decoder.queries", "global"),
])
def test_a_field_of_another_kind_is_an_error(override, field, kind):
    with pytest.raises(ConfigError) as e:
        load_recipe("byol", overrides=[override])
    assert f"{field}: unknown key (not a setting of kind {kind!r})" in str(e.value)


# ---------------------------------------------------------------------------- Gaussian against the online encoder
ONLINE = SMALL + ["terms.0.target_encoder={kind: online}"]


def test_gaussian_against_the_online_encoder_needs_a_stop_gradient():
    with pytest.raises(ConfigError) as e:
        load_recipe("byol", overrides=ONLINE)
    assert "terms.0.target_encoder.stop_gradient:" in str(e.value)
    recipe = load_recipe("byol", overrides=ONLINE + ["terms.0.target_encoder.stop_gradient=true"])
    assert recipe.terms[0].target_encoder.stop_gradient


def test_stop_gradient_target_carries_no_gradient():
    recipe = load_recipe("byol", overrides=ONLINE + ["terms.0.target_encoder.stop_gradient=true"])
    torch.manual_seed(0)
    obj = Objective(recipe, num_classes=10).train()
    assert obj.teacher is None
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8),
             "label": torch.randint(0, 10, (8,), generator=g), "caption": [None] * 8}
    torch.manual_seed(1)
    views = obj.make_views(batch["image"])
    out = obj(batch, views)
    params = [p for p in obj.parameters() if p.requires_grad]
    got = torch.autograd.grad(out["loss"], params, allow_unused=True)

    term = obj.terms[0]

    def reference(detach: bool) -> torch.Tensor:
        """BYOL's form both ways: ‖p/‖p‖ − z/‖z‖‖² summed over features (reduce: sum), mean over
        images; p the prediction of one view, z the online projection of the other."""
        pooled = [obj.backbone.forward_features(v).pooled for v in views.images]
        p = [term.predictor(term.decoder(x)) for x in pooled]
        z = [term.decoder(x) for x in pooled]
        z = [t.detach() for t in z] if detach else z
        return sum((F.normalize(p[s], dim=-1) - F.normalize(z[t], dim=-1)).pow(2).sum(-1).mean()
                   for s, t in ((0, 1), (1, 0)))

    ref = reference(detach=True)
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-6)
    want = torch.autograd.grad(ref, params, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the gradient through the target would have been different: the stop-gradient is what makes them agree
    through = torch.autograd.grad(reference(detach=False), params, allow_unused=True)
    backbone = {id(p) for p in obj.backbone.parameters()}
    assert any(a is not None and b is not None and not torch.allclose(a, b, rtol=1e-3, atol=1e-6)
               for p, a, b in zip(params, got, through) if id(p) in backbone)


# ---------------------------------------------------------------------------- the mixed input's mask ratio
def test_mix_input_takes_only_the_half_mask():
    with pytest.raises(ConfigError) as e:
        load_recipe("m3i", overrides=["views.mask.ratio=0.6"])
    assert "views.mask.ratio:" in str(e.value)
    with pytest.raises(ConfigError, match=r"views\.mask\.ratio"):
        load_recipe("byol", overrides=["views.input_mode=mix", "views.mask.ratio=0.6"])
    recipe = load_recipe("m3i")
    assert recipe.views.input_mode == "mix" and recipe.views.mask.ratio == 0.5
    assert load_recipe("m3i", overrides=["views.mask.ratio=0.5"]).views.mask.ratio == 0.5
    # a ratio for another input mode is the user's to choose
    assert load_recipe("m3i", overrides=["views.input_mode=fill", "views.mask.ratio=0.6"]).views.mask.ratio == 0.6
