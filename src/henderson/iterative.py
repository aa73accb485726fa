"""BLUP with known variances by preconditioned conjugate gradients (PCG), for ``H⁻¹``
held as an operator (:class:`~henderson.apy.ImplicitSingleStep`).

The mixed-model equations of ``y = Xb + Zu + e``, ``u ~ N(0, σ²_u H)``, ``e ~ N(0,
σ²_e W⁻¹)``, multiplied by ``σ²_e``::

    [X'WX   X'WZ           ] [b]   [X'Wy]
    [Z'WX   Z'WZ + λ H⁻¹   ] [u] = [Z'Wy],     λ = σ²_e / σ²_u,

are solved without a factor of the coefficient matrix (its genotyped block is dense):
each iteration takes one product with it, one ``H⁻¹ x``, and a Jacobi (diagonal)
preconditioner, as BLUPF90's ``blup90iod``. The iterations stop when the residual
``||rhs − C x|| / ||rhs||`` falls below ``tol``.

PEVs cannot come from a selected inverse here; :meth:`IterativeBlup.breeding_values`
gives approximate ones (see its description), whose error against exact PEVs is
measured in ``tests/test_apy.py`` and docs/animal-breeding.md (section 13).
"""
from __future__ import annotations

import numbers
import sys
import time
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.linalg import blas, lapack

from .errors import DataError, FormulaError, SingularFitWarning
from .single_step import _number_in, ainverse_of

#: progress lines on stderr once a solve has run this long, then at this interval
PROGRESS_SECONDS = 10.0
#: below this σ²_e / σ²_u (h² above 0.9999) the equations are nearly singular: at 1e-11
#: PCG met its residual with EBVs tens of units from a direct solve's
NEARLY_SINGULAR_RATIO = 1e-4
#: restarts of CG from its solution when the residual computed from the solution is
#: above tol while the recursion's was below
PCG_RESTARTS = 3
#: columns of P per block of the PEV approximation (4,096 x 10,000 core animals: 328 MB)
PEV_COLUMN_BLOCK = 4096
#: the pedigree model behind the approximate PEVs is fitted to this stand-in response
STAND_IN_RESPONSE = "__henderson_pev_response__"
#: rounds and relative tolerance of the PEV approximation's calibration of δ
CALIBRATION_ROUNDS = 20
CALIBRATION_RTOL = 1e-3


