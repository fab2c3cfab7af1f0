"""The estimators of I(ẑ; z) ≥ H(z) + E[log p̂(z | ẑ)] against their formulas, and the bound itself.

Every reference below is written from the formula (float64, explicit loops or a different
vectorisation than the library) and compared with the library's pure functions; the last part
draws correlated Gaussians with a known mutual information and checks that the Boltzmann
(InfoNCE) estimate with the optimal critic behaves as the variational bound must.
"""
from __future__ import annotations

import math

import pytest
import torch

from m3i.estimators import boltzmann, gaussian, target_correlation, unigrad


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- references
def ref_boltzmann(pred, cand, positive, temperature, bias=None, exclude=None):
    """mean_i [ log Σ_{j ∉ excl(i)} exp(s_ij) − s_i,pos(i) ],  s_ij = ẑ_i·z_j / τ + b_j.

    A loop over rows with a hand-written log-sum-exp, in float64."""
    pred, cand = pred.double(), cand.double()
    tau = temperature.double() if torch.is_tensor(temperature) else float(temperature)
    losses = []
    for i in range(pred.shape[0]):
        scores = []
        for j in range(cand.shape[0]):
            if exclude is not None and bool(exclude[i, j]):
                continue
            s = (pred[i] * cand[j]).sum() / tau
            if bias is not None:
                s = s + bias[j].double()
            scores.append(s)
        scores = torch.stack(scores)
        top = scores.max().detach()
        lse = top + torch.log(torch.exp(scores - top).sum())
        s_pos = (pred[i] * cand[int(positive[i])]).sum() / tau
        if bias is not None:
            s_pos = s_pos + bias[int(positive[i])].double()
        losses.append(lse - s_pos)
    return torch.stack(losses).mean()


def ref_gaussian(pred, target, normalize, reduce):
    """mean over rows of Σ_d or mean_d (ẑ − z)², rows = every leading index."""
    p = pred.double().reshape(-1, pred.shape[-1])
    t = target.double().reshape(-1, target.shape[-1])
    if normalize:
        p = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
        t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rows = []
    for i in range(p.shape[0]):
        sq = ((p[i] - t[i]) ** 2)
        rows.append(sq.sum() if reduce == "sum" else sq.sum() / p.shape[1])
    return torch.stack(rows).mean()


def ref_unigrad(pred, target, lam, correlation=None):
    """(1/D)·( (1/N)Σ_n ‖p_n − t_n‖² + λ·(1/N)Σ_n p_nᵀ C p_n ),  C = (1/N)Σ_n t_n t_nᵀ by default."""
    p, t = pred.double(), target.double()
    n, d = p.shape
    if correlation is None:
        correlation = torch.einsum("nd,ne->de", t, t) / n
    c = correlation.double()
    pos = torch.einsum("nd,nd->", p - t, p - t) / n
    neg = torch.einsum("nd,de,ne->", p, c, p) / n
    return (pos + lam * neg) / d


def _close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------- Boltzmann
SIZES = [(1, 1, 1), (4, 7, 3), (16, 16, 32), (5, 40, 8)]
TEMPS = [0.05, 0.2, 1.0, 3.0]


@pytest.mark.parametrize("b,m,d", SIZES)
@pytest.mark.parametrize("tau", TEMPS)
def test_boltzmann_matches_formula(b, m, d, tau):
    g = torch.Generator().manual_seed(b * 1000 + m * 10 + d)
    pred = torch.randn(b, d, generator=g)
    cand = torch.randn(m, d, generator=g)
    pos = torch.randint(0, m, (b,), generator=g)
    got = boltzmann(pred, cand, pos, tau)
    assert got.shape == ()
    _close(got, ref_boltzmann(pred, cand, pos, tau))


