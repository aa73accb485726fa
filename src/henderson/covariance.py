"""Covariance structures of random terms: the one place that knows how a term's
parameters θ_t become its relative covariance factor Λ_t.

A random term with k coefficients per level has covariance ``σ² Λ_t Λ_t'`` (relative
to the residual variance σ²), Λ_t lower triangular. Each structure maps its own
parameters to Λ_t and back, and supplies everything the stages after it need:

* bounds and starting values for the optimisers, and the covariate each parameter's
  scale follows (the optimisers search scaled coordinates, ``optimize.py``);
* ``dΛ_t/dθ_t`` for the analytic gradient (``objective.py``);
* the covariance for known variances (``fixed_variances``) and back;
* the parameters a user reads (``sd``, ``rho``, ``corr``) and their names.

Adding a structure touches this module only. The five here are glmmTMB's (1.1):

=========  ==================================================================  ============
``us``     unstructured, lme4's ``(x | g)``: θ = Λ's lower triangle by columns   k(k+1)/2
``diag``   independent coefficients, one variance each                         k
``cs``     heterogeneous compound symmetry: k SDs, one correlation ρ           k + 1
``ar1``    one SD, corr(i, j) = ρ^|i−j| over the coefficients' order          2
``toep``   k SDs, corr(i, j) = ρ_|i−j| (Toeplitz)                             2k − 1
=========  ==================================================================  ============

For the correlated structures Λ_t = D L_R(φ): D the relative SDs (θ ≥ 0, so a variance
may be exactly 0, as in lme4) and L_R the Cholesky factor of a correlation matrix that
is positive definite for every unconstrained φ: ar1's ρ = φ/√(1+φ²) (glmmTMB's map), cs's
ρ ∈ (−1/(k−1), 1) by a logistic map, toep's lag correlations from partial
autocorrelations κ_j = φ_j/√(1+φ_j²) by the Durbin–Levinson recursion (every κ in
(−1, 1)^(k−1) is a positive definite Toeplitz matrix, and every one is reached).

The level covariance K of a term (identity; a pedigree's A; a GRM) multiplies this on
the levels: ``G_t = σ² K ⊗ Λ_t Λ_t'``; it lives beside the structure on the term
(``RandomTerm.level_precision``), given to the equations as its sparse inverse.
"""
from __future__ import annotations

import functools

import numpy as np

#: structures a formula may name, as glmmTMB spells them
STRUCTURES = ("us", "diag", "cs", "ar1", "toep")


