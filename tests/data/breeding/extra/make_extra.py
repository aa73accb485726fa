"""Regenerate the JSON reference cases in this folder by an independent dense solve.

    python make_extra.py              # read the CSVs, write the JSONs
    python make_extra.py --write-csv  # first (re)write the CSVs from the values below

Everything is plain NumPy: A by the tabular method, X/Z/R/G built explicitly, Henderson's
mixed model equations solved densely, PEV = diagonal of the random block of C^-1.
No part of the `henderson` package is used.

Data values are transcribed from Mrode & Pocrnic (2023), *Linear Models for the
Prediction of the Genetic Merit of Animals*, 4th ed., as given in the repository
JuliaBnG/Mrode-4ed-examples.jl (chapters 6 and 8); the printed solutions in `PUBLISHED`
are the reference numbers that repository's `check` calls compare against.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
JULIA_REPO = "JuliaBnG/Mrode-4ed-examples.jl"
JULIA_COMMIT = "83a769dca261ac40402bfda028fcf4bbc73d893d"
BLUPF90_REPO = "masuday/Blupf90TutorialStandard"

# --------------------------------------------------------------------------------------
# Case definitions: data (only used by --write-csv), variances, model, published numbers
# --------------------------------------------------------------------------------------

CASES = {
    "mrode_mt_equal": dict(
        title="Mrode & Pocrnic (2023) Example 6.1 (3rd ed. Example 5.1): two-trait animal "
              "model, equal design matrices, no missing records (WWG and PWG of beef calves)",
        source=[
            dict(repo=JULIA_REPO, path="src/chapter-06/ex-1.jl", commit=JULIA_COMMIT,
                 used_for="data, pedigree, G0, R0, printed solutions and PEV"),
            dict(repo=BLUPF90_REPO, path="mrode_c05ex051_mt_equal_design.md",
                 commit="0a74373d64bd2fc82b1e94304efa002e2c068814",
                 used_for="BLUPF90 s.e. of animal 1 (the stored page does not contain the "
                          "solution listing itself)"),
        ],
        kind="multitrait",
        traits=["wwg", "pwg"],
        fixed_factors=["sex"],
        levels={"sex": ["M", "F"]},
        pedigree=dict(animal=list(range(1, 9)),
                      sire=[0, 0, 0, 1, 3, 1, 4, 3],
                      dam=[0, 0, 0, 0, 2, 2, 5, 6]),
        records=dict(animal=[4, 5, 6, 7, 8],
                     sex=["M", "F", "F", "M", "M"],
                     wwg=[4.5, 2.9, 3.9, 3.5, 5.0],
                     pwg=[6.8, 5.0, 6.8, 6.0, 7.5]),
        G0=[[20.0, 18.0], [18.0, 40.0]],
        R0=[[40.0, 11.0], [11.0, 30.0]],
        drop=[],  # cell-means coding per trait is full rank
        fixed_constraint="none needed: sex fitted as one level effect per sex and trait "
                         "(cell means, no intercept), as printed in the book",
    ),
    "mrode_mt_missing": dict(
        title="Mrode & Pocrnic (2023) Example 6.2 (3rd ed. Example 5.2): two-trait animal "
              "model with missing records (calves 4 and 9 have WWG but no PWG), so the "
              "trait design matrices differ and R is block diagonal with R0 restricted to "
              "the observed traits of each record",
        source=[
            dict(repo=JULIA_REPO, path="src/chapter-06/ex-2.jl", commit=JULIA_COMMIT,
                 used_for="data, pedigree, G0, R0, printed solutions"),
            dict(repo=BLUPF90_REPO, path="mrode_c05ex052_mt_missing.md",
                 commit="04fb1a747c19a91b88b6cb0c9cbc48889088456e",
                 used_for="checked: the stored page states BLUPF90 reproduces the book but "
                          "does not list the solutions"),
        ],
        kind="multitrait",
        traits=["wwg", "pwg"],
        fixed_factors=["sex"],
        levels={"sex": ["M", "F"]},
        pedigree=dict(animal=list(range(1, 10)),
                      sire=[0, 0, 0, 1, 3, 1, 4, 3, 7],
                      dam=[0, 0, 0, 0, 2, 2, 5, 6, 0]),
        records=dict(animal=[4, 5, 6, 7, 8, 9],
                     sex=["M", "F", "F", "M", "M", "F"],
                     wwg=[4.5, 2.9, 3.9, 3.5, 5.0, 4.0],
                     pwg=[None, 5.0, 6.8, 6.0, 7.5, None]),
        G0=[[20.0, 18.0], [18.0, 40.0]],
        R0=[[40.0, 11.0], [11.0, 30.0]],
        drop=[],
        fixed_constraint="none needed: sex fitted as one level effect per sex and trait "
                         "(cell means, no intercept), as printed in the book",
    ),
    "mrode_mt_sexlimited": dict(
        title="Mrode & Pocrnic (2023) Example 6.4 (3rd ed. Example 5.4): two traits recorded "
              "on different animals (yearling weight on males 9-12, fat yield on females "
              "13-17), zero residual covariance; no record has both traits",
        source=[
            dict(repo=JULIA_REPO, path="src/chapter-06/ex-4.jl", commit=JULIA_COMMIT,
                 used_for="data, pedigree, G0, R0, printed solutions (with the book's typo "
                          "for animal 6 corrected there, see notes)"),
            dict(repo=BLUPF90_REPO, path="mrode_c05ex054_mt_no_covariance.md",
                 commit="04fb1a747c19a91b88b6cb0c9cbc48889088456e",
                 used_for="listed only; not read for numbers"),
        ],
        kind="multitrait",
        traits=["weight", "fat"],
        fixed_factors=["hys"],
        levels={"hys": ["H1", "H2", "H3"]},
        pedigree=dict(animal=list(range(1, 18)),
                      sire=[0, 0, 0, 1, 0, 0, 0, 0, 1, 2, 1, 3, 1, 3, 2, 2, 3],
                      dam=[0, 0, 0, 0, 0, 0, 0, 0, 4, 5, 6, 0, 7, 8, 0, 13, 15]),
        records=dict(animal=list(range(9, 18)),
                     hys=["H1", "H2", "H2", "H1", "H1", "H2", "H3", "H2", "H3"],
                     weight=[375.0, 250.0, 300.0, 450.0, None, None, None, None, None],
                     fat=[None, None, None, None, 200.0, 160.0, 150.0, 250.0, 175.0]),
        G0=[[43.0, 18.0], [18.0, 30.0]],
        R0=[[77.0, 0.0], [0.0, 70.0]],
        drop=[("weight", "hys", "H3")],  # no weight record in HYS 3: not estimable
        fixed_constraint="cell means per trait; hys H3 for weight has no record and is "
                         "not estimable (reported as null), as in the book where weight "
                         "has only HYS 1 and 2",
    ),
    "mrode_maternal": dict(
        title="Mrode & Pocrnic (2023) Example 8.1 (3rd ed. Example 7.1): animal model for "
              "birth weight with direct and maternal genetic effects (correlated) and "
              "maternal permanent environment",
        source=[
            dict(repo=JULIA_REPO, path="src/chapter-08/ex-1.jl", commit=JULIA_COMMIT,
                 used_for="data (Table 8.1), pedigree, G0, variances, printed solutions"),
            dict(repo=BLUPF90_REPO, path="mrode_c07ex071_maternal.md",
                 commit="0a74373d64bd2fc82b1e94304efa002e2c068814",
                 used_for="checked: the stored page states BLUPF90 reproduces the book but "
                          "does not list the solutions"),
        ],
        kind="maternal",
        y="bw",
        fixed_factors=["herd", "pen"],
        levels={"herd": ["H1", "H2", "H3"], "pen": ["P1", "P2"]},
        pedigree=dict(animal=list(range(1, 15)),
                      sire=[0, 0, 0, 0, 1, 3, 4, 3, 1, 3, 3, 8, 9, 3],
                      dam=[0, 0, 0, 0, 2, 2, 6, 5, 6, 2, 7, 7, 2, 6]),
        records=dict(animal=list(range(5, 15)),
                     herd=["H1", "H1", "H1", "H1", "H2", "H2", "H2", "H3", "H3", "H3"],
                     pen=["P1", "P2", "P2", "P1", "P1", "P2", "P2", "P2", "P1", "P2"],
                     bw=[35.0, 20.0, 25.0, 40.0, 42.0, 22.0, 35.0, 34.0, 20.0, 40.0]),
        G0=[[150.0, -40.0], [-40.0, 90.0]],
        sigma2_pe=40.0,
        sigma2_e=350.0,
        drop=[("bw", "herd", "H1")],  # the book sets herd 1 to zero
        fixed_constraint="herd H1 = 0 (the book's constraint); herd H2, H3 are then "
                         "differences from herd 1 and pen P1, P2 absorb the mean. In "
                         "treatment contrasts (intercept = H1:P1): (Intercept) = pen P1, "
                         "herdH2, herdH3 as given, penP2 = P2 - P1",
    ),
}

# Printed solutions (the numbers in JuliaBnG/Mrode-4ed-examples.jl's `check` calls,
# i.e. the book's tables, 3 decimals unless stated).
PUBLISHED = {
    "mrode_mt_equal": {
        "decimals": 3,
        "fixed": {"wwg": {"M": 4.361, "F": 3.397}, "pwg": {"M": 6.800, "F": 5.880}},
        "random": {"animal": {
            "wwg": [0.151, -0.015, -0.078, -0.010, -0.270, 0.276, -0.316, 0.244],
            "pwg": [0.280, -0.008, -0.170, -0.013, -0.478, 0.517, -0.479, 0.392]}},
        "pev": {"animal": {
            "wwg": [18.606, 19.596, 17.893, 16.506, 16.541, 17.152, 17.115, 16.285],
            "pwg": [35.904, 38.768, 33.799, 29.727, 29.865, 31.504, 31.364, 29.160]}},
        "reliability": {"animal": {
            "wwg": [0.070, 0.020, 0.105, 0.175, 0.173, 0.142, 0.144, 0.186],
            "pwg": [0.102, 0.031, 0.155, 0.257, 0.253, 0.212, 0.216, 0.271]}},
        "blupf90": {
            "note": "Only the s.e. (sqrt of the diagonal of C^-1) of animal 1 is printed in "
                    "the stored tutorial page; the solution listing itself is not stored.",
            "se": {"animal": {"1": {"wwg": 4.313320612, "pwg": 5.991809902}}},
        },
    },
    "mrode_mt_missing": {
        "decimals": 3,
        "fixed": {"wwg": {"M": 4.367, "F": 3.657}, "pwg": {"M": 6.834, "F": 6.007}},
        "random": {"animal": {
            "wwg": [0.130, -0.084, -0.098, 0.007, -0.343, 0.192, -0.308, 0.201, -0.018],
            "pwg": [0.266, -0.075, -0.194, 0.016, -0.555, 0.440, -0.483, 0.349, -0.119]}},
    },
    "mrode_mt_sexlimited": {
        "decimals": 3,
        "fixed_decimals": 2,
        "fixed": {"weight": {"H1": 412.26, "H2": 276.21, "H3": None},
                  "fat": {"H1": 194.03, "H2": 204.77, "H3": 161.66}},
        "random": {"animal": {
            "weight": [-3.365, -1.489, 4.237, -6.940, -5.012, 5.012, 2.137, -4.274,
                       -12.162, -8.263, 5.836, 12.632, 1.523, -4.292, -1.870, 4.290,
                       2.684],
            "fat": [1.258, 3.774, -1.687, -1.572, -2.098, 2.098, 3.561, -7.123, -3.091,
                    -1.260, 3.776, 3.558, 5.971, -11.527, 0.011, 11.995, 1.663]}},
    },
    "mrode_maternal": {
        "decimals": 3,
        "fixed": {"herd": {"H1": 0.0, "H2": 3.386, "H3": 1.434},
                  "pen": {"P1": 34.540, "P2": 27.691}},
        "random": {
            "animal": {"direct": [0.564, -1.244, 1.165, -0.484, 0.630, -0.859, -1.156,
                                  1.917, -0.553, -1.055, 0.385, 0.863, -2.980, 1.751]},
            "dam": {"maternal": [0.262, -1.583, 0.736, 0.586, -0.507, 0.841, 1.299,
                                 -0.158, 0.660, -0.153, 0.916, 0.442, 0.093, 0.362]},
            "pe": {"ids": ["2", "5", "6", "7"], "pe": [-1.701, 0.415, 0.825, 0.461]},
        },
    },
}

NOTES = {
    "mrode_mt_equal": [
        "The book's PEVs (diag of C^-1, 3 decimals) differ from the exact dense ones by up "
        "to 0.0022 (animal 1, pwg: printed 35.904, exact 35.90179), more than rounding; "
        "JuliaBnG/Mrode-4ed-examples.jl also needs atol 3e-3 for them. The BLUPF90 "
        "(FSPAK) s.e. of animal 1 printed to 9 decimals in the BLUPF90 tutorial, "
        "4.313320612 and 5.991809902, squares to 18.604735 and 35.901786 and agrees with "
        "the dense C^-1 to 4e-9, so the dense PEVs are right and the book's last digit is "
        "off (probably inverted from a rounded or iterated coefficient matrix). Compare "
        "PEVs with `dense.pev`, not with the printed ones.",
        "BLUPs and fixed effects agree with the printed values within half a unit of the "
        "third decimal.",
    ],
    "mrode_mt_missing": [
        "BLUPs and fixed effects agree with the printed values within half a unit of the "
        "third decimal. The book prints no PEV for this example.",
    ],
    "mrode_mt_sexlimited": [
        "Animal 4 is printed as (-6.940, -1.572); the exact solution is (-6.93947, "
        "-1.57148), i.e. -6.939 and -1.571 when rounded: 0.00053 and 0.00052 away, just "
        "past half a unit of the third decimal. Every other BLUP (33 of 34) is within "
        "rounding, and the fixed effects (printed to 2 decimals) are too, so this is a "
        "last-digit slip (or a not fully converged iterative solution) in the book, not a "
        "model difference.",
        "The book prints animal 6 as (-5.012, -2.098), a copy of animal 5. Dam 6 has a son "
        "(11) with a high weight record, and the MME solution is (+5.012, +2.098); the "
        "published values stored here are the corrected ones used by "
        "JuliaBnG/Mrode-4ed-examples.jl (src/chapter-06/ex-4.jl).",
        "Every fixed effect applies to every trait in the cbind formula, so `weight` gets a "
        "hys H3 column with no record: that effect is not estimable (fixed value null); "
        "X b-hat on the observed records and the BLUPs are unaffected.",
        "R0 has zero covariance and no record has both traits, so R is diagonal; the "
        "traits are linked only through G0 and the pedigree.",
    ],
    "mrode_maternal": [
        "BLUPs (direct, maternal, pe) and the fixed effects under herd H1 = 0 agree with "
        "the printed values within half a unit of the third decimal. The book prints no "
        "PEV for this example; `dense.pev` gives the diagonal of C^-1 for the direct "
        "(animal), maternal (dam) and pe blocks, and `dense.pev_cov_direct_maternal` the "
        "direct-maternal prediction-error covariance of each animal.",
        "The pe term is a copy of the dam id: one level per dam with recorded progeny "
        "(2, 5, 6, 7), var(pe) = 40 I, unrelated to the pedigree.",
        "The dam term has relationships from the pedigree and is covaried with animal: "
        "var([u; m]) = [[150, -40], [-40, 90]] kron A, so every pedigree animal has both a "
        "direct and a maternal value.",
    ],
}


# --------------------------------------------------------------------------------------
# CSV writing (only with --write-csv)
# --------------------------------------------------------------------------------------

def write_csvs(name, spec):
    ped = pd.DataFrame({k: [str(v) for v in spec["pedigree"][k]]
                        for k in ("animal", "sire", "dam")})
    ped.to_csv(HERE / f"{name}_pedigree.csv", index=False)
    rec = spec["records"]
    out = pd.DataFrame({"animal": [str(a) for a in rec["animal"]]})
    if spec["kind"] == "maternal":
        dam_of = dict(zip(ped["animal"], ped["dam"]))
        out["dam"] = [dam_of[a] for a in out["animal"]]
        out["pe"] = out["dam"]
    for f in spec["fixed_factors"]:
        out[f] = rec[f]
    ys = spec["traits"] if spec["kind"] == "multitrait" else [spec["y"]]
    for t in ys:
        out[t] = [np.nan if v is None else float(v) for v in rec[t]]
    out.to_csv(HERE / f"{name}_data.csv", index=False, na_rep="")


# --------------------------------------------------------------------------------------
# Dense machinery
# --------------------------------------------------------------------------------------

def tabular_A(ids, sire, dam):
    """Numerator relationship matrix by the tabular method (parents before offspring)."""
    pos = {a: i for i, a in enumerate(ids)}
    n = len(ids)
    A = np.zeros((n, n))
    for i in range(n):
        s = pos.get(sire[i], -1)
        d = pos.get(dam[i], -1)
        assert s < i and d < i, "pedigree must list parents before offspring"
        for j in range(i):
            A[i, j] = A[j, i] = 0.5 * ((A[j, s] if s >= 0 else 0.0)
                                        + (A[j, d] if d >= 0 else 0.0))
        A[i, i] = 1.0 + (0.5 * A[s, d] if s >= 0 and d >= 0 else 0.0)
    return A


def read_case(name):
    data = pd.read_csv(HERE / f"{name}_data.csv", dtype=str, keep_default_na=False)
    ped = pd.read_csv(HERE / f"{name}_pedigree.csv", dtype=str, keep_default_na=False)
    return data, ped


def num(col):
    return np.array([np.nan if v == "" else float(v) for v in col])


def gls_check(y, X, Z, Rinv, G, b, u):
    """Second route to the same answer: b = GLS with V = Z G Z' + R, u = G Z' V^-1 (y - Xb)."""
    V = Z @ G @ Z.T + np.linalg.inv(Rinv)
    Vi = np.linalg.inv(V)
    b2 = np.linalg.solve(X.T @ Vi @ X, X.T @ Vi @ y)
    u2 = G @ Z.T @ Vi @ (y - X @ b2)
    assert np.allclose(b, b2, rtol=0, atol=1e-8 * max(1.0, np.abs(b).max()))
    assert np.allclose(u, u2, rtol=0, atol=1e-8 * max(1.0, np.abs(u).max()))


def solve_mme(y, X, Z, Rinv, Ginv):
    """Henderson's MME (X full column rank after the constraint); returns b, u, C^-1."""
    XtR, ZtR = X.T @ Rinv, Z.T @ Rinv
    lhs = np.block([[XtR @ X, XtR @ Z], [ZtR @ X, ZtR @ Z + Ginv]])
    rhs = np.concatenate([XtR @ y, ZtR @ y])
    assert np.linalg.matrix_rank(lhs) == lhs.shape[0], "MME not full rank"
    C = np.linalg.inv(lhs)
    sol = C @ rhs
    p = X.shape[1]
    # residual of the equations, as a sanity check of the solve
    assert np.max(np.abs(lhs @ sol - rhs)) < 1e-9 * max(1.0, np.abs(rhs).max())
    return sol[:p], sol[p:], C[p:, p:]


