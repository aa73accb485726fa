"""Pedigrees: reading, checking, sorting and renumbering; inbreeding and A⁻¹.

A :class:`Pedigree` holds animals in an order where parents precede offspring, with
parents as integer indices (-1 = unknown). Inbreeding coefficients come from
Meuwissen & Luo (1992) or, for deep and narrow pedigrees, from the relationships among
the animals that still have offspring to come (:func:`inbreeding` picks the cheaper);
``A⁻¹`` from Henderson's rules with inbreeding (Quaas 1976),
assembled directly as sparse CSC; ``log|A| = Σ log d_i`` from the Mendelian-sampling
variances ``d_i``.
"""
from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path

import numba
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import PedigreeError

@numba.njit(cache=True)
def _topological_order(sire, dam):
    """Order with parents before offspring (Kahn); returns -1 entries on a cycle."""
    n = len(sire)
    n_children = np.zeros(n + 1, dtype=np.int64)
    for i in range(n):
        if sire[i] >= 0:
            n_children[sire[i] + 1] += 1
        if dam[i] >= 0:
            n_children[dam[i] + 1] += 1
    start = np.cumsum(n_children)
    children = np.empty(start[-1], dtype=np.int64)
    fill = start[:-1].copy()
    for i in range(n):
        if sire[i] >= 0:
            children[fill[sire[i]]] = i
            fill[sire[i]] += 1
        if dam[i] >= 0:
            children[fill[dam[i]]] = i
            fill[dam[i]] += 1
    pending = np.zeros(n, dtype=np.int64)
    for i in range(n):
        pending[i] = (sire[i] >= 0) + (dam[i] >= 0)
    order = np.full(n, -1, dtype=np.int64)
    head, tail = 0, 0
    for i in range(n):
        if pending[i] == 0:
            order[tail] = i
            tail += 1
    while head < tail:
        a = order[head]
        head += 1
        for c in range(start[a], start[a + 1]):
            child = children[c]
            pending[child] -= 1
            if pending[child] == 0:
                order[tail] = child
                tail += 1
    return order, tail


@numba.njit(cache=True)
def _generations(order, sire, dam):
    """1 + the larger generation of the parents (founders 0), along a valid order."""
    generation = np.zeros(len(order), dtype=np.int64)
    for i in order:
        g = 0
        if sire[i] >= 0:
            g = generation[sire[i]] + 1
        if dam[i] >= 0 and generation[dam[i]] + 1 > g:
            g = generation[dam[i]] + 1
        generation[i] = g
    return generation


@numba.njit(cache=True)
def inbreeding_meuwissen_luo(sire, dam):
    """Inbreeding coefficients and Mendelian-sampling variances (Meuwissen & Luo 1992).

    ``sire``, ``dam``: parent indices (-1 unknown), parents before offspring.
    Returns ``(F, d)`` with ``d_i = 1/2 − (F_s + F_d)/4`` (an unknown parent counts
    F = −1, so ``d = 1`` for founders, ``3/4 − F_p/4`` with one known parent).

    Each animal's ancestors are visited once, so the time grows with the number of
    ancestors per animal: quadratically with the depth of a pedigree (see
    :func:`inbreeding_active_parents` for deep ones).
    """
    n = len(sire)
    F = np.zeros(n)
    d = np.zeros(n)
    path = np.zeros(n)          # row i of L (A = L D L'), sparse via the heap
    in_heap = np.zeros(n, dtype=np.bool_)
    heap = np.empty(n, dtype=np.int64)
    for i in range(n):
        s, m = sire[i], dam[i]
        fs = F[s] if s >= 0 else -1.0
        fm = F[m] if m >= 0 else -1.0
        d[i] = 0.5 - 0.25 * (fs + fm)
        if s < 0 or m < 0:
            F[i] = 0.0
            continue
        if i > 0 and s == sire[i - 1] and m == dam[i - 1]:
            F[i] = F[i - 1]  # full sib of the previous animal
            continue
        # F_i = Σ_j L_ij² d_j − 1 over the ancestors j of i (and i itself)
        total = 0.0
        size = 0
        path[i] = 1.0
        heap[0] = i
        size = 1
        in_heap[i] = True
        while size > 0:
            j = heap[0]  # the youngest remaining ancestor (largest index)
            size -= 1
            last = heap[size]
            pos = 0
            while True:  # sift down
                child = 2 * pos + 1
                if child >= size:
                    break
                if child + 1 < size and heap[child + 1] > heap[child]:
                    child += 1
                if heap[child] > last:
                    heap[pos] = heap[child]
                    pos = child
                else:
                    break
            if size > 0:
                heap[pos] = last
            in_heap[j] = False
            lj = path[j]
            path[j] = 0.0
            total += lj * lj * d[j]
            for parent in (sire[j], dam[j]):
                if parent < 0:
                    continue
                path[parent] += 0.5 * lj
                if not in_heap[parent]:
                    in_heap[parent] = True
                    pos = size
                    size += 1
                    while pos > 0:  # sift up
                        up = (pos - 1) // 2
                        if heap[up] < parent:
                            heap[pos] = heap[up]
                            pos = up
                        else:
                            break
                    heap[pos] = parent
        # F <= 1 exactly; rounding may step over it when F_s, F_d -> 1 (then d < 0)
        F[i] = min(total - 1.0, 1.0)
    return F, d