@functools.lru_cache(maxsize=None)
def _lower_order(k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of a k x k lower triangle, column by column (lme4's θ order).

    Made once per k and shared (read-only): building it took ~12 µs, twice per
    evaluation of the objective, a quarter of an evaluation on a small model."""
    rows, cols = np.tril_indices(k)
    order = np.lexsort((rows, cols))
    rows, cols = rows[order], cols[order]
    rows.flags.writeable = False
    cols.flags.writeable = False
    return rows, cols


def _bounded_correlation(phi: float) -> tuple[float, float]:
    """ρ = φ/√(1+φ²) ∈ (−1, 1) and dρ/dφ (glmmTMB's map for ar1)."""
    root = np.sqrt(1.0 + phi * phi)
    return phi / root, 1.0 / root ** 3


def _inverse_bounded_correlation(rho: float) -> float:
    return rho / np.sqrt(1.0 - rho * rho)


def _correlation_factor(R: np.ndarray) -> np.ndarray:
    """The Cholesky factor of a correlation matrix, also where it has become singular to
    rounding (a correlation parameter run off to ±∞: ρ = ±1)."""
    try:
        return np.linalg.cholesky(R)
    except np.linalg.LinAlgError:
        return _semidefinite_cholesky(R)


def cholesky_derivative(lower: np.ndarray, derivative: np.ndarray) -> np.ndarray:
    """dL for L L' = R and a change dR of R: ``dL = L Φ(L⁻¹ dR L⁻ᵀ)``, Φ the lower
    triangle with the diagonal halved. A correlation at the end of its range (ρ = ±1,
    R singular) no longer moves (dR = 0): dL = 0 there."""
    if not np.any(derivative):
        return np.zeros_like(lower)
    try:
        inner = np.linalg.solve(lower, np.linalg.solve(lower, derivative).T).T
    except np.linalg.LinAlgError:
        pseudo = np.linalg.pinv(lower)
        inner = pseudo @ derivative @ pseudo.T
    phi = np.tril(inner)
    phi[np.diag_indices_from(phi)] *= 0.5
    return lower @ phi


class CovarianceStructure:
    """The relative covariance of one random term (``Λ_t Λ_t'``) and its parameters.

    Parameters
    ----------
    k : int
        Coefficients per level (columns of the term's covariates).
    coef_names : list of str
        Their names, for reported parameters.
    """

    name = "?"

    def __init__(self, k: int, coef_names=None):
        self.k = int(k)
        self.coef_names = list(coef_names) if coef_names is not None else \
            [f"v{a}" for a in range(self.k)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k})"

    # -- the parameters -------------------------------------------------------------
    @property
    def n_theta(self) -> int:
        raise NotImplementedError

    def lower_bounds(self) -> np.ndarray:
        """0 for parameters that are standard deviations (or Λ's diagonal), −∞ else."""
        raise NotImplementedError

    def start(self) -> np.ndarray:
        """Where the optimisers start: unit relative SDs, no correlation (lme4's Λ = I)."""
        raise NotImplementedError

    def scale_rows(self) -> np.ndarray:
        """For each parameter, the coefficient whose covariate's size sets its scale
        (the row of Λ it multiplies), or −1 for a scale-free one (a correlation)."""
        raise NotImplementedError

    def boundary_parameters(self) -> list[tuple[int, np.ndarray]]:
        """(index, flips) of each parameter whose bound is 0: at 0, the parameters
        ``flips`` (a column of Λ below its zero diagonal, for ``us``) can change sign
        without changing Σ, which reverses the derivative there."""
        lower = self.lower_bounds()
        return [(int(i), np.zeros(0, dtype=np.int64)) for i in np.flatnonzero(np.isfinite(lower))]

    def names(self) -> list[str]:
        """Names of the parameters θ_t (``sd_<coef>``, ``rho``, ``theta_<a>_<b>``...)."""
        raise NotImplementedError

    # -- θ → Λ ----------------------------------------------------------------------
    def relative_factor(self, theta: np.ndarray) -> np.ndarray:
        """Λ_t (k x k, lower triangular)."""
        raise NotImplementedError

    def factor_jacobian(self, theta: np.ndarray) -> np.ndarray:
        """dΛ_t/dθ_t, shape (n_theta, k, k)."""
        raise NotImplementedError

    def relative_covariance(self, theta: np.ndarray) -> np.ndarray:
        lam = self.relative_factor(theta)
        return lam @ lam.T

    # -- covariance → θ -------------------------------------------------------------
    def theta_from_covariance(self, covariance: np.ndarray) -> np.ndarray:
        """θ_t of a relative covariance (``Σ_t / σ²``) of this structure; a ValueError
        naming the structure when the matrix is not one of its covariances."""
        raise NotImplementedError

    # -- what a user reads ----------------------------------------------------------
    def parameters(self, theta: np.ndarray, sigma: float) -> dict:
        """The structure's own parameters in the data's units: ``sd`` (per coefficient
        or one), and ``rho`` (a number or a list by lag) or ``corr`` (a matrix)."""
        raise NotImplementedError

    def flat_parameters(self, theta: np.ndarray, sigma: float) -> list[tuple[str, str, float]]:
        """(name, kind, value) of each reported parameter, as lme4's ``confint`` lists
        them: kind ``"sd"`` (≥ 0) or ``"cor"`` (a correlation). ``us``: each coefficient's
        SD then its correlations with the later ones (``sd_(Intercept)``,
        ``cor_Days.(Intercept)``); the others: their SDs, then ``rho`` (by lag)."""
        params = self.parameters(theta, sigma)
        sd = np.atleast_1d(params["sd"])
        names = self.coef_names if len(sd) == self.k else [""]
        out = [(f"sd_{n}" if n else "sd", "sd", float(v)) for n, v in zip(names, sd)]
        rho = params.get("rho")
        if rho is not None:
            rhos = np.atleast_1d(rho)
            out += [("rho" if len(rhos) == 1 and self.name != "toep" else f"rho_{j + 1}",
                     "cor", float(r)) for j, r in enumerate(rhos)]
        return out

    def theta_from_flat(self, values, sigma: float) -> np.ndarray | None:
        """θ_t from the values of :meth:`flat_parameters` (None outside the parameter
        space: a negative SD, a correlation of this structure out of range)."""
        values = np.asarray(values, dtype=float)
        n_sd = self.k if len([p for p in self.flat_parameters(self.start(), 1.0)
                              if p[1] == "sd"]) == self.k else 1
        sd = values[:n_sd]
        if np.any(sd < 0) or sigma <= 0:
            return None
        sd = np.full(self.k, sd[0]) if n_sd == 1 else sd
        lag = np.abs(np.subtract.outer(np.arange(self.k), np.arange(self.k)))
        rho = values[n_sd:]
        if self.name == "diag":
            corr = np.eye(self.k)
        elif self.name == "cs":
            corr = np.where(lag == 0, 1.0, rho[0] if len(rho) else 0.0)
        elif self.name == "ar1":
            corr = (rho[0] if len(rho) else 0.0) ** lag
        else:  # toep
            corr = np.concatenate([[1.0], rho])[lag]
        try:
            return self.theta_from_covariance(np.outer(sd, sd) * corr / sigma ** 2)
        except (ValueError, np.linalg.LinAlgError):
            return None

    def _check_covariance(self, covariance) -> np.ndarray:
        covariance = np.atleast_2d(np.asarray(covariance, dtype=float))
        if covariance.shape != (self.k, self.k):
            raise ValueError(f"a {self.name} covariance here is {self.k} x {self.k}, got "
                             f"shape {covariance.shape}")
        return covariance


class Unstructured(CovarianceStructure):
    """lme4's ``(x | g)`` (glmmTMB's ``us``): θ is Λ_t's lower triangle by columns."""

    name = "us"

    @property
    def n_theta(self) -> int:
        return self.k * (self.k + 1) // 2

    def lower_bounds(self) -> np.ndarray:
        rows, cols = _lower_order(self.k)
        return np.where(rows == cols, 0.0, -np.inf)

    def start(self) -> np.ndarray:
        rows, cols = _lower_order(self.k)
        return np.where(rows == cols, 1.0, 0.0)

    def scale_rows(self) -> np.ndarray:
        return _lower_order(self.k)[0]

    def boundary_parameters(self):
        rows, cols = _lower_order(self.k)
        out = []
        for j in range(self.k):
            diagonal = int(np.flatnonzero((rows == j) & (cols == j))[0])
            out.append((diagonal, np.flatnonzero((cols == j) & (rows > j))))
        return out

    def names(self) -> list[str]:
        rows, cols = _lower_order(self.k)
        return [f"theta_{self.coef_names[r]}_{self.coef_names[c]}" if r != c
                else f"theta_{self.coef_names[r]}" for r, c in zip(rows, cols)]

    def relative_factor(self, theta):
        rows, cols = _lower_order(self.k)
        lam = np.zeros((self.k, self.k))
        lam[rows, cols] = theta
        return lam

    def factor_jacobian(self, theta):
        rows, cols = _lower_order(self.k)
        out = np.zeros((len(rows), self.k, self.k))
        out[np.arange(len(rows)), rows, cols] = 1.0
        return out

    def theta_from_covariance(self, covariance):
        covariance = self._check_covariance(covariance)
        eigen = np.linalg.eigvalsh(covariance)
        if eigen.min() > 0:
            lam = np.linalg.cholesky(covariance)
        else:  # semi-definite: a pivot-free Cholesky that keeps zero rows (lme4's Λ)
            lam = _semidefinite_cholesky(covariance)
        rows, cols = _lower_order(self.k)
        return lam[rows, cols]

    def parameters(self, theta, sigma):
        cov = sigma ** 2 * self.relative_covariance(theta)
        sd = np.sqrt(np.diag(cov))
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = cov / np.outer(sd, sd)
        corr[np.diag_indices(self.k)] = 1.0
        return {"sd": sd, "corr": corr}

    def flat_parameters(self, theta, sigma):
        params = self.parameters(theta, sigma)
        out = []
        for a in range(self.k):
            out.append((f"sd_{self.coef_names[a]}", "sd", float(params["sd"][a])))
            for b in range(a + 1, self.k):
                out.append((f"cor_{self.coef_names[b]}.{self.coef_names[a]}", "cor",
                            float(params["corr"][b, a])))
        return out

    def theta_from_flat(self, values, sigma):
        values = np.asarray(values, dtype=float)
        sd, corr, position = np.zeros(self.k), np.eye(self.k), 0
        for a in range(self.k):
            sd[a] = values[position]
            position += 1
            for b in range(a + 1, self.k):
                corr[b, a] = corr[a, b] = values[position]
                position += 1
        if np.any(sd < 0) or sigma <= 0 or np.any(np.abs(corr[np.tril_indices(self.k, -1)]) >= 1):
            return None
        covariance = np.outer(sd, sd) * corr / sigma ** 2
        if np.linalg.eigvalsh(covariance).min() < -1e-12 * max(covariance.max(), 1e-300):
            return None
        try:
            return self.theta_from_covariance(covariance)
        except ValueError:
            return None


def _semidefinite_cholesky(covariance: np.ndarray) -> np.ndarray:
    """A lower-triangular L with L L' = covariance for a positive semi-definite matrix
    (columns of zero pivots left 0)."""
    k = len(covariance)
    lower = np.zeros((k, k))
    for j in range(k):
        pivot = covariance[j, j] - lower[j, :j] @ lower[j, :j]
        if pivot > 1e-14 * max(covariance[j, j], 1e-300):
            lower[j, j] = np.sqrt(pivot)
            lower[j + 1:, j] = (covariance[j + 1:, j] - lower[j + 1:, :j] @ lower[j, :j]) \
                / lower[j, j]
    if not np.allclose(lower @ lower.T, covariance, rtol=1e-8,
                       atol=1e-10 * max(np.abs(covariance).max(), 1e-300)):
        raise ValueError("the covariance is not positive semi-definite")
    return lower


class Diagonal(CovarianceStructure):
    """glmmTMB's ``diag``: each coefficient its own variance, no covariance; a factor's
    levels are coefficients too (lme4's ``(f || g)`` does not split factors)."""

    name = "diag"

    @property
    def n_theta(self) -> int:
        return self.k

    def lower_bounds(self):
        return np.zeros(self.k)

    def start(self):
        return np.ones(self.k)

    def scale_rows(self):
        return np.arange(self.k)

    def names(self):
        return [f"sd_{c}" for c in self.coef_names]

    def relative_factor(self, theta):
        return np.diag(np.asarray(theta, dtype=float))

    def factor_jacobian(self, theta):
        out = np.zeros((self.k, self.k, self.k))
        out[np.arange(self.k), np.arange(self.k), np.arange(self.k)] = 1.0
        return out

    def theta_from_covariance(self, covariance):
        covariance = self._check_covariance(covariance)
        if np.any(covariance[~np.eye(self.k, dtype=bool)] != 0):
            raise ValueError("a diag covariance has no covariances (off-diagonal 0)")
        if np.any(np.diag(covariance) < 0):
            raise ValueError("a variance is negative")
        return np.sqrt(np.diag(covariance))

    def parameters(self, theta, sigma):
        return {"sd": sigma * np.asarray(theta, dtype=float)}


class _Correlated(CovarianceStructure):
    """Λ = D L_R: SDs (``n_sd`` of them, one shared when 1) and a correlation matrix
    R(φ) of ``n_phi`` unconstrained parameters; subclasses give R and dR/dφ."""

    n_sd = 0
    n_phi = 0

    @property
    def n_theta(self) -> int:
        return self.n_sd + self.n_phi

    def lower_bounds(self):
        return np.concatenate([np.zeros(self.n_sd), np.full(self.n_phi, -np.inf)])

    def start(self):
        return np.concatenate([np.ones(self.n_sd), self._phi_start()])

    def _phi_start(self) -> np.ndarray:
        return np.zeros(self.n_phi)

    def scale_rows(self):
        rows = np.arange(self.n_sd) if self.n_sd == self.k else np.zeros(self.n_sd, dtype=int)
        return np.concatenate([rows, np.full(self.n_phi, -1)]).astype(int)

    def _sds(self, theta) -> np.ndarray:
        sd = np.asarray(theta[:self.n_sd], dtype=float)
        return np.full(self.k, sd[0]) if self.n_sd == 1 else sd

    def correlation(self, phi) -> tuple[np.ndarray, np.ndarray]:
        """R (k x k) and dR/dφ (n_phi x k x k)."""
        raise NotImplementedError

    def relative_factor(self, theta):
        R, _ = self.correlation(np.asarray(theta[self.n_sd:], dtype=float))
        return self._sds(theta)[:, None] * _correlation_factor(R)

    def factor_jacobian(self, theta):
        theta = np.asarray(theta, dtype=float)
        R, dR = self.correlation(theta[self.n_sd:])
        L = _correlation_factor(R)
        sd = self._sds(theta)
        out = np.zeros((self.n_theta, self.k, self.k))
        if self.n_sd == 1:
            out[0] = L
        else:
            for a in range(self.k):
                out[a, a, :] = L[a, :]
        for j in range(self.n_phi):
            out[self.n_sd + j] = sd[:, None] * cholesky_derivative(L, dR[j])
        return out

    def _split_covariance(self, covariance):
        covariance = self._check_covariance(covariance)
        sd = np.sqrt(np.maximum(np.diag(covariance), 0.0))
        if np.any(sd == 0):
            raise ValueError(f"a {self.name} covariance with a zero variance has no "
                             "correlation to take; give positive variances")
        return sd, covariance / np.outer(sd, sd)

    def parameters(self, theta, sigma):
        theta = np.asarray(theta, dtype=float)
        sd = sigma * np.asarray(theta[:self.n_sd], dtype=float)
        return {"sd": sd, "rho": self._reported_rho(theta[self.n_sd:])}

    def _reported_rho(self, phi):
        raise NotImplementedError


class CompoundSymmetry(_Correlated):
    """glmmTMB's ``cs``: one SD per coefficient (heterogeneous), one common correlation
    ρ ∈ (−1/(k−1), 1); ρ = lo + (1 − lo)·logistic(φ), lo = −1/(k−1)."""

    name = "cs"

    def __init__(self, k, coef_names=None):
        super().__init__(k, coef_names)
        self.n_sd, self.n_phi = self.k, 1 if self.k > 1 else 0
        self.low = -1.0 / (self.k - 1) if self.k > 1 else -1.0

    def names(self):
        return [f"sd_{c}" for c in self.coef_names] + ["rho"] * self.n_phi

    def _rho(self, phi):
        logistic = 0.5 * (1.0 + np.tanh(0.5 * phi))
        return self.low + (1.0 - self.low) * logistic, (1.0 - self.low) * logistic * (1 - logistic)

    def _phi_start(self):
        return np.array([self._phi_of(0.0)] * self.n_phi)

    def _phi_of(self, rho):
        fraction = (rho - self.low) / (1.0 - self.low)
        return float(np.log(fraction / (1.0 - fraction)))

    def correlation(self, phi):
        if not self.n_phi:
            return np.eye(self.k), np.zeros((0, self.k, self.k))
        rho, drho = self._rho(float(phi[0]))
        off = 1.0 - np.eye(self.k)
        return np.eye(self.k) + rho * off, (drho * off)[None]

    def theta_from_covariance(self, covariance):
        sd, corr = self._split_covariance(covariance)
        off = corr[~np.eye(self.k, dtype=bool)]
        if self.k > 1 and (np.ptp(off) > 1e-8 or not self.low < off[0] < 1):
            raise ValueError("a cs covariance has one correlation in (−1/(k−1), 1) "
                             "between every two coefficients")
        return np.append(sd, [self._phi_of(off[0])] if self.n_phi else [])

    def _reported_rho(self, phi):
        return float(self._rho(float(phi[0]))[0]) if self.n_phi else None


class AutoRegressive(_Correlated):
    """glmmTMB's ``ar1``: one SD, corr(i, j) = ρ^|i−j| over the coefficients' order (the
    levels of the factor, their spacing ignored); ρ = φ/√(1+φ²)."""

    name = "ar1"

    def __init__(self, k, coef_names=None):
        super().__init__(k, coef_names)
        self.n_sd, self.n_phi = 1, 1 if self.k > 1 else 0

    def names(self):
        return ["sd", "rho"][:1 + self.n_phi]

    def correlation(self, phi):
        if not self.n_phi:
            return np.eye(self.k), np.zeros((0, self.k, self.k))
        rho, drho = _bounded_correlation(float(phi[0]))
        lag = np.abs(np.subtract.outer(np.arange(self.k), np.arange(self.k)))
        R = rho ** lag
        with np.errstate(divide="ignore", invalid="ignore"):
            dR = np.where(lag > 0, lag * rho ** np.maximum(lag - 1, 0), 0.0) * drho
        return R, dR[None]

    def relative_factor(self, theta):
        # closed form of chol(ρ^|i−j|): column 0 is ρ^i, column j ≥ 1 is ρ^(i−j)√(1−ρ²)
        rho = _bounded_correlation(float(theta[1]))[0] if self.n_phi else 0.0
        lag = np.subtract.outer(np.arange(self.k), np.arange(self.k))
        L = np.where(lag >= 0, rho ** np.maximum(lag, 0), 0.0)
        L[:, 1:] *= np.sqrt(1.0 - rho * rho)
        return float(theta[0]) * L

    def theta_from_covariance(self, covariance):
        sd, corr = self._split_covariance(covariance)
        rho = corr[1, 0] if self.k > 1 else 0.0
        lag = np.abs(np.subtract.outer(np.arange(self.k), np.arange(self.k)))
        if np.ptp(sd) > 1e-8 * sd.max() or not np.allclose(corr, rho ** lag, atol=1e-8) \
                or not -1 < rho < 1:
            raise ValueError("an ar1 covariance has one variance and correlations ρ^|i−j|")
        return np.array([sd[0], _inverse_bounded_correlation(rho)][:1 + self.n_phi])

    def _reported_rho(self, phi):
        return float(_bounded_correlation(float(phi[0]))[0]) if self.n_phi else None


class Toeplitz(_Correlated):
    """glmmTMB's ``toep``: one SD per coefficient, corr(i, j) = ρ_|i−j|. The lag
    correlations come from partial autocorrelations κ_j = φ_j/√(1+φ_j²) (Durbin–
    Levinson), so R is positive definite for every φ; dR/dφ by complex steps (the
    recursion is analytic: exact to rounding)."""

    name = "toep"

    def __init__(self, k, coef_names=None):
        super().__init__(k, coef_names)
        self.n_sd, self.n_phi = self.k, self.k - 1

    def names(self):
        return [f"sd_{c}" for c in self.coef_names] + [f"rho_{j}" for j in range(1, self.k)]

    @staticmethod
    def lag_correlations(kappa):
        """ρ_1..ρ_m of a stationary process with partial autocorrelations κ_1..κ_m
        (Durbin–Levinson; works with complex κ for complex-step derivatives)."""
        m = len(kappa)
        rho = np.zeros(m, dtype=np.result_type(kappa, float))
        phi = np.zeros(0, dtype=rho.dtype)  # AR coefficients of the current order
        for n in range(m):
            kn = kappa[n]
            rho[n] = (phi @ rho[:n][::-1] if n else 0.0) + kn * (
                1.0 - (phi @ rho[:n] if n else 0.0))
            phi = np.append(phi - kn * phi[::-1], kn)
        return rho

    def _toeplitz(self, rho, diagonal: float = 1.0):
        lag = np.abs(np.subtract.outer(np.arange(self.k), np.arange(self.k)))
        full = np.concatenate([[diagonal], rho])
        return full[lag]

    def _kappa(self, phi):
        phi = np.asarray(phi)
        return phi / np.sqrt(1.0 + phi * phi)

    def correlation(self, phi):
        phi = np.asarray(phi, dtype=float)
        R = self._toeplitz(self.lag_correlations(self._kappa(phi)))
        dR = np.zeros((self.n_phi, self.k, self.k))
        step = 1e-20
        for j in range(self.n_phi):
            shifted = phi.astype(complex)
            shifted[j] += 1j * step
            dR[j] = self._toeplitz(self.lag_correlations(self._kappa(shifted)).imag / step,
                                   diagonal=0.0)
        return R, dR

    def theta_from_covariance(self, covariance):
        sd, corr = self._split_covariance(covariance)
        rho = np.array([np.mean(np.diagonal(corr, -j)) for j in range(1, self.k)])
        if not np.allclose(self._toeplitz(rho), corr, atol=1e-8):
            raise ValueError("a toep covariance has one correlation per lag |i−j|")
        kappa = _partial_autocorrelations(rho)
        if np.any(np.abs(kappa) >= 1):
            raise ValueError("the lag correlations do not make a positive definite matrix")
        return np.concatenate([sd, kappa / np.sqrt(1.0 - kappa * kappa)])

    def _reported_rho(self, phi):
        return self.lag_correlations(self._kappa(np.asarray(phi, dtype=float))).tolist()


def _partial_autocorrelations(rho: np.ndarray) -> np.ndarray:
    """κ_1..κ_m from ρ_1..ρ_m (the inverse of :meth:`Toeplitz.lag_correlations`)."""
    m = len(rho)
    kappa = np.zeros(m)
    phi = np.zeros(0)
    for n in range(m):
        numerator = rho[n] - (phi @ rho[:n][::-1] if n else 0.0)
        denominator = 1.0 - (phi @ rho[:n] if n else 0.0)
        kappa[n] = numerator / denominator
        phi = np.append(phi - kappa[n] * phi[::-1], kappa[n])
    return kappa


_CLASSES = {"us": Unstructured, "diag": Diagonal, "cs": CompoundSymmetry,
            "ar1": AutoRegressive, "toep": Toeplitz}


def structure(name: str, k: int, coef_names=None) -> CovarianceStructure:
    """The structure ``name`` (one of :data:`STRUCTURES`) for k coefficients.

    Examples
    --------
    >>> s = structure("ar1", 3)
    >>> s.n_theta, s.names()
    (2, ['sd', 'rho'])
    >>> import numpy as np
    >>> lam = s.relative_factor(np.array([2.0, 0.0]))   # ρ = 0: 2·I
    >>> np.allclose(lam @ lam.T, 4 * np.eye(3))
    True
    """
    try:
        return _CLASSES[name](k, coef_names)
    except KeyError:
        raise ValueError(f"unknown covariance structure {name!r}; henderson has "
                         f"{', '.join(STRUCTURES)}") from None


class ResidualModel:
    """Heterogeneous residual variances (glmmTMB's ``dispformula``):
    ``log σ²_i = γ₀ + d_i'γ``, d_i the row of the dispersion model matrix without its
    intercept. γ₀ is the profiled ``log σ²`` of the reference (all d = 0), so the
    parameters the optimisers see are γ, the log-ratios, and the residual covariance
    is ``R = σ² W⁻¹`` with ``W_i = w_i exp(−d_i'γ)`` (w the prior weights).

    Parameters
    ----------
    matrix : ndarray (n, m)
        The dispersion model matrix of the rows, with an intercept column first.
    names : list of str
        Its column names (``(Intercept)``, ``SexFemale``, ...).
    formula : str
        The dispersion formula as given (``"~ Sex"``).
    spec : formulaic ModelSpec, optional
    """

    #: at most this many distinct rows of the dispersion model matrix are taken as groups
    #: whose cross-products are combined per evaluation; more (a continuous covariate)
    #: recompute the cross-products from the rows at every evaluation
    MAX_GROUPS = 64

    def __init__(self, matrix: np.ndarray, names: list[str], formula: str, spec=None):
        matrix = np.asarray(matrix, dtype=float)
        if matrix.ndim != 2 or not len(names) or names[0] != "(Intercept)":
            raise ValueError(f"dispformula {formula!r} needs an intercept: the reference "
                             "residual variance, of which the others are multiples")
        self.matrix = matrix[:, 1:]
        self.names = list(names)
        self.formula = formula
        self.spec = spec
        patterns, self.group_codes = np.unique(self.matrix, axis=0, return_inverse=True)
        self.group_codes = self.group_codes.ravel()
        self.patterns = patterns if len(patterns) <= self.MAX_GROUPS else None
        #: a label per group (the dispersion variables' values), set by the design
        self.labels: list[str] | None = None

    @property
    def n_params(self) -> int:
        return self.matrix.shape[1]

    def parameter_names(self) -> list[str]:
        return [f"dispersion_{name}" for name in self.names[1:]]

    def start(self) -> np.ndarray:
        return np.zeros(self.n_params)

    def lower_bounds(self) -> np.ndarray:
        return np.full(self.n_params, -np.inf)

    def log_ratios(self, gamma: np.ndarray) -> np.ndarray:
        """``d_i'γ`` of every row (log σ²_i − log σ²)."""
        return self.matrix @ np.asarray(gamma, dtype=float)

    def weights(self, prior: np.ndarray, gamma: np.ndarray) -> np.ndarray:
        """``W_i = w_i exp(−d_i'γ)``."""
        return np.asarray(prior, dtype=float) * np.exp(-self.log_ratios(gamma))

    def coefficients(self, gamma: np.ndarray, sigma: float) -> np.ndarray:
        """glmmTMB's dispersion coefficients: of ``log σ²``, intercept first."""
        return np.concatenate([[2.0 * np.log(sigma)], np.asarray(gamma, dtype=float)])
