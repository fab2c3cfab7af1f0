"""Non-finite values injected into the inputs, one term's loss and the gradients: the step is
skipped and counted, the weights stay finite, and faults in a row stop the run naming the last
good checkpoint."""
from __future__ import annotations

import pytest
import torch

from faultkit import error_lines, image_folder, metrics, pretrain_args
from m3i.cli import main
from m3i.objective import Objective, Term
from m3i.runs import checkpoint as ckpt

KINDS = [f"{where}-{value}" for where in ("input", "term-loss", "gradient") for value in ("nan", "inf")]


def inject(monkeypatch, kind: str, bad_calls) -> None:
    """Make the forward passes numbered ``bad_calls`` (from 1) carry the fault ``kind``."""
    where, value = kind.rsplit("-", 1)
    bad = float(value)
    calls = {"n": 0, "hook": None}
    real_forward, real_score = Objective.forward, Term.score

    def forward(self, batch, views=None):
        calls["n"] += 1
        if calls["hook"] is not None:
            calls["hook"].remove()
            calls["hook"] = None
        faulty = calls["n"] in bad_calls
        if faulty and where == "input":  # into the first view the backbone sees
            views = views or self.views_of(batch)
            views.images[0][0, :, :4, :4] = bad
        if faulty and where == "gradient":
            weight = self.backbone.patch_embed.proj.weight
            calls["hook"] = weight.register_hook(lambda g: g + bad if bad == float("inf") else g * bad)
        return real_forward(self, batch, views)

    def term_score(self, emb, *args, **kwargs):  # one term's loss, as the objective's forward scores it
        loss = real_score(self, emb, *args, **kwargs)
        if where == "term-loss" and self.name == "view" and calls["n"] in bad_calls:
            loss = loss + bad
        return loss

    monkeypatch.setattr(Objective, "forward", forward)
    monkeypatch.setattr(Term, "score", term_score)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.slow
def test_a_faulty_step_is_skipped_and_counted(kind, data, tmp_path, monkeypatch, capsys):
    inject(monkeypatch, kind, bad_calls={3, 5})
    run = tmp_path / "run"
    assert main(pretrain_args(run, data, "train.steps=8", "train.ckpt_every=4", "train.max_bad_steps=2")) == 0
    out = capsys.readouterr().out
    assert "step 3: 1 step(s) skipped since step 2" in out and "step 5: 1 step(s) skipped since step 4" in out
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["bad_steps"] for r in rows] == [0, 0, 1, 1, 2, 2, 2, 2]
    finite = [r["loss"] == r["loss"] and abs(r["loss"]) != float("inf") for r in rows]
    if kind.startswith("gradient"):
        assert all(finite)  # the loss was fine, its gradients were not
    else:
        assert finite == [True, True, False, True, False, True, True, True]  # the skipped steps' losses
    weights, state = ckpt.load(run)
    assert state["step"] == 8 and state["bad_steps"] == 2
    for name, v in weights.items():  # batch-norm statistics included
        assert not v.is_floating_point() or torch.isfinite(v).all(), name
    for s in state["optimizer"]["state"].values():
        assert all(torch.isfinite(v).all() for v in s.values())


@pytest.mark.parametrize("kind", ["input-nan", "term-loss-inf", "gradient-nan"])
@pytest.mark.slow
def test_faults_in_a_row_stop_the_run_naming_the_last_good_checkpoint(kind, data, tmp_path, monkeypatch, capsys):
    inject(monkeypatch, kind, bad_calls=range(4, 100))
    run = tmp_path / "run"
    assert main(pretrain_args(run, data, "train.steps=20", "train.ckpt_every=2", "train.max_bad_steps=3")) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("m3i pretrain: error: the loss or its gradients were not finite for 3 steps in a row "
                           "(by step 6); stopping. The last good checkpoint is "
                           f"{run / 'checkpoints' / 'step_000002'}.")
    weights, state = ckpt.load(run)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