def fixed_columns(data, spec, trait):
    """Cell-level dummies for every factor (no intercept) minus the constrained ones."""
    cols, names = [], []
    for f in spec["fixed_factors"]:
        for lev in spec["levels"][f]:
            if (trait, f, lev) in [tuple(d) for d in spec["drop"]]:
                continue
            cols.append((data[f].to_numpy() == lev).astype(float))
            names.append((f, lev))
    return np.column_stack(cols), names


def run_multitrait(name, spec, data, ped):
    traits = spec["traits"]
    t = len(traits)
    ids = list(ped["animal"])
    q = len(ids)
    pos = {a: i for i, a in enumerate(ids)}
    A = tabular_A(ids, list(ped["sire"]), list(ped["dam"]))
    G0, R0 = np.array(spec["G0"]), np.array(spec["R0"])
    Y = np.column_stack([num(data[tr]) for tr in traits])
    n = len(data)

    # fixed design per trait: block column layout [trait 1 cols | trait 2 cols | ...]
    Xt, fnames = [], []
    for tr in traits:
        Xk, nk = fixed_columns(data, spec, tr)
        Xt.append(Xk)
        fnames.append(nk)
    offs = np.cumsum([0] + [x.shape[1] for x in Xt])

    rows_y, rows_X, rows_Z, blocks, obs_index = [], [], [], [], []
    for r in range(n):
        obs = [k for k in range(t) if not np.isnan(Y[r, k])]
        if not obs:
            continue
        blocks.append(np.linalg.inv(R0[np.ix_(obs, obs)]))
        for k in obs:
            rows_y.append(Y[r, k])
            xr = np.zeros(offs[-1])
            xr[offs[k]:offs[k + 1]] = Xt[k][r]
            rows_X.append(xr)
            zr = np.zeros(t * q)                 # random effects stacked trait-major
            zr[k * q + pos[data["animal"][r]]] = 1.0
            rows_Z.append(zr)
            obs_index.append((r, k))
    y, X, Z = np.array(rows_y), np.array(rows_X), np.array(rows_Z)
    Rinv = np.zeros((len(y), len(y)))
    i = 0
    for B in blocks:
        m = B.shape[0]
        Rinv[i:i + m, i:i + m] = B
        i += m
    Ginv = np.kron(np.linalg.inv(G0), np.linalg.inv(A))
    b, u, Cuu = solve_mme(y, X, Z, Rinv, Ginv)
    gls_check(y, X, Z, Rinv, np.kron(G0, A), b, u)

    xbv = X @ b
    xb = {tr: [None] * n for tr in traits}
    for (r, k), v in zip(obs_index, xbv):
        xb[traits[k]][r] = float(v)
    U = u.reshape(t, q).T
    P = np.diag(Cuu).reshape(t, q).T
    fixed = {tr: {} for tr in traits}
    for k, tr in enumerate(traits):
        got = dict(zip(fnames[k], b[offs[k]:offs[k + 1]]))
        for f in spec["fixed_factors"]:
            for lev in spec["levels"][f]:
                v = got.get((f, lev))
                fixed[tr][lev if len(spec["fixed_factors"]) == 1 else f"{f}{lev}"] = (
                    None if v is None else float(v))
    random = {"animal": {"ids": ids, "columns": traits, "values": U.tolist()}}
    pev = {"animal": {"ids": ids, "columns": traits, "values": P.tolist()}}
    return dict(xb=xb, random=random, pev=pev, fixed=fixed)


