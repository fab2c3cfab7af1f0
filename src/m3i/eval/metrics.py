"""Frozen-feature evaluations the field uses: k-NN, linear probe, zero-shot, retrieval."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def topk_accuracy(scores: Tensor, labels: Tensor, ks=(1, 5)) -> dict[str, float]:
    """scores (N, C), labels (N,) -> {"top1": ..., "top5": ...} for the k that fit C."""
    out = {}
    for k in ks:
        if k <= scores.shape[1]:
            hit = (scores.topk(k, dim=1).indices == labels[:, None]).any(1)
            out[f"top{k}"] = hit.float().mean().item()
    return out


def knn(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, num_classes: int,
        k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> dict[str, float]:
    """Cosine k-NN with votes weighted by exp(similarity / T) (the protocol of DINO / InstDisc)."""
    train_f, test_f = F.normalize(train_f.float(), dim=1), F.normalize(test_f.float(), dim=1)
    k = min(k, train_f.shape[0])
    scores = []
    for i in range(0, test_f.shape[0], chunk):
        sim, idx = (test_f[i:i + chunk] @ train_f.t()).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        scores.append(votes)
    return topk_accuracy(torch.cat(scores), test_y)


def _fit_softmax(x: Tensor, y: Tensor, num_classes: int, weight_decay: float, epochs: int = 50) -> torch.nn.Linear:
    """Multinomial logistic regression by full-batch L-BFGS (convex: the optimum, not a schedule)."""
    head = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(head.weight)  # a convex problem: start from zero, no random draw
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=epochs, history_size=10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def linear_probe(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, num_classes: int,
                 weight_decays=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2), val_fraction: float = 0.1,
                 seed: int = 0) -> dict[str, float]:
    """Linear probe on frozen, standardised features; the weight decay is chosen on a held-out
    part of the train split, then the probe is refit on the whole train split."""
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    tr, te = (train_f - mean) / std, (test_f - mean) / std
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(tr.shape[0], generator=g)
    n_val = max(1, int(val_fraction * tr.shape[0]))
    val, fit = perm[:n_val], perm[n_val:]
    best, best_acc = weight_decays[0], -1.0
    for wd in weight_decays:
        head = _fit_softmax(tr[fit], train_y[fit], num_classes, wd)
        with torch.no_grad():
            acc = (head(tr[val]).argmax(1) == train_y[val]).float().mean().item()
        if acc > best_acc:
            best, best_acc = wd, acc
    head = _fit_softmax(tr, train_y, num_classes, best)
    with torch.no_grad():
        out = topk_accuracy(head(te), test_y)
    out["weight_decay"] = best
    return out


def zeroshot(image_emb: Tensor, class_emb: Tensor, labels: Tensor) -> dict[str, float]:
    """image_emb (N, D), class_emb (C, D) from class-name prompts -> top-1 / top-5."""
    scores = F.normalize(image_emb.float(), dim=1) @ F.normalize(class_emb.float(), dim=1).t()
    return topk_accuracy(scores, labels)


def retrieval(image_emb: Tensor, text_emb: Tensor, ks=(1, 5)) -> dict[str, float]:
    """Paired rows: image i belongs with text i. Image→text and text→image recall@k."""
    sim = F.normalize(image_emb.float(), dim=1) @ F.normalize(text_emb.float(), dim=1).t()
    truth = torch.arange(sim.shape[0])
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.t())):
        for k in ks:
            hit = (s.topk(min(k, s.shape[1]), dim=1).indices == truth[:, None]).any(1)
            out[f"{name}_R@{k}"] = hit.float().mean().item()
    return out
