"""Stage 4 of the pipeline: the profiled REML / ML objective from the factor of C.

    REML: log|C| + Σ k_t log|K_t| − log|W| + ν (1 + log(2π r²/ν)),  ν = n − p
    ML:   log|C_zz| + Σ k_t log|K_t| − log|W| + n (1 + log(2π r²/n))

with ``r² = y'Wy − sol'·rhs`` the penalised residual sum of squares and
``log|C_zz| = log|C| + log|(C⁻¹)_ββ|``. Both equal lme4's REML criterion / deviance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels
from .linalg import NotPositiveDefiniteError
from .mme import DispersionCrossProducts, MixedModelEquations


@dataclass
class Evaluation:
    """Everything the objective computed at one θ."""

    theta: np.ndarray
    objective: float
    solution: np.ndarray  # [ũ; β̂] in original order
    penalized_rss: float
    logdet_C: float
    logdet_Czz: float
    fixed_inverse: np.ndarray  # (C⁻¹)_ββ


class Objective:
    """θ → −2 log (restricted) likelihood, σ² profiled out.

    The parameters are θ (the random terms' covariance structures) followed, for a
    model with a residual model (``dispformula``), by its log-ratios γ: W(γ) changes
    the cross-products, which are then swapped into the equations (``set_dispersion``).

    Parameters
    ----------
    mme : MixedModelEquations
    reml : bool
    """

    def __init__(self, mme: MixedModelEquations, reml: bool = True):
        self.mme = mme
        self.reml = reml
        design = mme.design
        self.n_obs = design.n_obs
        self.dof = design.n_obs - design.n_fixed if reml else design.n_obs
        self.n_theta = design.n_theta
        self.residual = getattr(design, "residual_model", None)
        self._level_constant = sum(t.n_coefs * t.logdet_level_covariance
                                   for t in design.terms)
        self._dispersion = None
        self.gamma = np.zeros(0)
        if self.residual is not None:
            self._dispersion = DispersionCrossProducts(design, self.residual, mme.xp)
            self.gamma = self.residual.start()
        self.n_evaluations = 0
        self.history: list[tuple[np.ndarray, float]] = []

    @property
    def constant(self) -> float:
        """``Σ k_t log|K_t| − log|W|`` at the current weights."""
        return self._level_constant - self.mme.xp.sum_log_weights

    @property
    def n_parameters(self) -> int:
        return self.n_theta + len(self.gamma)

    def set_dispersion(self, gamma: np.ndarray) -> None:
        """Move the residual model to γ (cross-products of W(γ) into the equations)."""
        gamma = np.asarray(gamma, dtype=np.float64)
        if not np.array_equal(gamma, self.gamma):
            self.mme.set_crossproducts(self._dispersion.at(gamma))
            self.gamma = gamma.copy()

    def _theta(self, params: np.ndarray) -> np.ndarray:
        """θ of a parameter vector, setting γ when the vector carries it."""
        params = np.asarray(params, dtype=np.float64)
        if self._dispersion is not None and len(params) > self.n_theta:
            self.set_dispersion(params[self.n_theta:])
        return params[:self.n_theta]

    def evaluate(self, params: np.ndarray, fixed_inverse: bool = True) -> Evaluation:
        """Factor C(θ) and compute the objective (θ, then γ when there is a residual
        model; θ alone keeps the current γ).

        ``fixed_inverse=False`` skips ``(C⁻¹)_ββ``, which the objective itself never
        needs (ML takes ``log|C_zz|`` from a factor).
        """
        mme = self.mme
        theta = self._theta(params)
        mme.factorize(theta)
        rhs = mme.rhs(theta)
        solution = mme.solve(rhs)
        prss = max(mme.xp.yy - float(solution @ rhs), 0.0)
        logdet_C = mme.logdet()
        logdet_Czz = np.nan if self.reml else mme.logdet_random()
        fixed_inverse = mme.fixed_block_inverse() if fixed_inverse else np.zeros((0, 0))
        if prss <= 0.0:
            value = -np.inf
        else:
            logdet = logdet_C if self.reml else logdet_Czz
            value = (logdet + self.constant
                     + self.dof * (1.0 + np.log(2.0 * np.pi * prss / self.dof)))
        self.n_evaluations += 1
        return Evaluation(np.concatenate([theta, self.gamma]), float(value), solution, prss,
                          logdet_C, logdet_Czz, fixed_inverse)

    def __call__(self, theta: np.ndarray) -> float:
        try:
            value = self.evaluate(theta, fixed_inverse=False).objective
        except np.linalg.LinAlgError:  # C not positive definite, or Λ(θ) undefined there
            value = np.inf
        self.history.append((np.array(theta, dtype=float), value))
        return value

    def at_sigma(self, evaluation: Evaluation, sigma2: float) -> float:
        """The criterion at θ and a given σ² (not profiled): known-variance models."""
        logdet = evaluation.logdet_C if self.reml else self.mme.logdet_random()
        return float(logdet + self.constant + self.dof * np.log(2 * np.pi * sigma2)
                     + evaluation.penalized_rss / sigma2)

    def sigma(self, evaluation: Evaluation) -> float:
        return float(np.sqrt(evaluation.penalized_rss / self.dof))


def scalar_terms(design) -> bool:
    """Every random term has one coefficient and identity level covariance."""
    return all(t.n_coefs == 1 and t.level_precision is None for t in design.terms)


def _scalar_gradient(objective: Objective, theta: np.ndarray) -> tuple[float, np.ndarray]:
    """The gradient when every term has one coefficient and identity K, at θ > 0.

    Then ``Λ̃ = Σ_t θ_t P_t`` and ``∂C/∂θ_t = (P_t (C − J) + (C − J) P_t) / θ_t`` (J the
    identity on the random block), so ``∂ log|C| / ∂θ_t = 2 (q_t − tr (C⁻¹)_tt) / θ_t``:
    only the diagonal of C⁻¹ is needed, not its entries on the whole pattern of C.
    The normal equations ``Λ Z'W r = ũ`` give ``∂r²/∂θ_t = −2 ‖ũ_t‖² / θ_t``.
    """
    mme = objective.mme
    design = mme.design
    evaluation = objective.evaluate(theta, fixed_inverse=False)
    diagonal = mme.inverse_diagonal(random_block_only=not objective.reml)
    offsets = design.column_offsets()
    spherical = evaluation.solution
    gradient = np.empty(len(theta))
    for t, term in enumerate(design.terms):
        block = slice(offsets[t], offsets[t + 1])
        logdet_part = 2.0 * (term.n_levels - float(np.sum(diagonal[block]))) / theta[t]
        rss_part = -2.0 * float(spherical[block] @ spherical[block]) / theta[t]
        gradient[t] = logdet_part + objective.dof * rss_part / evaluation.penalized_rss
    return evaluation.objective, gradient


#: a Λ_t whose diagonal entries are all above this fraction of its largest entry is
#: inverted for the interior gradient (below it the selected-inverse form is exact)
INTERIOR_DIAGONAL = 1e-6


def interior_applies(design, lams: list[np.ndarray]) -> bool:
    """Every term has identity K and an invertible (lower-triangular) Λ_t."""
    for term, lam in zip(design.terms, lams):
        if term.level_precision is not None or np.any(np.triu(lam, 1) != 0):
            return False
        if np.min(np.abs(np.diag(lam))) <= INTERIOR_DIAGONAL * max(np.max(np.abs(lam)), 1e-300):
            return False
    return True


def _interior_gradient(objective: Objective, theta: np.ndarray,
                       lams: list[np.ndarray]) -> tuple[float, np.ndarray]:
    """The gradient inside the parameter space (every Λ_t invertible, K = I).

    ``C Λ̃⁻¹ = Λ̃'M + J Λ̃⁻¹`` turns ``∂ log|C| = 2 tr(C⁻¹ Λ̃'M dΛ̃)`` into
    ``2 tr((I − C⁻¹J) Λ̃⁻¹ dΛ̃)``, and Λ̃⁻¹dΛ̃ is block diagonal by level: only the k x k
    diagonal blocks ``B_l`` of C⁻¹ are needed, not C⁻¹ on the pattern of C. The random
    rows of the normal equations, ``Λ_t'(M[b; β] − m)_l = −ũ_l``, give the residual
    part without a pass over the crossed pairs. With ``U_t = Σ_l ũ_l ũ_l'``:
    ``∂f/∂Λ_t = 2 Λ_t⁻ᵀ (n_t I − Σ_l B_l − ν U_t / r²)`` (ML: blocks of C_zz⁻¹).
    """
    evaluation, gradient = interior_parts(objective, theta, lams)
    return evaluation.objective, gradient


def interior_parts(objective: Objective, theta: np.ndarray,
                   lams: list[np.ndarray]) -> tuple[Evaluation, np.ndarray]:
    """The :class:`Evaluation` at θ and :func:`_interior_gradient`'s gradient."""
    mme = objective.mme
    design = mme.design
    evaluation = objective.evaluate(theta, fixed_inverse=False)
    blocks = mme.inverse_level_blocks(random_block_only=not objective.reml)
    offsets = design.column_offsets()
    scale = objective.dof / evaluation.penalized_rss
    gradient = []
    for t, (term, sl) in enumerate(zip(design.terms, design.theta_slices())):
        k = term.n_coefs
        spherical = evaluation.solution[offsets[t]:offsets[t + 1]].reshape(term.n_levels, k)
        inner = term.n_levels * np.eye(k) - blocks[t].sum(axis=0) - scale * (spherical.T @ spherical)
        by_factor = 2.0 * np.linalg.solve(lams[t].T, inner)              # ∂f/∂Λ_t
        jacobian = term.structure.factor_jacobian(theta[sl])               # ∂Λ_t/∂θ_t
        gradient.append(np.einsum("jab,ab->j", jacobian, by_factor))
    return evaluation, np.concatenate(gradient)