def run_maternal(name, spec, data, ped):
    ids = list(ped["animal"])
    q = len(ids)
    pos = {a: i for i, a in enumerate(ids)}
    A = tabular_A(ids, list(ped["sire"]), list(ped["dam"]))
    y = num(data[spec["y"]])
    n = len(y)
    X, fnames = fixed_columns(data, spec, spec["y"])
    Zd = np.zeros((n, q))                      # direct: the calf itself
    Zm = np.zeros((n, q))                      # maternal: the calf's dam (0 row if unknown)
    for r in range(n):
        Zd[r, pos[data["animal"][r]]] = 1.0
        d = data["dam"][r]
        if d != "0":
            Zm[r, pos[d]] = 1.0
    pe_ids = [a for a in ids if a in set(data["pe"]) - {"0"}]   # pedigree order
    Zp = np.zeros((n, len(pe_ids)))
    for r in range(n):
        if data["pe"][r] != "0":
            Zp[r, pe_ids.index(data["pe"][r])] = 1.0
    Z = np.hstack([Zd, Zm, Zp])
    G0 = np.array(spec["G0"])
    Ginv = np.zeros((2 * q + len(pe_ids),) * 2)
    Ginv[:2 * q, :2 * q] = np.kron(np.linalg.inv(G0), np.linalg.inv(A))
    Ginv[2 * q:, 2 * q:] = np.eye(len(pe_ids)) / spec["sigma2_pe"]
    Rinv = np.eye(n) / spec["sigma2_e"]
    b, u, Cuu = solve_mme(y, X, Z, Rinv, Ginv)
    G = np.zeros_like(Ginv)
    G[:2 * q, :2 * q] = np.kron(G0, A)
    G[2 * q:, 2 * q:] = np.eye(len(pe_ids)) * spec["sigma2_pe"]
    gls_check(y, X, Z, Rinv, G, b, u)
    d = np.diag(Cuu)
    got = dict(zip(fnames, b))
    fixed = {f: {lev: float(got.get((f, lev), 0.0)) for lev in spec["levels"][f]}
             for f in spec["fixed_factors"]}
    random = {
        "animal": {"ids": ids, "columns": ["direct"], "values": u[:q, None].tolist()},
        "dam": {"ids": ids, "columns": ["maternal"], "values": u[q:2 * q, None].tolist()},
        "pe": {"ids": pe_ids, "columns": ["pe"], "values": u[2 * q:, None].tolist()},
    }
    pev = {
        "animal": {"ids": ids, "columns": ["direct"], "values": d[:q, None].tolist()},
        "dam": {"ids": ids, "columns": ["maternal"], "values": d[q:2 * q, None].tolist()},
        "pe": {"ids": pe_ids, "columns": ["pe"], "values": d[2 * q:, None].tolist()},
    }
    # direct-maternal prediction-error covariance of each animal (off-diagonal of C^-1)
    pecov = np.diag(Cuu[:q, q:2 * q]).tolist()
    return dict(xb={spec["y"]: (X @ b).tolist()}, random=random, pev=pev, fixed=fixed,
                pev_cov_direct_maternal={"ids": ids, "values": pecov})