@pytest.mark.parametrize("b,m,d", SIZES[1:])
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_boltzmann_bias_and_exclude_match_formula(b, m, d, tau):
    g = torch.Generator().manual_seed(7 + b + m + d)
    pred = torch.randn(b, d, generator=g)
    cand = torch.randn(m, d, generator=g)
    pos = torch.randint(0, m, (b,), generator=g)
    bias = torch.randn(m, generator=g)
    exclude = torch.rand(b, m, generator=g) < 0.4
    exclude[torch.arange(b), pos] = False  # the positive always stays a candidate
    _close(boltzmann(pred, cand, pos, tau, bias=bias), ref_boltzmann(pred, cand, pos, tau, bias=bias))
    _close(boltzmann(pred, cand, pos, tau, exclude=exclude), ref_boltzmann(pred, cand, pos, tau, exclude=exclude))
    _close(boltzmann(pred, cand, pos, tau, bias=bias, exclude=exclude),
           ref_boltzmann(pred, cand, pos, tau, bias=bias, exclude=exclude))
    # excluding candidates can only shrink the denominator
    assert boltzmann(pred, cand, pos, tau, exclude=exclude) <= boltzmann(pred, cand, pos, tau) + 1e-6


def test_boltzmann_gradients_match_formula_with_learned_temperature():
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(6, 5, generator=g, requires_grad=True)
    cand = torch.randn(9, 5, generator=g, requires_grad=True)
    bias = torch.randn(9, generator=g, requires_grad=True)
    tau = torch.tensor(0.3, requires_grad=True)
    pos = torch.randint(0, 9, (6,), generator=g)
    exclude = torch.zeros(6, 9, dtype=torch.bool)
    exclude[0, (int(pos[0]) + 1) % 9] = True
    got = boltzmann(pred, cand, pos, tau, bias=bias, exclude=exclude)
    ref = ref_boltzmann(pred, cand, pos, tau, bias=bias, exclude=exclude)
    gg = torch.autograd.grad(got, [pred, cand, bias, tau])
    gr = torch.autograd.grad(ref, [pred, cand, bias, tau])
    for a, b in zip(gg, gr):
        _close(a, b, rtol=1e-4, atol=1e-6)
    assert gg[3].abs() > 0  # the temperature really is learned through the estimator


def test_boltzmann_with_bias_is_a_linear_classifier_cross_entropy():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(12, 16, generator=g)
    w = torch.randn(10, 16, generator=g)
    b = torch.randn(10, generator=g)
    y = torch.randint(0, 10, (12,), generator=g)
    logits = x @ w.T + b
    logp = logits - logits.logsumexp(1, keepdim=True)
    nll = -logp[torch.arange(12), y].mean()
    _close(boltzmann(x, w, y, 1.0, bias=b), nll)


def test_boltzmann_temperature_scales_logits():
    g = torch.Generator().manual_seed(5)
    pred, cand = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
    pos = torch.arange(8)
    # dividing the logits by τ is the same as multiplying the prediction by 1/τ
    _close(boltzmann(pred, cand, pos, 0.25), boltzmann(pred * 4.0, cand, pos, 1.0))
    # a perfectly aligned positive with huge margin costs ~0; uniform logits cost log M
    eye = torch.eye(8)
    assert float(boltzmann(eye, eye, pos, 0.01)) < 1e-6
    _close(boltzmann(torch.zeros(8, 4), cand, pos, 0.5), torch.tensor(math.log(8)))


# ---------------------------------------------------------------------------- Gaussian
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (32, 64), (2, 5, 12)])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_gaussian_matches_formula(shape, normalize, reduce):
    g = torch.Generator().manual_seed(sum(shape) + normalize * 3 + (reduce == "sum"))
    pred = torch.randn(*shape, generator=g)
    target = torch.randn(*shape, generator=g)
    got = gaussian(pred, target, normalize=normalize, reduce=reduce)
    assert got.shape == ()
    _close(got, ref_gaussian(pred, target, normalize, reduce))