#: pairs of levels (or of level and fixed column) handled at once in the gradient
PAIR_SLICE = 1 << 16


#: step of the central differences in γ (log-ratios of residual variances)
DISPERSION_STEP = 1e-5


def objective_gradient(objective: Objective, params: np.ndarray) -> tuple[float, np.ndarray]:
    """The objective and its gradient in (θ, γ): analytic in θ
    (:func:`covariance_gradient`), central differences in a residual model's γ."""
    params = np.asarray(params, dtype=float)
    theta = objective._theta(params)
    if objective.residual is None:
        return covariance_gradient(objective, theta)
    gamma = objective.gamma.copy()
    dispersion = np.empty(len(gamma))
    for j in range(len(gamma)):
        step = np.zeros(len(gamma))
        step[j] = DISPERSION_STEP
        objective.set_dispersion(gamma + step)
        up = objective.evaluate(theta, fixed_inverse=False).objective
        objective.set_dispersion(gamma - step)
        down = objective.evaluate(theta, fixed_inverse=False).objective
        dispersion[j] = (up - down) / (2 * DISPERSION_STEP)
    objective.set_dispersion(gamma)
    value, gradient = covariance_gradient(objective, theta)
    return value, np.concatenate([gradient, dispersion])


def covariance_gradient(objective: Objective, theta: np.ndarray) -> tuple[float, np.ndarray]:
    """The objective and its analytic gradient in θ (DESIGN.md section 4).

    With ``C = Λ̃'MΛ̃ + P̃`` (``M`` the cross-products, ``Λ̃ = diag(Λ, I)``),
    ``∂ log|C| / ∂Λ_t = 2 tr(C⁻¹ E' M Λ̃)`` needs ``C⁻¹`` only on the pattern of C
    (the selected inverse), and ``∂r²/∂Λ_t = 2 ũ' E' (M[b; β] − m)``; the chain rule
    through each structure's ``∂Λ_t/∂θ_t`` gives the gradient in θ. ML uses
    ``C_zz⁻¹`` and ``log|C_zz|``.
    """
    mme = objective.mme
    design, xp = mme.design, mme.xp
    theta = np.asarray(theta, dtype=float)
    if scalar_terms(design) and np.all(theta > 0):
        return _scalar_gradient(objective, theta)
    lams = mme.relative_factors(theta)
    if interior_applies(design, lams):
        return _interior_gradient(objective, theta, lams)
    evaluation = objective.evaluate(theta, fixed_inverse=False)
    selected = mme.selected_inverse(random_block_only=not objective.reml)
    offsets = design.column_offsets()
    q = design.n_random
    spherical = [evaluation.solution[offsets[t]:offsets[t + 1]].reshape(term.n_levels, term.n_coefs)
                 for t, term in enumerate(design.terms)]
    beta = evaluation.solution[q:]
    blups = [u @ lam.T for u, lam in zip(spherical, lams)]
    # v = M [b; β] on the random-effect rows, and the traces T_t
    v = [np.einsum("lab,lb->la", xp.diagonal[t], blups[t]) for t in range(len(lams))]
    traces = [np.zeros((term.n_coefs, term.n_coefs)) for term in design.terms]
    for t, term in enumerate(design.terms):
        k, nl = term.n_coefs, term.n_levels
        rows, cols = term.level_block_indices(offsets[t])
        inverse = selected.entries(rows.ravel(), cols.ravel()).reshape(nl, k, k)
        traces[t] += np.tensordot(xp.diagonal[t] @ lams[t], inverse, axes=([0, 2], [0, 1]))
    # the pair lists run to millions (a million rows of a crossed design): they are
    # taken in slices so that the index and entry arrays stay small (peak memory)
    for (t, s), (all_pairs, all_blocks) in xp.crossed.items():
        kt, ks = design.terms[t].n_coefs, design.terms[s].n_coefs
        for start in range(0, len(all_pairs), PAIR_SLICE):
            pairs = all_pairs[start:start + PAIR_SLICE]
            blocks = all_blocks[start:start + PAIR_SLICE]
            kernels.add_rows(v[t], pairs[:, 0],
                             np.einsum("pab,pb->pa", blocks, blups[s][pairs[:, 1]]))
            kernels.add_rows(v[s], pairs[:, 1],
                             np.einsum("pab,pa->pb", blocks, blups[t][pairs[:, 0]]))
            rows = offsets[s] + pairs[:, 1][:, None, None] * ks + np.arange(ks)[None, :, None]
            cols = offsets[t] + pairs[:, 0][:, None, None] * kt + np.arange(kt)[None, None, :]
            shape = (len(pairs), ks, kt)
            inverse = selected.entries(np.broadcast_to(rows, shape).ravel(),
                                       np.broadcast_to(cols, shape).ravel()).reshape(shape)
            # Σ_p B_p Λ_s Q_p and Σ_p B_p' Λ_t Q_p': contract over the pairs first (BLAS)
            paired = np.tensordot(blocks, inverse, axes=([0], [0]))  # Σ_p B[a,c] Q[d,b]
            traces[t] += np.einsum("acdb,cd->ab", paired, lams[s])
            traces[s] += np.einsum("cabd,cd->ab", paired, lams[t])
    for t, term in enumerate(design.terms):
        all_pairs, all_blocks = xp.zx[t]
        k = term.n_coefs
        for start in range(0, len(all_pairs), PAIR_SLICE):
            pairs = all_pairs[start:start + PAIR_SLICE]
            blocks = all_blocks[start:start + PAIR_SLICE]
            kernels.add_rows(v[t], pairs[:, 0], blocks[:, :, 0] * beta[pairs[:, 1]][:, None])
            if objective.reml:
                rows = np.broadcast_to((q + pairs[:, 1])[:, None], (len(pairs), k))
                cols = offsets[t] + pairs[:, 0][:, None] * k + np.arange(k)[None, :]
                inverse = selected.entries(rows.ravel(), cols.ravel()).reshape(len(pairs), k)
                traces[t] += np.einsum("pa,pb->ab", blocks[:, :, 0], inverse)
    gradient = []
    prss = evaluation.penalized_rss
    for t, (term, sl) in enumerate(zip(design.terms, design.theta_slices())):
        residual_part = 2.0 * np.einsum("la,lb->ab", v[t] - xp.zy[t], spherical[t])
        by_factor = 2.0 * traces[t] + objective.dof * residual_part / prss  # ∂f/∂Λ_t
        jacobian = term.structure.factor_jacobian(theta[sl])              # ∂Λ_t/∂θ_t
        gradient.append(np.einsum("jab,ab->j", jacobian, by_factor))
    return evaluation.objective, np.concatenate(gradient)