@numba.njit(cache=True)
def _active_parent_schedule(sire, dam, max_slots):
    """The order and the matrix slots of :func:`inbreeding_active_parents`.

    Animals are taken in the given order, except that a founder is taken just before
    its first offspring (it has no ancestors, so nothing needs it earlier, and a
    founder parent of an animal deep in the pedigree would otherwise hold a slot from
    the start). An animal with offspring holds a slot from its own turn until its last
    offspring's; an animal without offspring holds none. Returns the order, the slot
    of each animal (-1 for none), the number of slots and the work (the slots in use,
    summed over the animals that take one); stops when more than ``max_slots`` are
    needed.
    """
    n = len(sire)
    offspring_to_come = np.zeros(n, dtype=np.int64)
    for i in range(n):
        if sire[i] >= 0:
            offspring_to_come[sire[i]] += 1
        if dam[i] >= 0:
            offspring_to_come[dam[i]] += 1
    order = np.empty(n, dtype=np.int64)
    slot = np.full(n, -1, dtype=np.int64)
    free = np.empty(n, dtype=np.int64)
    n_free = 0
    n_slots = 0
    work = 0
    taken = np.zeros(n, dtype=np.bool_)
    k = 0
    for i in range(n):
        if sire[i] < 0 and dam[i] < 0 and offspring_to_come[i] > 0:
            continue  # a founder with offspring: taken with its first offspring
        for j in (sire[i], dam[i], i):
            if j < 0 or taken[j]:
                continue
            taken[j] = True
            order[k] = j
            k += 1
            if offspring_to_come[j] > 0:
                if n_free > 0:
                    n_free -= 1
                    slot[j] = free[n_free]
                else:
                    slot[j] = n_slots
                    n_slots += 1
                    if n_slots > max_slots:
                        return order, slot, n_slots, work
                work += n_slots
        for p in (sire[i], dam[i]):
            if p >= 0:
                offspring_to_come[p] -= 1
                if offspring_to_come[p] == 0:
                    free[n_free] = slot[p]
                    n_free += 1
    return order, slot, n_slots, work


@numba.njit(cache=True)
def inbreeding_active_parents(sire, dam, order, slot, n_slots):
    """Inbreeding coefficients and Mendelian-sampling variances from the relationships
    among the active parents only.

    The tabular method (A row by row) restricted to the animals that still have
    offspring to come: an animal's relationships with them are the mean of its
    parents', ``a_ix = (a_sx + a_dx)/2``, and ``a_ii = (a_ss + a_dd)/4 + a_sd/2 + d_i``,
    so ``F_i = a_ii − 1``. ``order``, ``slot`` and ``n_slots`` come from
    :func:`_active_parent_schedule`; the relationships live in an ``n_slots²`` matrix.
    Time is the number of animals times the number of active parents, so linear in
    the depth of a pedigree, however deep, as long as it is narrow. Same ``(F, d)`` as
    :func:`inbreeding_meuwissen_luo`.
    """
    n = len(sire)
    F = np.zeros(n)
    d = np.zeros(n)
    related = np.zeros((n_slots, n_slots))
    in_use = 0  # slots below this have held an animal; the others are still zero
    for i in order:
        s, m = sire[i], dam[i]
        fs = F[s] if s >= 0 else -1.0
        fm = F[m] if m >= 0 else -1.0
        d[i] = 0.5 - 0.25 * (fs + fm)
        a_ii = d[i]
        if s >= 0:
            a_ii += 0.25 * (1.0 + fs)
        if m >= 0:
            a_ii += 0.25 * (1.0 + fm)
        if s >= 0 and m >= 0:
            a_ii += 0.5 * related[slot[s], slot[m]]
        # F <= 1 exactly; rounding may step over it when F_s, F_d -> 1 (then d < 0)
        F[i] = min(a_ii - 1.0, 1.0)
        q = slot[i]
        if q < 0:
            continue
        in_use = max(in_use, q + 1)
        # a slot freed by an animal without offspring to come holds stale values:
        # the whole row and column are rewritten
        if s >= 0 and m >= 0:
            qs, qm = slot[s], slot[m]
            for x in range(in_use):
                value = 0.5 * (related[qs, x] + related[qm, x])
                related[q, x] = value
                related[x, q] = value
        elif s >= 0 or m >= 0:
            qp = slot[s] if s >= 0 else slot[m]
            for x in range(in_use):
                value = 0.5 * related[qp, x]
                related[q, x] = value
                related[x, q] = value
        else:
            for x in range(in_use):
                related[q, x] = 0.0
                related[x, q] = 0.0
        related[q, q] = 1.0 + F[i]
    return F, d