def test_gaussian_normalized_sum_is_byol_two_minus_two_cos():
    g = torch.Generator().manual_seed(2)
    p, z = torch.randn(10, 6, generator=g) * 3, torch.randn(10, 6, generator=g) * 0.2
    cos = (p * z).sum(1) / (p.norm(dim=1) * z.norm(dim=1))
    _close(gaussian(p, z, normalize=True, reduce="sum"), (2 - 2 * cos).mean())
    # scale invariance of the normalised form, and zero at identical directions
    _close(gaussian(p * 5, z, normalize=True, reduce="sum"), gaussian(p, z, normalize=True, reduce="sum"))
    assert float(gaussian(p, 2 * p, normalize=True, reduce="sum")) < 1e-6


def test_gaussian_gradient_matches_formula():
    g = torch.Generator().manual_seed(4)
    p = torch.randn(9, 5, generator=g, requires_grad=True)
    t = torch.randn(9, 5, generator=g)
    for normalize in (False, True):
        for reduce in ("mean", "sum"):
            (a,) = torch.autograd.grad(gaussian(p, t, normalize=normalize, reduce=reduce), p)
            (b,) = torch.autograd.grad(ref_gaussian(p, t, normalize, reduce), p)
            _close(a, b, rtol=1e-4)


# ---------------------------------------------------------------------------- UniGrad
@pytest.mark.parametrize("n,d", [(1, 8), (10, 4), (64, 16), (200, 32)])
@pytest.mark.parametrize("lam", [0.0, 0.02, 0.5])
def test_unigrad_with_given_correlation(n, d, lam):
    g = torch.Generator().manual_seed(n + d)
    p, t = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    a = torch.randn(d, d, generator=g)
    corr = a @ a.T / d  # any symmetric PSD matrix, unrelated to t
    _close(unigrad(p, t, lam, corr), ref_unigrad(p, t, lam, corr))


@pytest.mark.parametrize("n,d", [(10, 4), (64, 16)])
def test_unigrad_default_correlation_is_target_second_moment(n, d):
    g = torch.Generator().manual_seed(n * d)
    p, t = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) + 0.5
    c = target_correlation(t)
    outer = sum(torch.outer(t[i].double(), t[i].double()) for i in range(n)) / n
    _close(c, outer)
    _close(unigrad(p, t, 0.02), ref_unigrad(p, t, 0.02))
    _close(unigrad(p, t, 0.02, c), unigrad(p, t, 0.02))
    # λ = 0: plain mean squared error over every element
    _close(unigrad(p, t, 0.0), gaussian(p, t, normalize=False, reduce="mean"))


def test_unigrad_gradient_matches_formula():
    g = torch.Generator().manual_seed(9)
    p = torch.randn(30, 8, generator=g, requires_grad=True)
    t = torch.randn(30, 8, generator=g)
    (a,) = torch.autograd.grad(unigrad(p, t, 0.3), p)
    (b,) = torch.autograd.grad(ref_unigrad(p, t, 0.3), p)
    _close(a, b, rtol=1e-4)
    # by hand: ∂L/∂p_n = (2(p_n − t_n) + 2λ C p_n) / (N·D)
    c = t.T.double() @ t.double() / 30
    hand = (2 * (p.double() - t.double()) + 2 * 0.3 * p.double() @ c) / (30 * 8)
    _close(a, hand, rtol=1e-4)


def test_unigrad_penalty_grows_with_target_correlation():
    # the negative term pushes predictions away from the directions where targets concentrate
    g = torch.Generator().manual_seed(1)
    t = torch.randn(50, 6, generator=g)
    p = t.clone()
    spread = unigrad(p, t, 1.0)
    collapsed_t = t[:, :1].expand(-1, 6).contiguous()
    assert float(unigrad(collapsed_t, collapsed_t, 1.0)) > float(spread)


# ---------------------------------------------------------------------------- the bound
def _gaussians(n, d, rho, g):
    """(x, y) with x ~ N(0, I), y = ρx + √(1−ρ²)ε: I(x; y) = −d/2·log(1 − ρ²)."""
    x = torch.randn(n, d, generator=g)
    y = rho * x + math.sqrt(1 - rho * rho) * torch.randn(n, d, generator=g)
    return x, y


