"""Sparse matrix factorizations: the EMBER embedding factorization and Semi-NMF for MLP activations.

Embedding track (reference-spec 1.2): ``A ~= F G^T`` with ``A`` (d x n) the effective embedding
rows of the vocabulary subset V' as columns, ``F`` (d x K) dense directions and ``G`` (n x K)
signed token scores with exactly ``ceil(s * n)`` non-zeros per column (winner-take-all by |G|).
Alternating ridge least squares, solved with a Cholesky factorization (never an explicit
inverse), best iterate kept, ridge multiplied by 10 and the fit restarted on a linear-algebra
failure. Two stopping rules: ``reference`` (absolute tolerance 1e-4 on the squared loss, patience
500) and ``plateau`` (relative tolerance, short patience), which stops soon after convergence.

MLP track (reference-spec 1.3): Semi-NMF with sparse signed ``F`` (top 1% per column) and
non-negative ``G`` updated multiplicatively (Ding et al.).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ember.config import resolve_device
from ember.errors import ConfigError


@dataclass
class FactorizationResult:
    F: torch.Tensor  # d x K
    G: torch.Tensor  # n x K
    loss_curve: list[float]
    best_iter: int
    n_iter: int
    best_loss: float
    reg_used: float
    seconds: float
    stopped_by: str  # patience | plateau | max_iter
    relative_residual: float
    attempts: list[str] = field(default_factory=list)


def ridge_solve(X: torch.Tensor, B: torch.Tensor, reg: float) -> torch.Tensor:
    """Return ``B (X^T X + reg I)^-1`` for the normal equations of a ridge fit, by Cholesky solve."""
    k = X.shape[1]
    gram = X.T @ X
    gram.diagonal().add_(reg)
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0 or not torch.isfinite(chol).all():
        raise torch.linalg.LinAlgError(f"ridge system not positive definite (reg={reg}, K={k})")
    return torch.cholesky_solve(B.T, chol).T


def keep_top_per_column(G: torch.Tensor, m: int) -> torch.Tensor:
    """Winner-take-all: keep exactly the ``m`` largest-|G| entries in each column, zero the rest."""
    idx = G.abs().topk(m, dim=0).indices
    out = torch.zeros_like(G)
    return out.scatter_(0, idx, G.gather(0, idx))


def keep_top_fraction_threshold(F: torch.Tensor, pct_keep: float) -> torch.Tensor:
    """Semi-NMF's F sparsity: per column keep entries with |F| >= the k-th largest (ties may keep more)."""
    k = max(1, math.ceil(pct_keep * F.shape[0]))
    if k >= F.shape[0]:
        return F
    thresh = F.abs().topk(k, dim=0).values[-1:]
    return torch.where(F.abs() >= thresh, F, torch.zeros_like(F))


