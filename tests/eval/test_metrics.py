import math

import pytest
import torch
import torch.nn.functional as F

from m3i.eval import metrics


def test_knn_matches_brute_force_weighted_votes():
    g = torch.Generator().manual_seed(0)
    tr, te = torch.randn(200, 16, generator=g), torch.randn(50, 16, generator=g)
    ytr, yte = torch.randint(0, 5, (200,), generator=g), torch.randint(0, 5, (50,), generator=g)
    got = metrics.knn(tr, ytr, te, yte, 5, k=20, temperature=0.07, chunk=7)
    hits1 = hits5 = 0
    for i in range(50):  # the protocol written out: cosine, top-20, exp(sim / T) votes
        sims = [(F.cosine_similarity(te[i], tr[j], dim=0).item(), int(ytr[j])) for j in range(200)]
        sims.sort(reverse=True)
        votes = [0.0] * 5
        for s, c in sims[:20]:
            votes[c] += math.exp(s / 0.07)
        order = sorted(range(5), key=lambda c: -votes[c])
        hits1 += order[0] == int(yte[i])
        hits5 += int(yte[i]) in order[:5]
    assert got["top1"] == pytest.approx(hits1 / 50)
    assert got["top5"] == pytest.approx(hits5 / 50) == 1.0


def test_linear_probe_separates_separable_classes_and_knows_chance():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(4, 32, generator=g) * 3
    y = torch.randint(0, 4, (600,), generator=g)
    x = centers[y] + torch.randn(600, 32, generator=g)
    out = metrics.linear_probe(x[:400], y[:400], x[400:], y[400:], 4)
    assert out["top1"] > 0.97 and out["weight_decay"] in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    noise = metrics.linear_probe(torch.randn(400, 32, generator=g), y[:400], torch.randn(200, 32, generator=g),
                                 y[400:], 4)
    assert noise["top1"] < 0.4  # no signal: near chance (0.25)


def test_retrieval_and_zeroshot_known_answers():
    e = torch.eye(6)
    r = metrics.retrieval(e, e)
    assert all(v == 1.0 for v in r.values())
    swapped = metrics.retrieval(e, e[[1, 0, 2, 3, 4, 5]])
    assert swapped["i2t_R@1"] == pytest.approx(4 / 6) and swapped["t2i_R@1"] == pytest.approx(4 / 6)
    z = metrics.zeroshot(e[:3] * 2, e[:3], torch.tensor([0, 1, 2]))
    assert z == {"top1": 1.0}  # top5 needs at least 5 classes