def compare(dense, pub, spec):
    """Max |dense - published| for BLUPs, fixed effects and (when printed) PEV."""
    out = {}
    d_rand = 0.0
    for term, cols in pub["random"].items():
        dr = dense["random"][term]
        for c, vals in cols.items():
            if c == "ids":
                continue
            if "ids" in cols:
                idx = [dr["ids"].index(i) for i in cols["ids"]]
            else:
                idx = range(len(vals))
            k = dr["columns"].index(c)
            for j, v in zip(idx, vals):
                d_rand = max(d_rand, abs(dr["values"][j][k] - v))
    out["random"] = d_rand
    d_fix = 0.0
    for g, levs in pub["fixed"].items():
        for lev, v in levs.items():
            if v is None:
                continue
            key = lev if (spec["kind"] == "maternal" or len(spec["fixed_factors"]) == 1) \
                else f"{g}{lev}"
            got = dense["fixed"][g][key] if spec["kind"] == "multitrait" \
                else dense["fixed"][g][lev]
            d_fix = max(d_fix, abs(got - v))
    out["fixed"] = d_fix
    if "pev" in pub:
        d_pev = 0.0
        for term, cols in pub["pev"].items():
            dp = dense["pev"][term]
            for c, vals in cols.items():
                k = dp["columns"].index(c)
                for j, v in enumerate(vals):
                    d_pev = max(d_pev, abs(dp["values"][j][k] - v))
        out["pev"] = d_pev
    if "blupf90" in pub:
        d_se = 0.0
        for term, byid in pub["blupf90"]["se"].items():
            dp = dense["pev"][term]
            for aid, cols in byid.items():
                j = dp["ids"].index(aid)
                for c, v in cols.items():
                    d_se = max(d_se, abs(np.sqrt(dp["values"][j][dp["columns"].index(c)]) - v))
        out["blupf90_se"] = d_se
    return out