def normalise_columns(F: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's ``fix_hoyer_scale``: unit-L2 columns of G, compensating scale on F."""
    n = G.norm(dim=0).clamp_min(1e-8)
    return F * n, G / n


class _Stopper:
    """Tracks the best iterate and decides when to stop."""

    def __init__(self, rule: str, tol: float, patience: int, rel_tol: float, plateau_patience: int):
        if rule not in ("reference", "plateau"):
            raise ConfigError(f"ember.factorization.stopping={rule!r}: use 'reference' or 'plateau'")
        self.rule, self.tol, self.patience = rule, tol, patience
        self.rel_tol, self.plateau_patience = rel_tol, plateau_patience
        self.best = math.inf
        self.counter = 0

    def improved(self, loss: float) -> bool:
        if self.rule == "reference":
            better = loss < self.best - self.tol
        else:
            better = loss < self.best * (1.0 - self.rel_tol)
        if better:
            self.best = loss
            self.counter = 0
        else:
            self.counter += 1
        return better

    def done(self) -> bool:
        return self.counter >= (self.patience if self.rule == "reference" else self.plateau_patience)


def _init_factors(n: int, d: int, k: int, seed: int, device: torch.device, nonneg_g: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if nonneg_g:
        G = torch.rand(n, k, generator=gen).clamp_min(1e-6)
    else:
        G = torch.randn(n, k, generator=gen)
    F = torch.randn(d, k, generator=gen)
    return F.to(device), G.to(device)



def _fit_once(
    A: torch.Tensor,
    rank: int,
    step: Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    reg: float,
    seed: int,
    stopper: _Stopper,
    max_iter: int,
    nonneg_g: bool,
    progress: bool,
    desc: str,
) -> tuple[torch.Tensor, torch.Tensor, list[float], int, int, str]:
    d, n = A.shape
    F, G = (t.to(A.dtype) for t in _init_factors(n, d, rank, seed, A.device, nonneg_g))
    a_sq = float((A.double() ** 2).sum())
    curve: list[float] = []
    best_F, best_G, best_it = F, G, -1
    stopped_by = "max_iter"
    bar = tqdm(total=max_iter, desc=desc, disable=not progress, leave=False)
    it = 0
    for it in range(max_iter):
        F, G, AtF = step(F, G, reg)
        # ||A - F G^T||^2 = ||A||^2 - 2 <G, A^T F> + <F^T F, G^T G>, without forming the d x n residual;
        # A^T F is the product the G-step already computed with the same F.
        loss = a_sq - 2.0 * float((AtF.double() * G.double()).sum()) + float(
            ((F.T @ F).double() * (G.T @ G).double()).sum())
        if not math.isfinite(loss):
            raise torch.linalg.LinAlgError(f"non-finite loss at iteration {it} (reg={reg})")
        curve.append(loss)
        if stopper.improved(loss):
            best_F, best_G, best_it = F.clone(), G.clone(), it
        bar.update(1)
        if it % 20 == 0:
            bar.set_postfix(loss=f"{loss:.4g}", best=best_it)
        if stopper.done():
            stopped_by = "patience" if stopper.rule == "reference" else "plateau"
            break
    bar.close()
    return best_F, best_G, curve, best_it, it + 1, stopped_by


def _with_ridge_retries(
    A: torch.Tensor, rank: int, make_step: Callable[[], Callable], reg: float, tries: int, seed: int,
    make_stopper: Callable[[], _Stopper], max_iter: int, nonneg_g: bool, progress: bool, desc: str,
) -> FactorizationResult:
    start = time.perf_counter()
    attempts: list[str] = []
    for attempt in range(tries):
        r = reg * (10**attempt)
        try:
            F, G, curve, best_it, n_it, stopped = _fit_once(
                A, rank, make_step(), r, seed, make_stopper(), max_iter, nonneg_g, progress, desc)
        except torch.linalg.LinAlgError as exc:
            attempts.append(f"reg={r:g}: {exc}")
            continue
        best = curve[best_it]
        a_sq = float((A * A).sum())
        return FactorizationResult(
            F=F.cpu().float(), G=G.cpu().float(), loss_curve=curve, best_iter=best_it, n_iter=n_it, best_loss=best,
            reg_used=r, seconds=time.perf_counter() - start, stopped_by=stopped,
            relative_residual=best / a_sq if a_sq else 0.0, attempts=attempts,
        )
    raise RuntimeError(f"factorization failed for every ridge value tried ({attempts}); raise "
                       "ember.factorization.reg or ember.factorization.reg_tries")


def sparse_factorize(
    A: torch.Tensor,
    rank: int,
    sparsity: float = 0.01,
    reg: float = 1e-4,
    reg_tries: int = 4,
    tol: float = 1e-4,
    patience: int = 500,
    max_iter: int = 20000,
    stopping: str = "plateau",
    plateau_rel_tol: float = 1e-4,
    plateau_patience: int = 25,
    seed: int = 42,
    device: str = "auto",
    progress: bool = False,
    dtype: torch.dtype = torch.float64,
) -> FactorizationResult:
    """The EMBER embedding factorization ``A ~= F G^T`` (see the module docstring), computed in ``dtype``."""
    d, n = A.shape
    if not 0 < sparsity <= 1:
        raise ConfigError(f"ember.factorization.sparsity={sparsity}: use a fraction in (0, 1]")
    if rank < 1 or rank > min(d, n):
        raise ConfigError(f"ember.factorization.rank={rank}: must be between 1 and min(d_model={d}, |V'|={n})")
    m = max(1, math.ceil(sparsity * n))
    A = A.to(resolve_device(device), dtype)
    At = A.T.contiguous()

    def make_step() -> Callable:
        def step(F: torch.Tensor, G: torch.Tensor, r: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            F = ridge_solve(G, A @ G, r)  # F = A G (G^T G + rI)^-1
            F, G = normalise_columns(F, G)
            AtF = At @ F
            G = ridge_solve(F, AtF, r)  # G = A^T F (F^T F + rI)^-1
            return F, keep_top_per_column(G, m), AtF
        return step

    return _with_ridge_retries(
        A, rank, make_step, reg, reg_tries, seed,
        lambda: _Stopper(stopping, tol, patience, plateau_rel_tol, plateau_patience),
        max_iter, False, progress, "factorize",
    )


def semi_nmf(
    A: torch.Tensor,
    rank: int,
    f_sparsity: float = 0.01,
    reg: float = 1e-4,
    reg_tries: int = 4,
    tol: float = 1e-4,
    patience: int = 500,
    max_iter: int = 20000,
    stopping: str = "plateau",
    plateau_rel_tol: float = 1e-4,
    plateau_patience: int = 25,
    seed: int = 42,
    device: str = "auto",
    progress: bool = False,
    eps: float = 1e-6,
) -> FactorizationResult:
    """Semi-NMF of MLP activations ``A`` (d_mlp x N): sparse signed F, non-negative G."""
    d, n = A.shape
    if rank < 1 or rank > min(d, n):
        raise ConfigError(f"snmf rank={rank}: must be between 1 and min(d_mlp={d}, N={n})")
    A = A.to(resolve_device(device), torch.float32)
    At = A.T.contiguous()

    def make_step() -> Callable:
        def step(F: torch.Tensor, G: torch.Tensor, r: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            F = ridge_solve(G, A @ G, r)
            F = keep_top_fraction_threshold(F, f_sparsity)
            F, G = normalise_columns(F, G)
            P = At @ F
            Q = F.T @ F
            Pp, Pn = (P.abs() + P) / 2, (P.abs() - P) / 2
            Qp, Qn = (Q.abs() + Q) / 2, (Q.abs() - Q) / 2
            G = G * torch.sqrt((Pp + G @ Qn) / (Pn + G @ Qp + eps))
            return F, G, P
        return step

    return _with_ridge_retries(
        A, rank, make_step, reg, reg_tries, seed,
        lambda: _Stopper(stopping, tol, patience, plateau_rel_tol, plateau_patience),
        max_iter, True, progress, "semi-nmf",
    )