def _true_mi(d, rho):
    return -d / 2 * math.log(1 - rho * rho)


def _optimal_critic_nce(x, y, rho):
    """InfoNCE loss with the true log density ratio log p(y|x)/p(y) as critic.

    log p(y|x)/p(y) = ρ x·y/(1−ρ²) − ρ²‖y‖²/(2(1−ρ²)) + (terms of x only, which cancel in the
    softmax over y): a Boltzmann estimator with τ = (1−ρ²)/ρ and a per-candidate bias."""
    n = x.shape[0]
    bias = -(rho ** 2) * (y * y).sum(1) / (2 * (1 - rho ** 2))
    return boltzmann(x, y, torch.arange(n), (1 - rho ** 2) / rho, bias=bias)


def _pmi(x, y, rho):
    d = x.shape[1]
    return (-((y - rho * x) ** 2).sum(1) / (2 * (1 - rho ** 2)) + (y * y).sum(1) / 2
            - d / 2 * math.log(1 - rho ** 2))


def _estimates(x, y, critic, sizes):
    """Mean of log N − L over the disjoint batches of size N of one pool (common random numbers)."""
    out = {}
    for n in sizes:
        vals = []
        for s in range(0, x.shape[0], n):
            vals.append(math.log(n) - float(critic(x[s:s + n], y[s:s + n])))
        out[n] = sum(vals) / len(vals)
    return out