def published_layout(pub, dense):
    """The printed numbers in the same {term: {ids, columns, values}} layout as `dense`."""
    out = {k: v for k, v in pub.items() if k not in ("random", "pev", "reliability")}
    for key in ("random", "pev", "reliability"):
        if key not in pub:
            continue
        out[key] = {}
        for term, cols in pub[key].items():
            ids = cols.get("ids", dense["random"][term]["ids"])
            names = [c for c in cols if c != "ids"]
            out[key][term] = {"ids": ids, "columns": names,
                              "values": [list(r) for r in zip(*(cols[c] for c in names))]}
    return out


def formula_of(spec):
    fixed = " + ".join(spec["fixed_factors"])
    if spec["kind"] == "multitrait":
        return f"cbind({', '.join(spec['traits'])}) ~ {fixed} + (1 | animal)"
    return f"{spec['y']} ~ {fixed} + (1 | animal) + (1 | dam) + (1 | pe)"


def build(name, spec):
    data, ped = read_case(name)
    if spec["kind"] == "multitrait":
        dense = run_multitrait(name, spec, data, ped)
        fv = {"animal": spec["G0"], "residual": spec["R0"]}
        rel = {"animal": "pedigree"}
        checks = {"random": ["animal"], "pev": ["animal"], "xb": True}
        extra = {}
    else:
        dense = run_maternal(name, spec, data, ped)
        fv = {"animal,dam": spec["G0"], "pe": spec["sigma2_pe"],
              "residual": spec["sigma2_e"]}
        rel = {"animal": "pedigree", "dam": "pedigree"}
        checks = {"random": ["animal", "dam", "pe"], "pev": ["animal", "dam", "pe"],
                  "xb": True}
        extra = {"covary": [["animal", "dam"]]}
    pub = PUBLISHED[name]
    diff = compare(dense, pub, spec)
    half = 0.5 + 1e-6   # half a unit in the last printed decimal
    tol = {"random": half * 10.0 ** -pub["decimals"],
           "fixed": half * 10.0 ** -pub.get("fixed_decimals", pub["decimals"])}
    if "pev" in diff:
        tol["pev"] = half * 10.0 ** -pub["decimals"]
    if "blupf90_se" in diff:
        # printed to 9 decimals, but BLUPF90's own sparse inverse is good to ~1e-9
        # relative (not to the last printed digit): allow 1e-8 absolute on the s.e.
        tol["blupf90_se"] = 1e-8
    notes = list(NOTES.get(name, []))
    for k, t in tol.items():
        if diff[k] > t:
            notes.append(f"dense vs published `{k}`: max difference {diff[k]:.3g} exceeds "
                         f"half a unit of the last printed decimal ({t:.3g}); see above.")
    out = {
        "name": name,
        "title": spec["title"],
        "source": spec["source"],
        "data": f"{name}_data.csv",
        "pedigree": f"{name}_pedigree.csv",
        "formula": formula_of(spec),
        **extra,
        "relationships": rel,
        "categorical": {f: spec["levels"][f] for f in spec["fixed_factors"]},
        "fixed_variances": fv,
        "published": published_layout(pub, dense),
        "dense": {**dense, "fixed_constraint": spec["fixed_constraint"]},
        "dense_vs_published": {**diff, "rounding_tolerance": tol},
        "within_rounding": {k: bool(diff[k] <= t) for k, t in tol.items()},
        "notes": notes,
        "checks": checks,
    }
    with open(HERE / f"{name}.json", "w") as fh:
        json.dump(out, fh, indent=1)
        fh.write("\n")
    return out


def main(argv):
    if "--write-csv" in argv:
        for name, spec in CASES.items():
            write_csvs(name, spec)
    for name, spec in CASES.items():
        out = build(name, spec)
        print(f"{name:22s} {out['formula']}")
        print(f"{'':22s} dense vs published: " + ", ".join(
            f"{k}={v:.2e}{'' if out['within_rounding'][k] else ' (beyond rounding)'}"
            for k, v in out["dense_vs_published"].items() if k != "rounding_tolerance"))


if __name__ == "__main__":
    main(sys.argv[1:])
