"""`m3i eval --task captions`: greedy captions are the decoder's most likely token at each step,
the caption likelihood that classifies zero-shot is the training loss of that caption, and the
command prints captions and both zero-shot scores for a 2-step `coca` run."""
from __future__ import annotations

import json

import pytest
import torch

from m3i.cli import main
from m3i.config import load_recipe
from m3i.eval.captions import captioning_term, generate, generate_ids, log_likelihoods
from m3i.objective import Objective
from conftest import needs_data

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["terms.0.target_encoder.tower=scratch", "terms.0.target_encoder.width=16", "terms.0.target_encoder.depth=1",
         "terms.0.target_encoder.heads=2", "terms.0.target_encoder.trainable=true", "terms.1.decoder.width=32",
         "terms.1.decoder.heads=2", "terms.1.decoder.depth=1", "terms.1.decoder.max_length=8"]


@pytest.fixture(scope="module")
def coca():
    torch.manual_seed(0)
    obj = Objective(load_recipe("coca", overrides=SMALL)).eval()
    with torch.no_grad():  # a decoder that prefers a few words, so that captions end before the last position
        head = obj.terms[1].decoder.head
        head.weight.normal_(std=0.1)
        head.bias[[102, 4937, 3899, 2417]] += torch.tensor([3.0, 3.1, 3.0, 3.0])  # [SEP] cat dog red
    return obj


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_greedy_captions_take_the_most_likely_token_at_each_step(coca):
    term = captioning_term(coca)
    imgs = images(6, 1)
    ids = generate_ids(coca, term, imgs)
    assert ids.shape[0] == 6 and (ids[:, 0] == 101).all()  # each from [CLS]
    with torch.no_grad():  # the whole caption read at once (teacher forcing): each token the argmax before it
        feats = coca.backbone.forward_features(coca.normalize(imgs))
        context = torch.cat([feats.pooled.unsqueeze(1), feats.tokens], dim=1)
        best = term.decoder.head(term.decoder(ids[:, :-1], context)).argmax(-1)
    for row, chosen in zip(ids.tolist(), best.tolist()):
        n = row.index(102) if 102 in row else len(row) - 1  # up to its [SEP], or every position
        assert row[1:n + 1] == chosen[:n]
        assert all(t == 0 for t in row[n + 1:])  # [PAD] once ended
    assert any(102 in row for row in ids.tolist())
    texts = generate(coca, term, imgs)
    tok = term.target.tokenizer(term.cfg)
    assert texts == [tok.decode(row, skip_special_tokens=True) for row in ids.tolist()] and any(texts)


def test_the_caption_likelihood_is_minus_the_training_loss_times_its_tokens(coca):
    term = captioning_term(coca)
    texts = ["a red cat", "dog", "two small dogs on a mat"]
    imgs = images(2, 2)
    scores = log_likelihoods(coca, term, imgs, texts, batch=4)  # 2 texts a call: the images in 2 calls
    assert scores.shape == (2, 3)
    for i in range(2):
        for j, text in enumerate(texts):
            batch = {"image": imgs[i:i + 1].repeat(2, 1, 1, 1), "label": torch.full((2,), -1), "caption": [text, None]}
            staged = coca.stage(batch, torch.device("cpu"))
            with torch.no_grad():
                emb = term.embed(coca.context(staged, _plain_views(coca, staged)), 0, 0)
                mean_nll = term.score(emb)
            n = int(emb.avail.sum())
            assert float(scores[i, j]) == pytest.approx(-float(mean_nll) * n, rel=1e-4)


def _plain_views(obj, staged):
    """The views of the unaugmented images (what evaluation reads): the normalised images themselves."""
    views = obj.views_of(staged)
    views.images[0] = obj.normalize(staged.images)
    return views


@needs_data
@pytest.mark.slow  # a training run, then evaluation through the command line
def test_the_eval_command_prints_captions_and_both_zero_shot_scores(tmp_path, capsys):
    run = tmp_path / "coca"
    args = ["pretrain", "--recipe", "coca", "--steps", "2", "--out", str(run), "--no-progress", "--device", "cpu",
            "data.batch_size=16", "data.num_workers=0", "train.warmup_steps=1", *SMALL]
    assert main(args) == 0
    capsys.readouterr()
    out_json = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--task", "captions", "--dataset", "emoji:category", "--limit", "40",
                 "--json", str(out_json), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "captions on emoji:category, test split (10 test images)" in text
    assert text.count(" true: ") == 8
    result = json.loads(out_json.read_text())
    assert set(result["metrics"]) == {"caption_top1", "caption_top5", "contrastive_top1", "contrastive_top5"}
    assert all(0 <= v <= 1 for v in result["metrics"].values())
    for key in result["metrics"]:
        assert f"  {key}" in text
    lines = out_json.with_suffix(".captions.txt").read_text().splitlines()
    assert len(lines) == 8 and [ln.split("\t")[1] for ln in lines] == [c["true"] for c in result["captions"]]
    # a recipe without a captioning term is told so in one line
    with pytest.raises(ValueError, match=r"--task captions: this checkpoint's recipe \(coca\)|has no captioning target"):
        captioning_term(Objective(load_recipe("clip", overrides=["terms.0.target_encoder.tower=scratch"])))