class IterativeBlup:
    """Solutions of the mixed-model equations by PCG (:func:`solve_blup`).

    Attributes
    ----------
    fixed_effects : pandas.Series
        ``b``, by the names of X's columns.
    ebv : pandas.Series
        ``u``, one per animal of the relationship (with or without records).
    iterations : int
    relative_residual : float
        ``||rhs − C x|| / ||rhs||`` at the solution (recomputed, not the recursion's).
    variances : dict
        The variances used: the group's and ``"residual"``.
    timings : dict
        Seconds spent in each stage.
    """

    def __init__(self, fixed_effects, ebv, iterations, relative_residual, variances, group,
                 relationship, request, timings):
        self.fixed_effects = fixed_effects
        self.ebv = ebv
        self.iterations = iterations
        self.relative_residual = relative_residual
        self.variances = variances
        self.group = group
        self.relationship = relationship
        self._request = request
        self.timings = timings
        self._breeding_values = None
        #: the PEV approximation's calibration of δ (after breeding_values()): rounds,
        #: largest remaining relative error, animals left at δ = 0 below their target
        self.calibration = None

    def __repr__(self) -> str:
        return (f"IterativeBlup({len(self.ebv)} animals, {len(self.fixed_effects)} fixed "
                f"effects, {self.iterations} PCG iterations, relative residual "
                f"{self.relative_residual:.2e})")

    def breeding_values(self) -> pd.DataFrame:
        """EBVs with approximate PEVs and reliabilities (computed once).

        Exact PEVs need the inverse of the coefficient matrix, whose genotyped block is
        dense; these are approximations, in the spirit of Misztal et al. (2013):

        * every animal first gets its PEV under the pedigree model (``A`` for ``H``),
          exact, from a selected inverse of the pedigree's sparse equations;
        * the information from the data on the genotyped animals is taken as one
          number per animal, ``δ_i ≥ 0``, calibrated so that the pedigree model's
          PEVs of the genotyped are those of ``σ²_e (λ A22⁻¹ + diag(δ))⁻¹`` (rounds of
          sparse factorisations over the genotyped and their ancestors, reported in
          :attr:`calibration`): what the genotyped learn from each other through A22
          is then not counted in δ;
        * a genotyped animal's PEV is the diagonal of ``σ²_e (λ τ G_APY⁻¹ + λ (1 −
          ω) diag(1 / A_ii) + diag(δ))⁻¹``, exact given that approximation: the
          non-core animals are eliminated (``G_APY⁻¹``'s non-core block is
          diagonal) onto the dense core. With records on genotyped animals only and
          no fixed effect at all (no intercept) δ is exact, and so are these PEVs
          with ``ω = 1``;
        * a non-genotyped animal keeps its pedigree PEV: the information its genotyped
          relatives add is left out.

        Measured against exact PEVs (docs/animal-breeding.md, section 13): for the
        genotyped, 1.5–1.7% on average (at most 7–9% for one animal) when the
        genotypes follow the pedigree, 2.4% (at most 8%) when they are unrelated to
        it, 6.5% (at most 21%) with ``ω = 0``, whose ``A22⁻¹`` term is taken by its
        diagonal; for the others 0.1–0.9% on average, but up to 13–51% for single
        close relatives of genotyped animals, whose genomic information is left out.

        Returns
        -------
        DataFrame
            Index animal; columns trait, ebv, pev, reliability (``1 − PEV / σ²_u``, as
            ``breeding_values()`` of :func:`henderson.lmm` on single-step's H⁻¹, whose
            diagonal is not known), inbreeding, genotyped. A copy: changing it does
            not change the next call's.
        """
        if self._breeding_values is None:
            self._breeding_values = _approximate_breeding_values(self)
        return self._breeding_values.copy()


