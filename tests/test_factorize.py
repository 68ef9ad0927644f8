"""The sparse embedding factorization and Semi-NMF on synthetic matrices."""

from __future__ import annotations

import math

import pytest
import torch

from ember.factorize import keep_top_per_column, ridge_solve, semi_nmf, sparse_factorize


def planted(d: int = 32, n: int = 400, k: int = 6, m: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A = F G^T with k well-separated directions and exactly m tokens per column, disjoint supports."""
    g = torch.Generator().manual_seed(seed)
    F = torch.linalg.qr(torch.randn(d, k, generator=g))[0] * 3
    G = torch.zeros(n, k)
    perm = torch.randperm(n, generator=g)
    for j in range(k):
        rows = perm[j * m : (j + 1) * m]
        G[rows, j] = torch.rand(m, generator=g) + 0.5
    return F @ G.T, F, G


def test_planted_sparse_factors_are_recovered() -> None:
    A, F, G = planted()
    n = A.shape[1]
    res = sparse_factorize(A, rank=6, sparsity=8 / n, reg=1e-6, max_iter=400, seed=1,
                           stopping="reference", tol=1e-9, patience=50)
    assert res.relative_residual < 1e-3
    # every planted support is exactly one recovered column's support
    true_sets = [set(torch.nonzero(G[:, j]).squeeze(1).tolist()) for j in range(6)]
    found_sets = [set(torch.nonzero(res.G[:, j]).squeeze(1).tolist()) for j in range(6)]
    assert sorted(map(sorted, true_sets)) == sorted(map(sorted, found_sets))
    # and each recovered direction is parallel to the planted one
    for j in range(6):
        i = found_sets.index(true_sets[j])
        cos = torch.nn.functional.cosine_similarity(res.F[:, i], F[:, j], dim=0).abs()
        assert cos > 0.999


def test_every_column_has_exactly_ceil_s_n_nonzeros() -> None:
    A = torch.randn(20, 333, generator=torch.Generator().manual_seed(3))
    for s in (0.01, 0.05, 0.5, 1.0):
        res = sparse_factorize(A, rank=7, sparsity=s, max_iter=30)
        m = max(1, math.ceil(s * 333))
        assert ((res.G != 0).sum(0) == m).all(), s


def test_same_seed_same_factors_and_other_seed_differs() -> None:
    A = torch.randn(16, 200, generator=torch.Generator().manual_seed(4))
    a = sparse_factorize(A, rank=5, sparsity=0.1, max_iter=40, seed=7)
    b = sparse_factorize(A, rank=5, sparsity=0.1, max_iter=40, seed=7)
    c = sparse_factorize(A, rank=5, sparsity=0.1, max_iter=40, seed=8)
    assert torch.equal(a.F, b.F) and torch.equal(a.G, b.G)
    assert not torch.equal(a.G, c.G)


def test_best_iterate_is_kept_and_plateau_stops_early() -> None:
    A = torch.randn(24, 500, generator=torch.Generator().manual_seed(5))
    ref = sparse_factorize(A, rank=8, sparsity=0.02, stopping="reference", patience=200, max_iter=2000)
    fast = sparse_factorize(A, rank=8, sparsity=0.02, stopping="plateau", plateau_patience=20, max_iter=2000)
    assert ref.best_loss == min(ref.loss_curve)
    assert ref.n_iter == ref.best_iter + 1 + 200 or ref.stopped_by == "max_iter"
    assert fast.n_iter < ref.n_iter
    assert fast.best_loss <= ref.best_loss * 1.01


def test_ridge_solve_matches_normal_equations() -> None:
    g = torch.Generator().manual_seed(6)
    X, B = torch.randn(50, 4, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64)
    expected = B @ torch.linalg.inv(X.T @ X + 0.1 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(ridge_solve(X, B, 0.1), expected)


def test_singular_system_retries_with_larger_ridge() -> None:
    A = torch.zeros(10, 50)
    A[0, :5] = 1.0
    res = sparse_factorize(A, rank=4, sparsity=0.02, reg=1e-30, reg_tries=40, max_iter=10)
    assert res.attempts, "a negligible ridge on a rank-deficient system must fail, then be retried"
    assert res.reg_used > 1e-30
    with pytest.raises(RuntimeError, match="ember.factorization.reg"):
        sparse_factorize(A, rank=4, sparsity=0.02, reg=1e-30, reg_tries=1, max_iter=10)


def test_keep_top_per_column_keeps_largest_magnitudes() -> None:
    G = torch.tensor([[1.0, -5.0], [-3.0, 0.5], [2.0, 4.0]])
    out = keep_top_per_column(G, 2)
    assert out.tolist() == [[0.0, -5.0], [-3.0, 0.0], [2.0, 4.0]]


def test_semi_nmf_keeps_g_nonnegative_and_f_sparse() -> None:
    g = torch.Generator().manual_seed(9)
    W = torch.rand(300, 5, generator=g)
    H = torch.randn(200, 5, generator=g)
    A = (H @ W.T)  # 200 x 300, non-negative codes
    res = semi_nmf(A, rank=5, f_sparsity=0.1, max_iter=300)
    assert (res.G >= 0).all()
    assert ((res.F != 0).sum(0) <= 20 + 2).all()  # ceil(0.1*200) kept per column (ties may add)
    assert res.loss_curve[res.best_iter] < res.loss_curve[0]


@pytest.mark.parametrize("bad", [{"sparsity": 0.0}, {"sparsity": 1.5}, {"rank": 0}, {"rank": 999}])
def test_impossible_settings_fail_clearly(bad: dict) -> None:
    from ember.errors import ConfigError

    A = torch.randn(8, 40)
    kw = {"rank": 3, "sparsity": 0.1} | bad
    with pytest.raises(ConfigError, match="ember.factorization"):
        sparse_factorize(A, **kw)


def test_float64_fit_does_not_depend_on_the_thread_count(smollm2) -> None:
    """On real embeddings (SmolLM2 rows 1000-5999, K=400) the float32 fit's top-k supports already differ
    between 1 and 2 BLAS threads after 4 iterations; the float64 default gives the same supports."""
    A = smollm2.model.get_input_embeddings().weight.detach()[1000:6000].T.contiguous()
    before = torch.get_num_threads()
    supports = {}
    try:
        for dtype in (torch.float32, torch.float64):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                res = sparse_factorize(A, rank=400, sparsity=0.01, max_iter=4, dtype=dtype)
                supports[dtype, threads] = res.G != 0
    finally:
        torch.set_num_threads(before)
    assert res.F.dtype == torch.float32  # results are handed on in the model's precision
    # the float64 guarantee holds whatever this BLAS does in float32 (where its supports may or may not differ)
    assert torch.equal(supports[torch.float64, 1], supports[torch.float64, 2])