def test_optimal_critic_matches_pointwise_mutual_information():
    # the critic written as a Boltzmann estimator equals the softmax over the true pmi
    g = torch.Generator().manual_seed(0)
    x, y = _gaussians(32, 3, 0.7, g)
    pmi = torch.stack([_pmi(x[i].expand(32, -1), y, 0.7) for i in range(32)])  # (i, j)
    ref = (pmi.logsumexp(1) - pmi.diagonal()).mean()
    _close(_optimal_critic_nce(x, y, 0.7), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_infonce_bound_below_true_mi_and_rising_with_n(seed):
    d, rho, pool = 2, 0.8, 4096
    mi = _true_mi(d, rho)  # ≈ 1.02 nats
    g = torch.Generator().manual_seed(seed)
    x, y = _gaussians(pool, d, rho, g)
    pmi = _pmi(x, y, rho)
    se = float(pmi.std()) / math.sqrt(pool)  # Monte-Carlo error of any estimate from this pool
    sizes = [8, 64, 512, 4096]
    est = _estimates(x, y, lambda a, b: _optimal_critic_nce(a, b, rho), sizes)
    for n in sizes:
        assert est[n] <= mi + 4 * se, (n, est[n], mi)
    # rises with N (the same pairs at every N, so only the bound's slack changes)
    for small, big in zip(sizes, sizes[1:]):
        assert est[big] > est[small] + 1e-4, est
    # the small-N bound is visibly loose, the large-N one reaches I
    assert est[8] < mi - 0.1
    assert est[4096] > mi - 4 * se - 0.03, (est, mi)


def test_infonce_bound_saturates_at_log_n_when_mi_is_large():
    d, rho = 8, 0.9  # I = −d/2·log(1 − ρ²) ≈ 6.6 nats ≫ log N
    g = torch.Generator().manual_seed(3)
    x, y = _gaussians(1024, d, rho, g)
    est = _estimates(x, y, lambda a, b: _optimal_critic_nce(a, b, rho), [4, 16, 64])
    pmi = _pmi(x, y, rho).double()
    for n, e in est.items():
        # the slack log N − estimate is E log(1 + Σ_{j≠i} exp(pmi_ij − pmi_ii)); the negatives'
        # E exp(pmi_ij) is 1, so by Jensen it is at most E log(1 + (N−1)·exp(−pmi_ii)): a closed
        # form in the positive pairs alone, small when the pmi is far above log N
        jensen = torch.log1p((n - 1) * torch.exp(-pmi))
        bound = float(jensen.mean()) + 3 * float(jensen.std()) / math.sqrt(pmi.numel())
        assert math.log(n) - e <= bound, (n, e, bound)
        assert math.log(n) - e < 0.3, (n, e)  # the cap log N binds, not the critic


def test_fitted_bilinear_critic_is_still_a_lower_bound():
    d, rho = 2, 0.8
    mi = _true_mi(d, rho)
    g = torch.Generator().manual_seed(5)
    w = torch.zeros(d, d, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    for _ in range(200):
        x, y = _gaussians(256, d, rho, g)
        loss = boltzmann(x @ w, y, torch.arange(256), 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # the fitted bilinear critic learns the positive dependence along the diagonal
    w = w.detach()
    assert float(w.diagonal().min()) > 0.3
    assert float(w.diagonal().min()) > 5 * float((w - torch.diag(w.diagonal())).abs().max())
    x, y = _gaussians(4096, d, rho, g)
    se = float(_pmi(x, y, rho).std()) / math.sqrt(4096)
    sizes = [64, 512]
    fitted = _estimates(x, y, lambda a, b: boltzmann(a @ w, b, torch.arange(a.shape[0]), 1.0), sizes)
    optimal = _estimates(x, y, lambda a, b: _optimal_critic_nce(a, b, rho), sizes)
    for n in sizes:
        assert 0.3 < fitted[n] <= mi + 4 * se
        assert fitted[n] <= optimal[n] + 0.02  # no critic beats the true density ratio


# ---------------------------------------------------------------------------- precision
def _estimator_calls():
    """(name, estimator, call(pred, target)) for every estimator and every form it scores."""
    from m3i.estimators import ESTIMATORS

    def make(kind, **kw):
        cls = ESTIMATORS[kind]
        return cls(cls.Config(kind=kind, **kw))

    tau = torch.tensor(0.1)
    avail = torch.arange(12) % 4 != 0
    cand = torch.randn(7, 16, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(12) % 7
    yield "boltzmann classes", lambda p, t: make("boltzmann", candidates="classes").classes(
        p, cand, None, labels, avail, tau)
    for cands, directions in (("batch", 1), ("batch", 2), ("all", 1)):
        est = make("boltzmann", candidates=cands, directions=directions)
        yield f"boltzmann {cands}/{directions}", lambda p, t, est=est: est.paired(p, t, avail, tau)
    for normalize in (False, True):
        est = make("gaussian", normalize=normalize)
        yield f"gaussian paired normalize={normalize}", lambda p, t, est=est: est.paired(p, t, avail, tau)
        yield f"gaussian dense normalize={normalize}", lambda p, t, est=est: est.dense(p, t)
    est = make("unigrad", lam=0.02)
    yield "unigrad", lambda p, t: est.dense(p, t)


def test_every_estimator_computes_in_fp32_under_bf16_autocast():
    """Loss and gradients under bf16 autocast equal the fp32 computation to float32 rounding
    (rtol 1e-5): autocast would otherwise run the logits' and the correlation's matmuls in bf16
    (~1e-2 relative error)."""
    g = torch.Generator().manual_seed(0)
    pred0, target0 = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g)
    for name, call in _estimator_calls():
        results = []
        for autocast in (False, True):
            pred, target = pred0.clone().requires_grad_(), target0.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = call(pred, target)
            loss.backward()
            results.append((loss.detach(), pred.grad, target.grad))
        (l32, gp32, gt32), (l16, gp16, gt16) = results
        assert l16.dtype == torch.float32, name
        torch.testing.assert_close(l16, l32, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n} loss: {m}")
        torch.testing.assert_close(gp16, gp32, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n} pred grad: {m}")
        if gt32 is not None:
            torch.testing.assert_close(gt16, gt32, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n} target grad: {m}")