def solve_blup(formula: str, data: pd.DataFrame, relationships: dict, variances: dict,
               weights=None, missing: str = "raise", tol: float = 1e-10,
               max_iterations: int = 10_000, progress="auto") -> IterativeBlup:
    """BLUP with known variances by PCG, for a relationship held as an operator.

    Parameters
    ----------
    formula : str
        An animal model with one random term, ``"y ~ fixed + (1 | animal)"``.
    data : DataFrame
        The records.
    relationships : dict
        ``{group: H}`` with ``H`` from :func:`henderson.implicit_single_step`.
    variances : dict
        ``{group: σ²_u, "residual": σ²_e}``.
    weights : str or array, optional
        Prior weights, ``Var(e) = σ²_e W⁻¹``.
    missing : {"raise", "drop"}
        What to do with records that have a missing value in a column the model uses.
    tol : float in (0, 1)
        Stop when ``||rhs − C x|| / ||rhs|| < tol``. The residual is computed again
        from the solution; where rounding left it above ``tol``, the iterations restart
        from the solution (at most ``PCG_RESTARTS`` times).
    max_iterations : int
        Iterations in all, restarts included.
    progress : "auto" or bool
        Lines on stderr: "auto" once the solve has run 10 s.

    Returns
    -------
    IterativeBlup

    Raises
    ------
    DataError
        Variances not positive, records of animals not in the relationship, ``tol``
        or ``max_iterations`` out of range, no convergence within
        ``max_iterations``.

    Warns
    -----
    SingularFitWarning
        ``σ²_e / σ²_u < 1e-4`` (h² above 0.9999): the equations are nearly singular and
        the residual no longer bounds the EBVs' error.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> import henderson as hd
    >>> ped = hd.Pedigree(["s", "d", "c1", "c2", "c3", "g"], ["0", "0", "s", "s", "s", "c1"],
    ...                   ["0", "0", "d", "d", "0", "c3"])
    >>> genotypes = pd.DataFrame([[0, 1, 2, 1], [1, 1, 0, 2], [2, 0, 1, 1]],
    ...                          index=["c1", "c2", "g"])
    >>> H = hd.implicit_single_step(ped, genotypes, apy=["c1", "c2"])
    >>> records = pd.DataFrame({"animal": ["c1", "c2", "c3", "g"], "y": [1.0, 2.0, 0.5, 3.0]})
    >>> blup = hd.solve_blup("y ~ 1 + (1 | animal)", records, {"animal": H},
    ...                      {"animal": 1.0, "residual": 2.0})
    >>> blup.relative_residual < 1e-10
    True
    """
    from .apy import ImplicitSingleStep
    from .design import build_design
    from .genomic import RelationshipMatrix

    clock_start = time.perf_counter()
    if not isinstance(relationships, dict) or len(relationships) != 1:
        raise DataError("solve_blup needs relationships={group: H}, one relationship")
    (group, H), = relationships.items()
    if not isinstance(H, ImplicitSingleStep):
        raise DataError(f"solve_blup: relationships[{group!r}] must be an H⁻¹ operator from "
                        f"hd.implicit_single_step, not {type(H).__name__}; fit an explicit "
                        "relationship with hd.lmm")
    tol = _number_in("tol", tol, 0.0, 1.0, lower_open=True, upper_open=True)
    if (isinstance(max_iterations, bool) or not isinstance(max_iterations, numbers.Integral)
            or max_iterations < 1):
        raise DataError(f"max_iterations must be a positive integer, not {max_iterations!r}")
    if progress not in ("auto", True, False):
        raise DataError(f"progress must be 'auto', True or False, not {progress!r}")
    labels = H.labels
    # the design's term spans every animal of H; its precision here is a placeholder
    placeholder = RelationshipMatrix(sp.identity(len(labels), format="csc"), labels,
                                     kind="precision", logdet_covariance=0.0, check=False)
    design = build_design(formula, data, weights=weights, missing=missing,
                          relationships={group: placeholder})
    if len(design.terms) != 1:
        raise FormulaError(f"solve_blup fits one random term (1 | {group}); the formula "
                           f"{formula!r} has {len(design.terms)} random terms")
    if design.terms[0].n_coefs != 1:
        raise FormulaError(f"solve_blup fits one random effect per animal, (1 | {group}); "
                           f"{design.terms[0].label} has {design.terms[0].n_coefs} "
                           f"coefficients ({', '.join(design.terms[0].coef_names)})")
    sigma2_u, sigma2_e = _variances(variances, group)
    timings = {"design": time.perf_counter() - clock_start}
    start = time.perf_counter()
    X = sp.csr_matrix(design.X) if not sp.issparse(design.X) else design.X.tocsr()
    Z = design.Z.tocsr()
    w = design.weights
    y = design.y
    lam = sigma2_e / sigma2_u
    if lam < NEARLY_SINGULAR_RATIO:
        warnings.warn(
            f"solve_blup: σ²_e / σ²_u = {lam:.2g}: with so little weight on H⁻¹ the "
            "equations are nearly singular (the animal effects can absorb the fixed "
            "effects), and a small residual no longer means accurate EBVs",
            SingularFitWarning, stacklevel=2)
    n_fixed = X.shape[1]
    XtW, ZtW = (X.T.multiply(w)).tocsr(), (Z.T.multiply(w)).tocsr()
    rhs = np.concatenate([XtW @ y, ZtW @ y])
    diagonal = np.concatenate([np.asarray(XtW.multiply(X.T).sum(axis=1)).ravel(),
                               np.asarray(ZtW.multiply(Z.T).sum(axis=1)).ravel()
                               + lam * H.diagonal_bound()])
    if not np.all(diagonal > 0):
        bad = int(np.flatnonzero(~(diagonal > 0))[0])
        name = design.fixed_names[bad] if bad < n_fixed else labels[bad - n_fixed]
        raise DataError(f"solve_blup: the equation of {name!r} is empty (no records "
                        "and no relationship)")
    inverse_diagonal = 1.0 / diagonal

    def product(v):
        b, u = v[:n_fixed], v[n_fixed:]
        fitted = X @ b + Z @ u
        return np.concatenate([XtW @ fitted, ZtW @ fitted + lam * H.matvec(u)])

    timings["setup"] = time.perf_counter() - start
    start = time.perf_counter()
    solution, iterations, relative = _pcg(product, rhs, inverse_diagonal, tol,
                                          max_iterations, progress)
    timings["pcg"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - clock_start
    fixed = pd.Series(solution[:n_fixed], index=design.fixed_names, name="estimate")
    ebv = pd.Series(solution[n_fixed:], index=pd.Index(labels, name=group), name="ebv")
    # what the PEVs' pedigree model needs, as it was at this solve
    request = {"formula": formula, "data": data.copy(),
               "weights": weights if weights is None or isinstance(weights, str)
               else np.array(weights, copy=True),
               "missing": missing, "response": design.response_name}
    return IterativeBlup(fixed, ebv, iterations, relative,
                         {group: sigma2_u, "residual": sigma2_e}, group, H, request, timings)


def _variances(variances, group) -> tuple[float, float]:
    if not isinstance(variances, dict) or set(variances) != {group, "residual"}:
        raise DataError(f"variances must be {{{group!r}: σ²_u, 'residual': σ²_e}}, not "
                        f"{variances!r}")
    values = []
    for key in (group, "residual"):
        try:
            value = float(variances[key])
        except (TypeError, ValueError):
            raise DataError(f"variances[{key!r}] must be a number, not "
                            f"{variances[key]!r}") from None
        if not (np.isfinite(value) and value > 0):
            raise DataError(f"variances[{key!r}] must be positive and finite, not {value}")
        values.append(value)
    return values[0], values[1]


def _pcg(product, rhs, inverse_diagonal, tol, max_iterations, progress):
    """Jacobi-preconditioned conjugate gradients from 0: the solution, the iterations
    and ``||rhs − C x|| / ||rhs||`` computed from the solution. Where rounding left that
    above ``tol`` while the recursion's residual was below it, the iterations restart
    from the solution. Raises DataError without convergence."""
    x = np.zeros_like(rhs)
    rhs_norm = float(np.linalg.norm(rhs))
    if rhs_norm == 0.0:
        return x, 0, 0.0
    target = tol * rhs_norm
    iteration = 0
    started = last = time.perf_counter()
    r = rhs.copy()
    for _ in range(PCG_RESTARTS + 1):
        z = inverse_diagonal * r
        d = z.copy()
        rz = float(r @ z)
        norm = float(np.linalg.norm(r))
        while norm >= target and iteration < max_iterations:
            iteration += 1
            q = product(d)
            alpha = rz / float(d @ q)
            x += alpha * d
            r -= alpha * q
            norm = float(np.linalg.norm(r))
            if norm < target:
                break
            z = inverse_diagonal * r
            rz_next = float(r @ z)
            d *= rz_next / rz
            d += z
            rz = rz_next
            now = time.perf_counter()
            if progress is True or (progress == "auto" and now - started > PROGRESS_SECONDS):
                if now - last > (2.0 if progress is True else PROGRESS_SECONDS):
                    print(f"solve_blup: PCG iteration {iteration}, relative residual "
                          f"{norm / rhs_norm:.2e}, {now - started:.0f} s", file=sys.stderr)
                    last = now
        r = rhs - product(x)          # the residual of the solution, not the recursion's
        relative = float(np.linalg.norm(r)) / rhs_norm
        if relative < tol or iteration >= max_iterations:
            break
    if relative >= tol:
        raise DataError(
            f"solve_blup: PCG did not converge in {iteration} iterations (relative "
            f"residual {relative:.2e}, tol {tol:g})"
            + ("" if iteration >= max_iterations else
               f"; {PCG_RESTARTS} restarts from the solution did not get below tol: the "
               "equations are too ill-conditioned at these variances, or tol is below "
               "what float64 can reach"))
    return x, iteration, relative


def _approximate_breeding_values(blup: IterativeBlup) -> pd.DataFrame:
    """See :meth:`IterativeBlup.breeding_values`."""
    from .fit import lmm

    H = blup.relationship
    group = blup.group
    sigma2_u, sigma2_e = blup.variances[group], blup.variances["residual"]
    lam = sigma2_e / sigma2_u
    request = blup._request
    start = time.perf_counter()
    formula, data = request["formula"], request["data"]
    response = request["response"]
    if response in data.columns:
        # PEVs do not depend on y: a stand-in response (missing where y is) keeps the
        # pedigree model off REML's checks of y (a constant y is refused there)
        stand_in = np.random.default_rng(0).normal(size=len(data))
        stand_in[data[response].isna().to_numpy()] = np.nan
        data = data.assign(**{STAND_IN_RESPONSE: stand_in})
        formula = f"{STAND_IN_RESPONSE} ~ {formula.split('~', 1)[1]}"
    pedigree_model = lmm(formula, data, weights=request["weights"],
                         missing=request["missing"], relationships={group: H.pedigree},
                         fixed_variances={group: sigma2_u, "residual": sigma2_e})
    pedigree_pev = pedigree_model.breeding_values(group)["pev"].reindex(H.labels).to_numpy()
    del pedigree_model
    a_diagonal = 1.0 + H.pedigree.inbreeding
    pev = pedigree_pev.copy()
    g = H.genotyped_positions
    blup.timings["pev_pedigree"] = time.perf_counter() - start
    start = time.perf_counter()
    information, blup.calibration = _data_information(H, lam, pedigree_pev[g] / sigma2_e,
                                                      a_diagonal[g])
    blup.timings["pev_calibration"] = time.perf_counter() - start
    start = time.perf_counter()
    extra = lam * (1.0 - H.omega) / a_diagonal[g] + information
    pev[g] = sigma2_e * _apy_posterior_diagonal(H, lam * H.tau, extra)
    blup.timings["pev_genotyped"] = time.perf_counter() - start
    frame = pd.DataFrame({"trait": request["response"], "ebv": blup.ebv.to_numpy(),
                          "pev": pev}, index=blup.ebv.index)
    # as breeding_values() of hd.lmm on hd.single_step's H⁻¹ (H's diagonal is not known)
    frame["reliability"] = np.clip(1.0 - pev / sigma2_u, 0.0, 1.0)
    frame["inbreeding"] = a_diagonal - 1.0
    genotyped = np.zeros(len(frame), dtype=bool)
    genotyped[g] = True
    frame["genotyped"] = genotyped
    return frame


def _data_information(H, lam: float, target: np.ndarray, a_diagonal: np.ndarray,
                      rtol: float = CALIBRATION_RTOL, max_rounds: int = CALIBRATION_ROUNDS):
    """``δ``, one value per genotyped animal, such that the diagonal of
    ``(λ A22⁻¹ + diag(δ))⁻¹`` is ``target`` (their pedigree PEVs / σ²_e): the
    information from the data that does not come through the pedigree relationships
    among the genotyped, which the genomic system then must not count twice.

    ``(λ A22⁻¹ + D)⁻¹`` is the genotyped block of the inverse of the sparse ``λ A⁻¹
    + [[0, 0], [0, D]]`` over the genotyped animals and their ancestors (A22⁻¹ its
    Schur complement), so each round is one sparse factorisation and selected
    inverse; δ is corrected by ``1 / target − 1 / diag`` until the diagonal is within
    ``rtol`` of the target (or ``max_rounds``). Returns δ and a report: rounds, the
    largest remaining relative error, and the animals left at δ = 0 with their PEV
    below target.
    """
    from . import kernels
    from .linalg import cholmod_analyze, cholmod_lower_factor, cholmod_permutation, \
        cholmod_refactor

    (sire, dam, d), genotyped = H.pruned
    n = len(sire)
    base = ainverse_of(sire, dam, d, lower=True)
    base.data *= lam
    on_diagonal = base.indptr[:-1]        # lower triangle, rows sorted: the diagonal first
    base_diagonal = base.data[on_diagonal[genotyped]].copy()
    information = np.maximum(1.0 / target - lam / a_diagonal, 0.0)
    factor = None
    for rounds in range(1, max_rounds + 1):
        base.data[on_diagonal[genotyped]] = base_diagonal + information
        if factor is None:
            factor = cholmod_analyze(base, ordering="amd")
            position = np.empty(n, dtype=np.int64)
            position[cholmod_permutation(factor)] = np.arange(n)
        cholmod_refactor(factor, base)
        lower = cholmod_lower_factor(factor)
        kernels.selected_inverse_in_place(lower.indptr, lower.indices, lower.data)
        diagonal = lower.data[lower.indptr[:-1]][position[genotyped]]
        # an animal at δ = 0 whose PEV is still below its target would need δ < 0 (its
        # pedigree PEV reflects less information than its relatives among the
        # genotyped give it): it stays at 0 and out of the convergence check
        clamped = (information == 0.0) & (diagonal < target)
        error = np.abs(diagonal / target - 1.0)[~clamped]
        largest = float(error.max()) if len(error) else 0.0
        if largest < rtol:
            break
        information = np.maximum(information + 1.0 / target - 1.0 / diagonal, 0.0)
    report = {"rounds": rounds, "largest_relative_error": largest,
              "at_zero_below_target": int(clamped.sum())}
    return information, report


def _apy_posterior_diagonal(H, scale: float, extra: np.ndarray) -> np.ndarray:
    """The diagonal of ``(scale G_APY⁻¹ + diag(extra))⁻¹`` (order of H.genotyped):
    the non-core animals eliminated onto the core, whose Schur complement is dense."""
    P, m = H._projection, H.conditional_variances
    core, other = H.core_slots, H.noncore_slots
    k = scale / m
    e_other = extra[other]
    schur = scale * H.core_inverse()
    schur[np.diag_indices_from(schur)] += extra[core]
    weights = np.sqrt(k * e_other / (k + e_other))
    schur = np.asfortranarray(schur)
    for start in range(0, P.shape[1], PEV_COLUMN_BLOCK):
        stop = min(start + PEV_COLUMN_BLOCK, P.shape[1])
        scaled = np.asfortranarray(P[:, start:stop] * weights[start:stop])
        schur = blas.dsyrk(1.0, scaled, beta=1.0, c=schur, lower=1, overwrite_c=1)
    factor, info = lapack.dpotrf(schur, lower=1, clean=1, overwrite_a=1)
    if info:
        raise DataError(f"the PEV approximation's core system is not positive definite "
                        f"(pivot {info})")
    out = np.empty(len(H.genotyped))
    inverse, info = lapack.dpotri(factor.copy(order="F"), lower=1)
    out[core] = np.diag(inverse)
    del inverse
    norms = np.empty(P.shape[1])
    for start in range(0, P.shape[1], PEV_COLUMN_BLOCK):
        stop = min(start + PEV_COLUMN_BLOCK, P.shape[1])
        solved = blas.dtrsm(1.0, factor, np.asfortranarray(P[:, start:stop]), lower=1)
        norms[start:stop] = np.einsum("ij,ij->j", solved, solved)
    ratio = k / (k + e_other)
    out[other] = 1.0 / (k + e_other) + ratio * ratio * norms
    return out
