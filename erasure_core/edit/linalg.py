"""Closed-form algebra shared by every method: the only home of solves and projectors.

The UCE family (UCE, RECE, MACE's closed-form refinement, TRCE stage 1) minimises, per site,

    Σ_e s‖W c_e − W₀ c_a(e)‖² + Σ_p s_p‖W c_p − W₀ c_p‖² + λ‖W − W₀‖²

(UCE, arXiv 2308.14761, eq. 7). Writing key rows as matrices ``C_e, C_a, C_p`` (``[R, d_in]``),
the minimiser is ``W = W₀ M`` with the same right multiplier ``M`` for every site of width
``d_in``:

    M − I = s (C_a − C_e)ᵀ C_e A⁻¹,   A = λI + s C_eᵀC_e + s_p C_pᵀC_p

so one ``d_in × d_in`` solve serves every site, and each site's delta ``W₀ (M − I)`` has rank at
most ``min(R, d_in)``: ``up = W₀ P`` and ``down = Q`` with ``P = s (C_a − C_e)ᵀ``, ``Q = C_e A⁻¹``.
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import NumericalError
from ..numeric import all_finite

__all__ = ["RightMultiplier", "forget_grams", "wide", "anchored_multiplier_from_grams", "anchored_right_multiplier", "check_finite",
           "compact", "cross_gram", "factor_square", "full_multiplier", "gram", "kmeans",
           "least_amplified_direction", "low_eigen_projector", "low_eigen_projector_of_rows",
           "ridge_preimage_rows", "solve_right", "check_scalars", "check_gram_finite"]


def check_finite(tensor: torch.Tensor, what: str, method: str) -> torch.Tensor:
    """Raise NumericalError naming ``what`` and ``method`` when ``tensor`` has NaN or inf."""
    if not all_finite(tensor):
        raise NumericalError(
            f"{method}: {what} must be finite, but got NaN or inf although every input was finite: the "
            "solve overflowed. Use solve_dtype float64, or raise 'lamb' (the ridge term).",
            input_name="solve_dtype",
        )
    return tensor


def check_scalars(method: str, **values: float) -> None:
    """Raise NumericalError naming the first option that is not a finite number (NaN passes every
    range comparison, so a range check alone lets it through to the solve)."""
    for name, value in values.items():
        if not math.isfinite(float(value)):
            raise NumericalError(f"{method}: '{name}' must be a finite number, but got {value}. Type a number.",
                                 input_name=name)


def check_gram_finite(g: torch.Tensor, method: str, role: str) -> None:
    """Raise NumericalError when the key rows (text encodings) behind a Gram are not finite: the
    text encoder, not an option, is then to blame."""
    if not all_finite(g):
        raise NumericalError(f"{method}: the {role} encodings must be finite, but the text encoder returned NaN "
                             "or inf. Check the CLIP (and any CLIP LoRA) connected to the node.", input_name="clip")


GRAM_CHUNK = 8192  # rows converted to the solve precision at a time


def gram(rows: torch.Tensor, dtype: torch.dtype | None = None, *, remember: bool = False) -> torch.Tensor:
    """``rowsᵀ rows`` for key rows ``[R, d]`` -> ``[d, d]`` (zero when R = 0), in ``dtype``
    (default: the rows'). Rows are converted chunk by chunk, so a float64 Gram of float32 rows
    needs no float64 copy of all of them. ``remember``: a large Gram is kept with the exact rows it
    came from (:class:`_GramMemo`), so a second erase on the same rows (a changed strength or λ)
    reuses it; for callers whose rows recur (the keys of a solve, the weights of a check)."""
    if remember:
        return _MEMO.get(rows, dtype or rows.dtype, lambda: cross_gram(rows, rows, dtype))
    return cross_gram(rows, rows, dtype)


class _GramMemo:
    """The last few large Grams, each with a copy of its rows: a lookup is a bit-for-bit comparison
    with the stored rows (memory-bound, ~100× cheaper than the product), so a hit is exact, never
    stale; the sum of the rows picks the candidate among equal shapes. Results are handed out as
    copies (callers may add to them in place). Bounded by ``limit`` bytes, least recent evicted."""

    def __init__(self, limit: int, smallest: int):
        self.limit, self.smallest = limit, smallest
        self._entries: collections.OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _size(*tensors: torch.Tensor) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def get(self, rows: torch.Tensor, dtype: torch.dtype, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        # CPU only: on a GPU the product costs a millisecond, and held copies would be device memory
        # outside ComfyUI's management
        size = self._size(rows) + rows.shape[1] ** 2 * dtype.itemsize  # the rows' copy and the Gram
        if rows.device.type != "cpu" or self._size(rows) < self.smallest or size > self.limit // 4 or rows.requires_grad:
            return compute()
        total = float(rows.sum(dtype=torch.float64))
        if not math.isfinite(total):  # NaN never equals itself: such rows could only fill the memo
            return compute()
        key = (tuple(rows.shape), rows.dtype, dtype, total)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and torch.equal(hit[0], rows):
                self._entries.move_to_end(key)
                return hit[1].clone()
        result = compute()
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= self._size(*old)
            entry = (rows.detach().clone(), result.detach().clone())
            self._entries[key] = entry
            self._bytes += self._size(*entry)
            while self._bytes > self.limit and len(self._entries) > 1:
                self._bytes -= self._size(*self._entries.popitem(last=False)[1])
        return result


MEMO_BYTES = 256 << 20
_MEMO = _GramMemo(limit=MEMO_BYTES, smallest=4 << 20)  # rows of 4-64 MiB: SD-sized keys and weight stacks


def forget_grams() -> None:
    """Drop every remembered Gram (benchmarks timing a first run; a caller freeing memory)."""
    _MEMO.clear()


def cross_gram(left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``leftᵀ right`` for paired rows ``[R, d]``, accumulated in ``dtype`` over row chunks.

    When one side repeats its rows (every target paired with the same anchor prompt: the anchor's
    rows recur once per target), the product is taken over its distinct rows only,
    ``Σ_u l_u (Σ_{r ∈ u} right_r)ᵀ``: the sums cost ``R·d`` and the product ``U·d²`` for ``U``
    distinct rows instead of ``R·d²``."""
    dtype = dtype or left.dtype
    if right is not left:
        for rows, other, flip in ((left, right, False), (right, left, True)):
            grouped = _distinct_rows(rows)
            if grouped is not None:
                distinct, inverse = grouped
                sums = torch.zeros(len(distinct), other.shape[1], dtype=dtype, device=left.device)
                for start in range(0, len(other), GRAM_CHUNK):  # no copy of all rows in ``dtype``
                    sums.index_add_(0, inverse[start : start + GRAM_CHUNK].to(left.device),
                                    other[start : start + GRAM_CHUNK].to(device=left.device, dtype=dtype))
                out = distinct.to(device=left.device, dtype=dtype).T @ sums
                return out.T if flip else out
    out = torch.zeros(left.shape[1], right.shape[1], dtype=dtype, device=left.device)
    for start in range(0, left.shape[0], GRAM_CHUNK):
        a = left[start : start + GRAM_CHUNK].to(dtype)
        if right is left:
            out += _self_gram(a)
        else:
            out += a.T @ right[start : start + GRAM_CHUNK].to(device=left.device, dtype=dtype)
    return out


_PROBES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _distinct_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(distinct rows [U, d], inverse [R])`` with ``distinct[inverse] == rows`` exactly, when at
    most half the rows are distinct; ``None`` otherwise. Rows are grouped by one projection on a
    fixed vector and each group is then checked bit for bit, so a projection collision only
    costs the shortcut, never exactness."""
    n, d = rows.shape
    if n < 64:
        return None
    probe = _PROBES.get((d, rows.device))
    if probe is None:
        gen = torch.Generator().manual_seed(d)
        probe = _PROBES.setdefault((d, rows.device), (1 + torch.rand(d, generator=gen)).to(rows.device))
    keys = rows.float() @ probe
    values, inverse = torch.unique(keys, return_inverse=True)
    if 2 * len(values) > n:
        return None
    first = torch.empty(len(values), dtype=torch.long, device=rows.device)
    first.scatter_(0, inverse, torch.arange(n, device=rows.device))  # one member of each group
    distinct = rows[first]
    if not torch.equal(distinct[inverse], rows):
        return None
    return distinct, inverse


def _self_gram(a: torch.Tensor) -> torch.Tensor:
    """``aᵀa`` from its upper block rows (it is symmetric): block row ``i`` of width ``d/4`` against
    columns ``i…``, mirrored below; ~30% less time than one product for wide rows."""
    d = a.shape[1]
    if d < 256:
        return a.T @ a
    g = torch.empty(d, d, dtype=a.dtype, device=a.device)
    for i in range(4):
        lo, hi = i * d // 4, (i + 1) * d // 4
        block = a[:, lo:hi].T @ a[:, lo:]  # [hi - lo, d - lo]
        g[lo:hi, lo:] = block
        g[hi:, lo:hi] = block[:, hi - lo :].T
    return g


def wide(rank: int, width: int) -> bool:
    """An edit of ``rank`` at least half the key ``width``: its products are as costly as dense ones,
    so the patch defers them (``closed_form.patch_from_multipliers``) and the check works from one
    Gram of the weights (``check``); below it, the factors are cheaper."""
    return 2 * rank >= width


@dataclass(frozen=True)
class RightMultiplier:
    """``M − I = P Q`` for one input width: ``P [d_in, r]``, ``Q [r, d_in]``.

    A site's delta is ``(W₀ P) Q``: apply it with :meth:`up_for` and share ``Q`` across sites.
    """

    P: torch.Tensor
    Q: torch.Tensor
    full: bool = False
    """``Q`` is the identity (the edit has full rank): a site's delta ``W₀ P`` is stored dense."""

    @property
    def rank(self) -> int:
        return int(self.Q.shape[0])

    def up_for(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W₀ P`` for one site's weight ``[d_out, d_in]`` -> ``[d_out, r]`` in ``dtype`` (P's by
        default). The patch stores it in float32, so it asks for float32: ``Σ d_out·d_in·r`` per
        site over every site of a model costs half as much as in float64, P rounded once."""
        dtype = dtype or self.P.dtype
        p = self.P if self.P.dtype == dtype else self.P.to(dtype)
        return weight.to(device=p.device, dtype=dtype) @ p


@torch.no_grad()
def anchored_right_multiplier(
    target_keys: torch.Tensor,
    anchor_keys: torch.Tensor,
    preserve_keys: torch.Tensor,
    *,
    erase_scale: float,
    preserve_scale: float,
    lamb: float,
    dtype: torch.dtype = torch.float64,
    method: str = "closed-form",
) -> RightMultiplier:
    """Solve the anchored ridge problem once for all sites of this key width.

    ``target_keys`` / ``anchor_keys``: ``[R, d]`` paired rows (row r of a target maps to the
    original output of row r of its anchor); ``preserve_keys``: ``[R_p, d]``. Solved with a
    Cholesky factorisation of the symmetric ``A`` (never an explicit inverse) in ``dtype``.
    When more than d rows move, ``M − I`` is formed as one d × d product and kept whole (a dense
    edit per site); the key rows may stay in float32, they are converted chunk by chunk.
    """
    ce, ca, cp = target_keys, anchor_keys.to(target_keys.device), preserve_keys.to(target_keys.device)
    d = ce.shape[1]
    # few rows against a wide key (a DiT's 4096-wide T5 keys): the R × R (Woodbury) form, no d × d Grams
    woodbury = lamb > 0 and erase_scale >= 0 and preserve_scale >= 0 and 2 * (len(ce) + len(cp)) < d
    if not woodbury:
        g_ee, g_pp = gram(ce, dtype, remember=True), gram(cp, dtype, remember=True)
    # Rows whose target and anchor keys coincide (the shared start token, identical padding)
    # contribute nothing to P; drop them from P and Q but keep them in A, where they still act.
    moving = (ca - ce).abs().amax(dim=1) > 0
    if int(moving.sum()) > d:  # full rank: the d × d form (non-moving rows add 0 to C_aᵀC_e − C_eᵀC_e)
        return anchored_multiplier_from_grams(g_ee, cross_gram(ca, ce, dtype), g_pp, erase_scale=erase_scale,
                                              preserve_scale=preserve_scale, lamb=lamb, method=method,
                                              rows=(len(ce), len(cp)))
    if woodbury:
        q = _woodbury_key_factor(ce, cp, moving, erase_scale, preserve_scale, lamb, dtype, method)
        ce, ca = ce[moving].to(dtype), ca[moving].to(dtype)
        return RightMultiplier(P=erase_scale * (ca - ce).T, Q=q)
    chol = _ridge_cholesky(g_ee, g_pp, erase_scale, preserve_scale, lamb, method, (len(ce), len(cp)))
    ce, ca = ce[moving].to(dtype), ca[moving].to(dtype)
    q = torch.cholesky_solve(ce.T, chol).T  # C_e A⁻¹: [r, d] (A is symmetric)
    p = erase_scale * (ca - ce).T  # [d, r]
    check_finite(q, "the solved key factor", method)
    return RightMultiplier(P=p, Q=q)


def anchored_multiplier_from_grams(
    g_ee: torch.Tensor,
    g_ae: torch.Tensor,
    g_pp: torch.Tensor,
    *,
    erase_scale: float,
    preserve_scale: float,
    lamb: float,
    method: str = "closed-form",
    rows: tuple[int, int] | None = None,
) -> RightMultiplier:
    """The anchored solve from ``d × d`` statistics alone, kept whole (full rank):
    ``M − I = s (C_aᵀC_e − C_eᵀC_e) A⁻¹`` with ``A = λI + s C_eᵀC_e + s_p C_pᵀC_p``.

    ``g_ee = C_eᵀC_e``, ``g_ae = C_aᵀC_e``, ``g_pp = C_pᵀC_p`` in the solve precision; ``rows``
    (target, preserve row counts) only words the error message. For edits whose rows outnumber
    the width, and for callers that know the Grams without the rows (RECE's adversarial rows)."""
    chol = _ridge_cholesky(g_ee, g_pp, erase_scale, preserve_scale, lamb, method, rows)
    cross = g_ae - g_ee
    m = erase_scale * torch.cholesky_solve(cross.T, chol).T  # (cross A⁻¹)ᵀ = A⁻¹ crossᵀ
    return full_multiplier(check_finite(m, "the solved multiplier", method))


def _woodbury_key_factor(ce: torch.Tensor, cp: torch.Tensor, moving: torch.Tensor, erase_scale: float,
                         preserve_scale: float, lamb: float, dtype: torch.dtype, method: str) -> torch.Tensor:
    """``C_m A⁻¹`` (``[r, d]``, ``C_m`` the rows of ``C_e`` where ``moving``) for ``A = λI + UᵀU``,
    ``U = [√s C_e; √s_p C_p]`` (``R × d``, R < d/2), through the ``R × R`` system
    ``K = λI + UUᵀ``: since ``A⁻¹Uᵀ = UᵀK⁻¹`` and ``C_m`` is ``√s``-scaled rows of ``U``,
    ``C_m A⁻¹ = (K⁻¹U)[moving] / √s``. Costs ``R²d`` instead of the ``d × d`` Grams' ``Rd²`` and
    ``d³/3`` (d = 4096 for a DiT's T5 keys), and never divides by λ (the textbook
    ``(I − UᵀK⁻¹U)/λ`` loses digits as λ shrinks: 1e-5 off at λ 1e-8)."""
    u = torch.cat([ce.to(dtype) * erase_scale ** 0.5, cp.to(dtype) * preserve_scale ** 0.5])
    k = _self_gram(u.T)  # U Uᵀ from its upper block rows
    check_gram_finite(k, method, "target or preserved")
    k.diagonal().add_(lamb)
    chol, info = torch.linalg.cholesky_ex(k)
    if int(info) != 0:  # pragma: no cover - λ > 0 makes K positive definite
        raise NumericalError(f"{method}: the key system must be positive definite (lamb={lamb}).", input_name="lamb")
    if erase_scale > 0:
        q = torch.cholesky_solve(u, chol)[: len(ce)][moving] / erase_scale ** 0.5
    else:  # the target rows are not in U: the product form
        cm = ce[moving].to(dtype)
        q = (cm - torch.cholesky_solve(u @ cm.T, chol).T @ u) / lamb
    return check_finite(q, "the solved key factor", method)


def _ridge_cholesky(g_ee: torch.Tensor, g_pp: torch.Tensor, erase_scale: float, preserve_scale: float,
                    lamb: float, method: str, rows: tuple[int, int] | None) -> torch.Tensor:
    d = g_ee.shape[0]
    check_scalars(method, erase_scale=erase_scale, preserve_scale=preserve_scale, lamb=lamb)
    check_gram_finite(g_ee, method, "target")
    check_gram_finite(g_pp, method, "preserved")
    a = lamb * torch.eye(d, dtype=g_ee.dtype, device=g_ee.device) + erase_scale * g_ee + preserve_scale * g_pp
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        counts = f"{rows[0]} target rows, {rows[1]} preserved rows, " if rows else ""
        blame = "lamb" if lamb <= 0 else "erase_scale" if erase_scale < 0 else \
            "preserve_scale" if preserve_scale < 0 else "solve_dtype"
        fix = {"lamb": "Set 'lamb' above 0 (the papers use 0.5).",
               "erase_scale": "Set 'erase_scale' to 0 or more.", "preserve_scale": "Set 'preserve_scale' to 0 or more.",
               "solve_dtype": "Use solve_dtype float64 (the keys are too large for float32)."}[blame]
        raise NumericalError(
            f"{method}: the key system must be positive definite, but it is singular (lamb="
            f"{lamb}, {counts}width {d}). {fix}",
            input_name=blame,
        )
    return chol


def compact(p: torch.Tensor, q: torch.Tensor) -> RightMultiplier:
    """``P Q`` with rank at most ``d``: when ``P`` has more columns than rows, the product is
    formed once as a full-rank ``d × d`` multiplier."""
    d = p.shape[0]
    if p.shape[1] <= d:
        return RightMultiplier(P=p, Q=q)
    return full_multiplier(p @ q)


def full_multiplier(m: torch.Tensor) -> RightMultiplier:
    """A square ``M − I`` kept whole (``Q = I``): for edits whose rank reaches the key width, where
    factoring would cost an SVD and save nothing."""
    return RightMultiplier(P=m, Q=torch.eye(m.shape[0], dtype=m.dtype, device=m.device), full=True)


def factor_square(m: torch.Tensor, rank_bound: int | None = None) -> RightMultiplier:
    """A ``d x d`` matrix ``M − I`` (or any square edit) as low-rank factors ``P Q``.

    ``rank_bound``: a known upper bound of its rank; when it reaches ``d`` no SVD is tried."""
    if rank_bound is not None and rank_bound >= m.shape[0]:
        return full_multiplier(m)
    return RightMultiplier(*_svd_factors(m))


def _svd_factors(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(m)
    keep = s > s.max() * m.shape[0] * torch.finfo(m.dtype).eps if s.numel() else s > 0
    return u[:, keep] * s[keep], vh[keep]


def least_amplified_direction(w: torch.Tensor) -> torch.Tensor:
    """Unit ``v`` of the input space that ``w [d_out, d_in]`` amplifies least among its row space
    (the last right singular vector of the reduced SVD), from the eigen-decomposition of the
    smaller Gram matrix: several times faster than an SVD of ``w``."""
    dtype, w = w.dtype, w.float()  # a direction for augmentation noise: float32 is ample, and faster
    if w.shape[0] < w.shape[1]:
        _, vectors = torch.linalg.eigh(w @ w.T)
        v = w.T @ vectors[:, 0]
    else:
        _, vectors = torch.linalg.eigh(w.T @ w)
        v = vectors[:, 0]
    return (v / v.norm().clamp_min(torch.finfo(w.dtype).tiny)).to(dtype)


def solve_right(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``b a⁻¹`` for a square, possibly non-symmetric ``a`` (``torch.linalg.solve``, no inverse)."""
    return torch.linalg.solve(a.T, b.T).T


def ridge_preimage_rows(rows: torch.Tensor, gram_edited: torch.Tensor, cross: torch.Tensor, reg: float) -> torch.Tensor:
    """Rows ``x`` minimising ``Σ_l ‖W'_l x − W_l c‖² + reg ‖x‖²`` for each row ``c`` of ``rows [T, d]``.

    ``gram_edited = Σ_l W'_lᵀ W'_l`` and ``cross = Σ_l W'_lᵀ W_l`` (``[d, d]``, summed over the sites):
    ``x = (G' + reg I)⁻¹ X c``, written for rows as ``c Xᵀ (G' + reg I)⁻¹``. This is RECE's
    ``close_regzero`` adversarial embedding (arXiv 2407.12383): the input that the edited
    projections map closest to what the original ones made of ``c``.
    """
    eye = torch.eye(gram_edited.shape[0], dtype=gram_edited.dtype, device=gram_edited.device)
    try:
        return solve_right(gram_edited + reg * eye, rows @ cross.T)
    except RuntimeError as exc:  # torch.linalg.LinAlgError: singular system
        raise NumericalError(
            f"the adversarial embedding's system must be non-singular, but it is singular at reg={reg}. "
            "Raise the regularisation above 0.", input_name="reg") from exc


def low_eigen_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """Projector onto the eigenvectors of the symmetric ``cov`` whose eigenvalue is below
    ``threshold`` (SPEED's null space of the retain covariance)."""
    values, vectors = torch.linalg.eigh(cov)
    small = vectors[:, values < threshold]
    return small @ small.T


def low_eigen_projector_of_rows(rows: torch.Tensor, threshold: float) -> torch.Tensor:
    """:func:`low_eigen_projector` of the covariance ``rowsᵀrows / n`` of ``rows [n, d]``.

    With fewer rows than dimensions the covariance has rank at most ``n``: its eigenvalues outside
    the row space are 0 (below any positive threshold), so only an ``n × n`` eigenproblem inside the
    row space is solved. Same projector as the full ``d × d`` one, much faster for small ``n``.
    """
    n, d = rows.shape
    cov_scale = 1.0 / max(n, 1)
    if n >= d or threshold <= 0:
        return low_eigen_projector(rows.T @ rows * cov_scale, threshold)
    basis, _ = torch.linalg.qr(rows.T)  # [d, n]: orthonormal basis of the row space
    inside = rows @ basis  # [n, n]
    values, vectors = torch.linalg.eigh(inside.T @ inside * cov_scale)
    big = basis @ vectors[:, values >= threshold]
    return torch.eye(d, dtype=rows.dtype, device=rows.device) - big @ big.T


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 50) -> torch.Tensor:
    """Centroids ``[k, d]`` of the rows of ``x`` (Lloyd's algorithm, k-means++ start from
    ``generator``, so a fixed seed gives fixed centroids)."""
    first = int(torch.randint(len(x), (1,), generator=generator))
    centres = [x[first]]
    for _ in range(1, k):
        dist = torch.cdist(x, torch.stack(centres)).min(dim=1).values ** 2
        if float(dist.sum()) == 0:
            centres.append(x[int(torch.randint(len(x), (1,), generator=generator))])
            continue
        centres.append(x[int(torch.multinomial(dist / dist.sum(), 1, generator=generator))])
    c = torch.stack(centres)
    for _ in range(iterations):
        label = torch.cdist(x, c).argmin(dim=1)
        new = torch.stack([x[label == j].mean(0) if (label == j).any() else c[j] for j in range(k)])
        if torch.equal(new, c):
            break
        c = new
    return c