@numba.njit(cache=True)
def _ancestor_work_bound(sire, dam):
    """An upper bound on the ancestors :func:`inbreeding_meuwissen_luo` visits: for
    each animal with both parents known (not a full sib of the one before), at most
    every earlier animal and at most ``2^(g+1) − 2`` in generation ``g``."""
    n = len(sire)
    generation = np.zeros(n, dtype=np.int64)
    work = 0
    for i in range(n):
        s, m = sire[i], dam[i]
        g = 0
        if s >= 0:
            g = generation[s] + 1
        if m >= 0 and generation[m] + 1 > g:
            g = generation[m] + 1
        generation[i] = g
        if s < 0 or m < 0 or (i > 0 and s == sire[i - 1] and m == dam[i - 1]):
            continue
        work += min(i, (1 << min(g + 1, 62)) - 2)
    return work


# relationships among at most this many active parents are held (8 * 4096² = 134 MB)
MAX_ACTIVE_PARENTS = 4096
# A visited ancestor (heap, scattered reads) took 26-50 ns, a slot of a relationship row
# 3-10 ns (more with more slots: the column is written too); the bound on the
# ancestors may exceed the ancestors visited, so the active parents must win by 2x.
ANCESTOR_COST_IN_SLOTS = 2


def inbreeding(sire: np.ndarray, dam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inbreeding coefficients ``F`` and Mendelian-sampling variances ``d``.

    Picks the faster of two exact methods from an O(n) look at the pedigree:
    :func:`inbreeding_meuwissen_luo` (time grows with the ancestors of each animal:
    wide, shallow pedigrees) or :func:`inbreeding_active_parents` (time grows with
    the animals that still have offspring to come: deep, narrow pedigrees).

    Parameters
    ----------
    sire, dam : ndarray of int64
        Parent positions (-1 unknown), parents before offspring.

    Returns
    -------
    F, d : ndarray
        ``d_i = 1/2 − (F_s + F_d)/4``, an unknown parent counting ``F = −1``.
    """
    sire = np.ascontiguousarray(sire, dtype=np.int64)
    dam = np.ascontiguousarray(dam, dtype=np.int64)
    order, slot, n_slots, work = _active_parent_schedule(sire, dam, MAX_ACTIVE_PARENTS)
    if (n_slots <= MAX_ACTIVE_PARENTS
            and work < ANCESTOR_COST_IN_SLOTS * _ancestor_work_bound(sire, dam)):
        return inbreeding_active_parents(sire, dam, order, slot, n_slots)
    return inbreeding_meuwissen_luo(sire, dam)


@numba.njit(cache=True)
def _ainverse_triplets(sire, dam, d):
    """Henderson's rules with inbreeding: lower-triangle triplets of A⁻¹."""
    n = len(sire)
    rows = np.empty(6 * n, dtype=np.int64)
    cols = np.empty(6 * n, dtype=np.int64)
    vals = np.empty(6 * n)
    k = 0
    for i in range(n):
        b = 1.0 / d[i]
        parents = (sire[i], dam[i])
        rows[k] = i
        cols[k] = i
        vals[k] = b
        k += 1
        for p in parents:
            if p >= 0:  # parents precede offspring: i > p
                rows[k] = i
                cols[k] = p
                vals[k] = -0.5 * b
                k += 1
                rows[k] = p
                cols[k] = p
                vals[k] = 0.25 * b
                k += 1
        if parents[0] >= 0 and parents[1] >= 0:
            a, c = max(parents[0], parents[1]), min(parents[0], parents[1])
            rows[k] = a
            cols[k] = c
            vals[k] = 0.25 * b
            k += 1
    return rows[:k], cols[:k], vals[:k]


# What means "unknown parent" unless the caller says otherwise: these texts (in any
# case) and any text that reads as the number 0 or -1 ("00", "000", "0.0", "-1").
UNKNOWN_PARENT_CODES = frozenset({"", ".", "*", "-", "?", "na", "n/a", "nan", "none",
                                  "null", "<na>"})
_ZERO_OR_MINUS_ONE = r"[+-]?(?:0+(?:\.0*)?|\.0+)(?:[eE][+-]?\d+)?|-0*1(?:\.0*)?"
# A Mendelian-sampling variance below this is raised to it in A⁻¹ and log|A| (see
# Pedigree.inverse): it keeps the entries of A⁻¹ below 1e8, and d = 1/2 − (F_s + F_d)/4
# has an absolute rounding error near 1e-16 per ancestor, so a d near 1e-14 has no
# correct digit.
MIN_MENDELIAN_VARIANCE = 1e-8
# A first line is a header when a field, in lower case, without "_id"/"id" and other
# than letters, is one of these.
_COLUMN_NAMES = frozenset({"animal", "id", "ident", "individual", "sire", "dam", "father",
                           "mother", "calf", "progeny", "offspring"})


def _id_text(values, name: str) -> tuple[pd.Series, np.ndarray]:
    """Identifiers as stripped text, and which of them are missing (None, NaN, pd.NA).

    A float that is a whole number is written as an integer: a parent column that
    pandas reads as float because of one missing value holds 12.0 for animal 12.
    """
    if np.ndim(values) != 1:
        raise PedigreeError(f"{name} must be one-dimensional (one id per animal), "
                            f"got {np.ndim(values)} dimensions")
    series = (values.reset_index(drop=True) if isinstance(values, pd.Series)
              else pd.Series(values))
    missing = series.isna().to_numpy()
    kind = series.dtype.kind
    if kind == "f" or (kind == "O" and pd.api.types.infer_dtype(series, skipna=True)
                       in ("floating", "mixed-integer-float", "mixed", "decimal")):
        text = series.map(_one_id_text, na_action="ignore")
    else:
        text = series.astype(str)
    text = text.astype(str).str.strip()
    text[missing] = ""
    return text, missing


def _one_id_text(value) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _unknown_labels(labels: pd.Series, unknown) -> np.ndarray:
    """Which of the (distinct, stripped) labels mean "unknown parent"."""
    if unknown is None:
        found = (labels.str.lower().isin(UNKNOWN_PARENT_CODES)
                 | labels.str.fullmatch(_ZERO_OR_MINUS_ONE))
    else:
        if isinstance(unknown, (str, int, float)):
            unknown = [unknown]
        codes, _ = _id_text(list(unknown), "unknown")
        found = labels.isin(set(codes)) | (labels == "")
    return found.to_numpy(dtype=bool)


class Pedigree:
    """A checked, sorted and renumbered pedigree.

    Parameters
    ----------
    animal, sire, dam : array-like
        Identifiers, compared as stripped text (a whole-number float as an integer:
        12.0 is animal "12"). Parents without a row of their own are added as founders.
    unknown : collection of str, optional
        The codes that mean "unknown parent" (each compared with the stripped text of
        an id). By default ``0`` and any other text that reads as the number 0 or −1
        (``00``, ``000``, ``0.0``, ``-1``), ``NA``, ``N/A``, ``NaN``, ``None``,
        ``NULL``, ``<NA>``, ``.``, ``*``, ``-`` and ``?``, in any case. Missing values
        (None, NaN, pd.NA) and empty text always mean unknown. An animal id that is
        one of these codes is refused.
    groups : list of str, optional
        Unknown-parent (genetic) groups: parent codes that name the group of an unknown
        parent (``"G1"``). Such a parent is unknown for A and its inbreeding; a model
        with this pedigree fits the groups as fixed effects through Quaas's QP
        transformation (:meth:`group_inverse`), and its animal solutions are
        ``a* = a + Qg`` (:meth:`group_contributions`).

    Attributes
    ----------
    ids : pandas.Index
        Animal identifiers (as strings) in the internal order (parents first).
    sire, dam : ndarray of int64
        Parent positions in that order, -1 when unknown.

    Raises
    ------
    PedigreeError
        No animals; lengths differ; an animal id missing, duplicated, its own parent or
        ancestor; the same animal as sire and dam.

    Examples
    --------
    >>> ped = Pedigree(["3", "4", "5"], ["1", "1", "4"], ["2", "*", "3"])
    >>> list(ped.ids)
    ['1', '2', '3', '4', '5']
    >>> ped.inbreeding.round(3).tolist()
    [0.0, 0.0, 0.0, 0.0, 0.125]
    >>> Pedigree(["b"], ["a"], ["*"], unknown={"*"}).n_added_founders
    1
    """

    def __init__(self, animal, sire, dam, unknown=None, groups=None):
        group_labels = _group_labels(groups)
        columns = [_id_text(v, name) for v, name in ((animal, "animal"), (sire, "sire"),
                                                     (dam, "dam"))]
        n = len(columns[0][0])
        if not len(columns[1][0]) == len(columns[2][0]) == n:
            raise PedigreeError(f"animal, sire and dam must have the same length, not "
                                f"{n}, {len(columns[1][0])} and {len(columns[2][0])}")
        if n == 0:
            raise PedigreeError("pedigree has no animals")
        text = pd.concat([c[0] for c in columns], ignore_index=True)
        codes, labels = pd.factorize(text)
        label_text = pd.Series(labels, dtype=str)
        label_group = pd.Index(group_labels).get_indexer(label_text).astype(np.int64)
        is_unknown = ((_unknown_labels(label_text, unknown) | (label_group >= 0))[codes]
                      | np.concatenate([c[1] for c in columns]))
        if len(group_labels) and np.any(label_group[codes[:n]] >= 0):
            named = sorted(set(text[:n][label_group[codes[:n]] >= 0]))
            raise PedigreeError("unknown-parent group(s) listed as animals: "
                                + ", ".join(map(repr, named[:10])))
        if is_unknown[:n].any():
            rows = np.flatnonzero(is_unknown[:n])
            shown = ", ".join(f"{r} ({'missing' if columns[0][1][r] else repr(text[r])})"
                              for r in rows[:10])
            raise PedigreeError(f"{len(rows)} pedigree row(s) have no animal id (missing or "
                                f"an unknown-parent code), at position(s) {shown}")
        labels = np.asarray(labels, dtype=object)
        animal_code = codes[:n].astype(np.int64)
        sire_code = np.where(is_unknown[n:2 * n], -1, codes[n:2 * n]).astype(np.int64)
        dam_code = np.where(is_unknown[2 * n:], -1, codes[2 * n:]).astype(np.int64)
        counts = np.bincount(animal_code, minlength=len(labels))
        if np.any(counts > 1):
            raise PedigreeError("duplicated animal id(s) in pedigree: "
                                + ", ".join(map(str, labels[counts > 1][:10])))
        own = (animal_code == sire_code) | (animal_code == dam_code)
        if own.any():
            raise PedigreeError("animal(s) listed as their own parent: "
                                + ", ".join(map(str, labels[animal_code[own]][:10])))
        same = (sire_code == dam_code) & (sire_code >= 0)
        if same.any():
            raise PedigreeError("animal(s) with the same sire and dam: "
                                + ", ".join(map(str, labels[animal_code[same]][:10])))
        is_parent = np.zeros(len(labels), dtype=bool)
        is_parent[sire_code[sire_code >= 0]] = True
        is_parent[dam_code[dam_code >= 0]] = True
        founder_codes = np.flatnonzero(is_parent & (counts == 0))
        # positions: added founders first, then the animals in input order
        position_of_code = np.full(len(labels), -1, dtype=np.int64)
        position_of_code[founder_codes] = np.arange(len(founder_codes))
        position_of_code[animal_code] = len(founder_codes) + np.arange(n)
        all_ids = np.concatenate([labels[founder_codes], labels[animal_code]])
        founders = founder_codes
        unknown_or = lambda c: np.where(c >= 0, position_of_code[np.maximum(c, 0)], -1)
        sire_idx = np.concatenate([np.full(len(founders), -1), unknown_or(sire_code)])
        dam_idx = np.concatenate([np.full(len(founders), -1), unknown_or(dam_code)])
        order, reached = _topological_order(sire_idx, dam_idx)
        if reached < len(all_ids):
            placed = np.zeros(len(all_ids), dtype=bool)
            placed[order[:reached]] = True
            stuck = all_ids[~placed]
            raise PedigreeError(
                "pedigree has a loop (an animal is its own ancestor) among: "
                + ", ".join(map(str, stuck[:10])) + (" ..." if len(stuck) > 10 else ""))
        # generations (founders 0), then input order within a generation
        generation = _generations(order, sire_idx, dam_idx)
        order = np.lexsort((np.arange(len(all_ids)), generation))
        position = np.empty(len(order), dtype=np.int64)
        position[order] = np.arange(len(order))
        self.ids = pd.Index(all_ids[order].astype(str), name="animal")
        self.sire = np.where(sire_idx[order] >= 0, position[np.maximum(sire_idx[order], 0)], -1)
        self.dam = np.where(dam_idx[order] >= 0, position[np.maximum(dam_idx[order], 0)], -1)
        self.n_added_founders = len(founders)
        self.unknown_codes = unknown    # as given (None: the default codes)
        # unknown-parent groups of the parents (-1: no group), in the order of ids
        self.groups = pd.Index(group_labels, dtype=object, name="group")
        parent_group = lambda part: np.concatenate([
            np.full(len(founders), -1), np.where(codes[part] >= 0, label_group[codes[part]], -1)
        ]).astype(np.int64)[order]
        self.sire_group = np.where(self.sire >= 0, -1, parent_group(slice(n, 2 * n)))
        self.dam_group = np.where(self.dam >= 0, -1, parent_group(slice(2 * n, 3 * n)))
        used = set(self.sire_group[self.sire_group >= 0]) | set(self.dam_group[self.dam_group >= 0])
        unused = [g for i, g in enumerate(group_labels) if i not in used]
        if unused:
            raise PedigreeError("unknown-parent group(s) never used as a parent: "
                                + ", ".join(map(repr, unused)) + " (a typo?)")
        self._inbreeding = None
        self._inverse_d = None

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_dataframe(cls, frame: pd.DataFrame, animal: str = "animal", sire: str = "sire",
                       dam: str = "dam", unknown=None, groups=None) -> "Pedigree":
        """Read the animal, sire and dam columns of a DataFrame.

        Parameters
        ----------
        frame : pandas.DataFrame
        animal, sire, dam : str
            Column names.
        unknown : collection of str, optional
            The codes that mean "unknown parent"; the default is described in
            :class:`Pedigree`.
        groups : list of str, optional
            Unknown-parent (genetic) group codes used as parents: see :class:`Pedigree`.

        Examples
        --------
        >>> frame = pd.DataFrame({"animal": ["c", "d"], "sire": ["a", "NULL"],
        ...                       "dam": ["b", "-"]})
        >>> Pedigree.from_dataframe(frame).n_added_founders
        2
        """
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"frame must be a pandas DataFrame, not {type(frame).__name__}")
        missing = [c for c in (animal, sire, dam) if c not in frame.columns]
        if missing:
            raise PedigreeError(f"pedigree column(s) {', '.join(map(repr, missing))} not found "
                                f"(available: {', '.join(map(str, frame.columns))})")
        return cls(frame[animal], frame[sire], frame[dam], unknown=unknown, groups=groups)

    @classmethod
    def read(cls, path: str | Path, animal: str | int = 0, sire: str | int = 1,
             dam: str | int = 2, sep: str | None = None, header: bool | None = None,
             unknown=None, groups=None) -> "Pedigree":
        """Read a pedigree file: one line per animal, with animal, sire and dam fields.

        Parameters
        ----------
        path : str or Path
        animal, sire, dam : int or str
            Column positions (from 0) or, with a header, column names.
        sep : str, optional
            The field separator. By default a comma, tab or semicolon when the first
            line has one, else runs of whitespace.
        header : bool, optional
            Whether the first line names the columns. By default it does when a column
            is asked for by name, or when one of its fields is a usual column name
            (animal, id, sire, dam, father, mother, ...; ``sire_id`` counts).
        unknown : collection of str, optional
            The codes that mean "unknown parent"; the default is described in
            :class:`Pedigree`.
        groups : list of str, optional
            Unknown-parent group codes (see :class:`Pedigree`).

        Raises
        ------
        PedigreeError
            Naming the file: it does not exist, is a directory, is empty, has fewer
            than three columns, has a line with more or fewer fields than the first,
            lacks a named column; or the pedigree itself is wrong (see
            :class:`Pedigree`).
        """
        path = Path(path)
        where = f"pedigree file {str(path)!r}"
        if not path.exists():
            raise PedigreeError(f"{where} not found")
        if path.is_dir():
            raise PedigreeError(f"{where} is a directory, not a file")
        try:
            with path.open(encoding="utf-8", errors="replace") as handle:
                first = next((line for line in handle if line.strip()), None)
        except OSError as exc:
            raise PedigreeError(f"{where} cannot be read: {exc}") from exc
        if first is None:
            raise PedigreeError(f"{where} is empty")
        if sep is None:
            sep = next((c for c in (",", "\t", ";") if c in first), r"\s+")
        try:
            frame = pd.read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False,
                                engine="c" if len(sep) == 1 or sep == r"\s+" else "python")
        except pd.errors.ParserError as exc:  # a line longer than the first
            raise PedigreeError(f"{where} has lines of different lengths: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise PedigreeError(f"{where} is not text (UTF-8): {exc}") from exc
        short = _short_line(path, frame, sep)
        if short is not None:
            raise PedigreeError(f"{where} has lines of different lengths: line {short[0]} "
                                f"has {short[1]} field(s), the first line {frame.shape[1]}")
        if frame.shape[1] < 3:
            raise PedigreeError(f"{where} has {frame.shape[1]} column(s) (separator "
                                f"{sep!r}); a pedigree needs three: animal, sire and dam")
        first_row = [str(v).strip() for v in frame.iloc[0]]
        if header is None:
            header = (any(isinstance(c, str) for c in (animal, sire, dam))
                      or any(_is_column_name(v) for v in first_row))
        names = first_row if header else list(range(frame.shape[1]))
        if header:
            frame = frame.iloc[1:]
        positions = []
        for role, column in (("animal", animal), ("sire", sire), ("dam", dam)):
            if isinstance(column, str):
                if column not in names:
                    raise PedigreeError(f"{where} has no column {column!r} for {role} "
                                        f"(header: {', '.join(map(str, names))})")
                positions.append(names.index(column))
            elif not 0 <= column < frame.shape[1]:
                raise PedigreeError(f"{where} has {frame.shape[1]} columns; there is no "
                                    f"column {column} for {role}")
            else:
                positions.append(int(column))
        if len(set(positions)) < 3:
            raise PedigreeError(f"{where}: animal, sire and dam must be three different "
                                f"columns, not {positions}")
        if frame.empty:
            raise PedigreeError(f"{where} has a header but no animals")
        try:
            return cls(*(frame.iloc[:, p] for p in positions), unknown=unknown, groups=groups)
        except PedigreeError as exc:
            raise PedigreeError(f"{where}: {exc}") from exc

    # ------------------------------------------------------------ properties
    def __len__(self) -> int:
        return len(self.ids)

    def _compute(self):
        if self._inbreeding is None:
            self._inbreeding = inbreeding(self.sire, self.dam)
        return self._inbreeding

    @property
    def inbreeding(self) -> np.ndarray:
        """Inbreeding coefficients F, in the order of ``ids``."""
        return self._compute()[0]

    @property
    def mendelian_variances(self) -> np.ndarray:
        """``d_i = 1/2 − (F_s + F_d)/4``: the Mendelian-sampling variance of each animal
        (relative to σ²_a; 0 for an animal whose parents are fully inbred, and related
        as an animal and itself). :meth:`inverse` and :meth:`logdet` use at least
        ``MIN_MENDELIAN_VARIANCE``."""
        return self._compute()[1]

    def _inverse_variances(self) -> np.ndarray:
        """The ``d_i`` of A⁻¹ and log|A|: at least ``MIN_MENDELIAN_VARIANCE``."""
        if self._inverse_d is None:
            d = self.mendelian_variances
            low = np.flatnonzero(d < MIN_MENDELIAN_VARIANCE)
            if len(low):
                i = low[0]
                F = self.inbreeding
                parents = ", ".join(f"{F[p]:.10f}" for p in (self.sire[i], self.dam[i]))
                warnings.warn(
                    f"{len(low)} animal(s) have a Mendelian-sampling variance d = 1/2 − "
                    f"(F_sire + F_dam)/4 below {MIN_MENDELIAN_VARIANCE:g} (first "
                    f"{self.ids[i]!r}: d = {d[i]:.3g}, parents' inbreeding {parents}): "
                    "A is numerically singular. A⁻¹ and log|A| use "
                    f"d = {MIN_MENDELIAN_VARIANCE:g} for them, the A of a population in "
                    "which these animals deviate from their parents' mean by that much "
                    "more; the inbreeding coefficients are those of the pedigree",
                    UserWarning, stacklevel=3)
                d = np.maximum(d, MIN_MENDELIAN_VARIANCE)
            self._inverse_d = d
        return self._inverse_d

    def logdet(self) -> float:
        """``log|A| = Σ log d_i`` (with ``d_i`` at least ``MIN_MENDELIAN_VARIANCE``)."""
        return float(np.sum(np.log(self._inverse_variances())))

    def inverse(self) -> sp.csc_matrix:
        """A⁻¹ (full symmetric, CSC) in the order of ``ids``.

        Henderson's rules with inbreeding. A Mendelian-sampling variance ``d_i`` below
        ``MIN_MENDELIAN_VARIANCE`` (1e-8) is raised to it, with a warning: it arises
        when both parents are inbred beyond ``F = 1 − 2·10⁻⁸`` and related as closely
        (over 80 generations of parent-offspring or full-sib mating). ``d_i`` is a
        difference of numbers near 1/2 that loses a digit each time it falls tenfold
        (none is left near 1e-16), and ``1/d_i`` would dominate A⁻¹ and the
        mixed-model equations.
        """
        rows, cols, vals = _ainverse_triplets(self.sire, self.dam, self._inverse_variances())
        n = len(self)
        lower = sp.csc_matrix((vals, (rows, cols)), shape=(n, n))
        return (lower + sp.tril(lower, -1).T).tocsc()

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def group_inverse(self) -> sp.csc_matrix:
        """``A*⁻¹`` over the animals then the groups (Quaas 1988): Henderson's rules
        with each unknown parent replaced by its group, ``(n + g)`` square and singular
        (each row sums to 0 over an animal's own group contributions).

        Examples
        --------
        >>> ped = Pedigree(["1", "2", "3"], ["G1", "G1", "1"], ["G2", "G2", "2"],
        ...                groups=["G1", "G2"])
        >>> ped.group_inverse().toarray().sum(axis=1).round(12).tolist()
        [0.0, 0.0, 0.0, 0.0, 0.0]
        """
        n = len(self)
        b = 1.0 / self._inverse_variances()
        sire = np.where(self.sire >= 0, self.sire, np.where(self.sire_group >= 0,
                                                              n + self.sire_group, -1))
        dam = np.where(self.dam >= 0, self.dam, np.where(self.dam_group >= 0,
                                                         n + self.dam_group, -1))
        index = np.stack([np.arange(n), sire, dam], axis=1)
        weight = np.array([1.0, -0.5, -0.5])
        rows, cols, vals = [], [], []
        for a in range(3):
            for c in range(3):
                keep = (index[:, a] >= 0) & (index[:, c] >= 0)
                rows.append(index[keep, a])
                cols.append(index[keep, c])
                vals.append(b[keep] * weight[a] * weight[c])
        size = n + self.n_groups
        return sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                             shape=(size, size))

    def group_contributions(self) -> np.ndarray:
        """``Q`` (animals x groups): the expected fraction of each animal's genes from
        each group, ``Q_i = (Q_sire + Q_dam) / 2`` with a group parent contributing its
        unit vector; ``a* = a + Q g``."""
        return _group_contributions(self.sire, self.dam, self.sire_group, self.dam_group,
                                    self.n_groups)

    def to_frame(self) -> pd.DataFrame:
        """The sorted pedigree with inbreeding, as a DataFrame."""
        label = lambda idx: np.where(idx >= 0, np.asarray(self.ids)[np.maximum(idx, 0)], None)
        return pd.DataFrame({"animal": self.ids, "sire": label(self.sire), "dam": label(self.dam),
                             "inbreeding": self.inbreeding})

    def __repr__(self) -> str:
        return (f"Pedigree({len(self)} animals, {self.n_added_founders} founders added, "
                f"max inbreeding {self.inbreeding.max():.4f})")


