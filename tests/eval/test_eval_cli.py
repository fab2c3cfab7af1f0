import json

import pytest

from conftest import needs_data
from m3i.cli import main
from m3i.config import load_recipe
from m3i.train.loop import pretrain

pytestmark = [needs_data, pytest.mark.slow]
TINY = ["backbone.name=vit_nano", "backbone.depth=2", "data.batch_size=8", "data.num_workers=0", "train.steps=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    pretrain(load_recipe("mae", overrides=TINY), root / "mae", progress=False)
    pretrain(load_recipe("clip", overrides=TINY + ["terms.0.target_encoder.tower=scratch"]), root / "clip",
             progress=False)
    return root


@pytest.mark.parametrize("task, dataset, keys", [
    ("knn", "emoji:category", {"top1", "top5"}),
    ("linear", "fashion-mnist", {"top1", "top5", "weight_decay"}),
])
def test_eval_writes_the_documented_json(runs, tmp_path, task, dataset, keys):
    out = tmp_path / "r.json"
    args = ["eval", "--checkpoint", str(runs / "mae"), "--task", task, "--dataset", dataset, "--json", str(out),
            "--no-progress"]
    if dataset == "fashion-mnist":
        args += ["--limit", "400"]
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert r["task"] == task and r["dataset"] == dataset and set(r["metrics"]) == keys
    assert r["n_test"] > 0 and r["n_train"] > r["n_test"]
    assert 0.0 <= r["metrics"]["top1"] <= 1.0


def test_text_tasks(runs, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(runs / "clip"), "--task", "retrieval", "--dataset", "emoji:category",
                 "--json", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert set(r["metrics"]) == {"i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"}
    assert main(["eval", "--checkpoint", str(runs / "clip"), "--task", "zeroshot", "--dataset", "emoji:category",
                 "--no-progress"]) == 0


def test_text_task_without_text_tower_is_a_clear_error(runs, capsys):
    assert main(["eval", "--checkpoint", str(runs / "mae"), "--task", "zeroshot", "--dataset", "emoji:category"]) == 2
    err = capsys.readouterr().err
    assert "no text tower" in err and "Traceback" not in err


def test_folder_dataset_split(runs, tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (20, 20), (200 if c == "a" else 0, i * 10, 0)).save(tmp_path / "imgs" / c / f"{i}.png")
    out = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(runs / "mae"), "--task", "knn", "--dataset",
                 f"folder:{tmp_path / 'imgs'}", "--json", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert r["n_train"] == 16 and r["n_test"] == 4


def test_pixels_baseline_is_the_standardised_input(tmp_path):
    """``--checkpoint pixels`` scores raw pixels, standardised per pixel on the train part: the
    same k-NN as the metric applied to features built here by hand."""

    from m3i.eval import metrics
    from m3i.eval.run import load_evalset

    out = tmp_path / "p.json"
    assert main(["eval", "--checkpoint", "pixels", "--task", "knn", "--dataset", "fashion-mnist", "--limit", "400",
                 "--json", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    data = load_evalset("fashion-mnist", 32, limit=400, progress=False)
    (tr, tr_y, _), (te, te_y, _) = data.train, data.test
    tr, te = tr.reshape(len(tr), -1).double() / 255, te.reshape(len(te), -1).double() / 255
    mu, sd = tr.mean(0), tr.std(0).clamp_min(1e-3)
    ref = metrics.knn(((tr - mu) / sd).float(), tr_y, ((te - mu) / sd).float(), te_y, 10)
    assert r["checkpoint"] == "pixels" and r["metrics"]["top1"] == pytest.approx(ref["top1"], abs=1 / len(te_y))
    assert r["metrics"]["top1"] > 0.6  # raw Fashion-MNIST pixels are a strong baseline


def test_pixels_have_no_text_embedding(capsys):
    assert main(["eval", "--checkpoint", "pixels", "--task", "retrieval", "--dataset", "emoji:category"]) == 2
    assert "raw pixels have no text embedding" in capsys.readouterr().err


def test_val_split_never_scores_test(runs, tmp_path):
    out = tmp_path / "v.json"
    assert main(["eval", "--checkpoint", str(runs / "mae"), "--task", "knn", "--dataset", "emoji:category",
                 "--split", "val", "--json", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    from m3i.data import Emoji

    assert r["split"] == "val" and r["n_test"] == len(Emoji(split="val")) and r["n_train"] == len(Emoji(split="fit"))


def test_quality_line_sets_the_backbone_beside_raw_pixels(runs):
    import re

    from m3i.eval.run import quality_line

    line = quality_line(runs / "mae", limit=400, device="cpu")
    ours, pixels = (float(x) for x in re.findall(r"top-1 (\d\.\d+), raw pixels (\d\.\d+)", line)[0])
    assert 0 <= ours <= 1 and 0.5 < pixels <= 1  # raw Fashion-MNIST pixels are a strong k-NN baseline
    assert ("not above" in line) == (ours <= pixels) and "m3i eval --checkpoint" in line