def _group_labels(groups) -> list[str]:
    if groups is None:
        return []
    if isinstance(groups, str):
        groups = [groups]
    labels, missing = _id_text(list(groups), "groups")
    if missing.any() or (labels == "").any():
        raise PedigreeError("groups must be non-empty codes, got a missing one")
    if labels.duplicated().any():
        raise PedigreeError("groups repeat a code: "
                            + ", ".join(map(repr, labels[labels.duplicated()])))
    return list(labels)


@numba.njit(cache=True)
def _group_contributions(sire, dam, sire_group, dam_group, n_groups):
    n = len(sire)
    q = np.zeros((n, n_groups))
    for i in range(n):  # parents precede offspring
        for parent, group in ((sire[i], sire_group[i]), (dam[i], dam_group[i])):
            if parent >= 0:
                q[i] += 0.5 * q[parent]
            elif group >= 0:
                q[i, group] += 0.5
    return q


def _is_column_name(field: str) -> bool:
    word = re.sub(r"[^a-z]", "", field.lower())
    return word in _COLUMN_NAMES or re.sub(r"^id|id$", "", word) in _COLUMN_NAMES


def _short_line(path: Path, frame: pd.DataFrame, sep: str) -> tuple[int, int] | None:
    """The first line (number from 1, number of fields) with fewer fields than the
    first, or None.

    pandas fills the missing fields of a short line with empty text, as it reads an
    empty field: with whitespace between fields, an empty field is a short line;
    otherwise the lines that end in an empty field are split again to tell them apart.
    """
    empty = (frame == "").to_numpy()
    rows = np.flatnonzero(empty.any(axis=1) if sep == r"\s+" else empty[:, -1])
    if not len(rows):
        return None
    candidates = set(rows.tolist())
    with path.open(encoding="utf-8", errors="replace", newline="") as handle:
        row = -1
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row += 1
            if row not in candidates:
                continue
            if sep == r"\s+":
                n_fields = len(line.split())
            elif len(sep) == 1:
                n_fields = len(next(csv.reader([line], delimiter=sep)))
            else:
                n_fields = len(re.split(sep, line.rstrip("\r\n")))
            if n_fields < frame.shape[1]:
                return number, n_fields
            if row == rows[-1]:
                break
    return None


def relationship_matrix_tabular(pedigree: Pedigree) -> np.ndarray:
    """Dense A by the tabular method (for checking; O(n²) memory)."""
    n = len(pedigree)
    A = np.zeros((n, n))
    for i in range(n):
        s, d = pedigree.sire[i], pedigree.dam[i]
        for j in range(i):
            A[i, j] = A[j, i] = 0.5 * ((A[j, s] if s >= 0 else 0.0) + (A[j, d] if d >= 0 else 0.0))
        A[i, i] = 1.0 + (0.5 * A[s, d] if s >= 0 and d >= 0 else 0.0)
    return A
