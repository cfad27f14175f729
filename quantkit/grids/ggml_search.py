"""ggml's scale searches for its block formats, vectorised over groups.

Every function works on ``x`` shaped ``(..., n)``: the leading dimensions are independent groups,
``n`` the weights of one group. They follow ggml-quants.c step for step so that our files equal
llama.cpp's byte for byte:
  * sums run element by element in fp32 in ggml's order (``sequential_sum``): a tree or fp64 sum
    rounds differently and flips ties between candidate scales;
  * ``scalar / tensor`` goes through ``rdiv`` (torch computes it as reciprocal * scalar);
  * ``sqrtf`` goes through fp64 and back (torch's fp32 sqrt kernel can be an ulp off).
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15


def rdiv(numerator: float, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` as one IEEE fp32 division (torch computes ``scalar / tensor`` as
    ``reciprocal * scalar``, which rounds twice and breaks bit-exactness with ggml)."""
    return torch.full_like(denominator, numerator) / denominator


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even in fp32 (valid for |x| < 2^22)."""
    return torch.round(x)


def sqrtf(x: torch.Tensor) -> torch.Tensor:
    """C's correctly rounded fp32 sqrt (fp64 sqrt rounded to fp32 is exact for fp32 inputs)."""
    return torch.sqrt(x.double()).float()


def sequential_sum(terms: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim one term at a time in fp32, from 0, as ggml's ``s += ...`` loops do.

    Terms computed elementwise first round exactly as C's per-iteration products (no FMA in ggml-base).
    """
    total = torch.zeros(terms.shape[:-1], dtype=torch.float32)
    for i in range(terms.shape[-1]):
        total = total + terms[..., i]
    return total


def positive_max(x: torch.Tensor) -> torch.Tensor:
    """``m = 0; for v in x: if (v > m) m = v`` over the last dim: never -0.0, never below 0."""
    top = x.amax(-1)
    return torch.where(top > 0, top, torch.zeros_like(top))


def signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude over the last dim, sign kept; the first one on ties, as ggml."""
    return torch.gather(x, -1, x.abs().argmax(-1, keepdim=True))[..., 0]


def imatrix_weights(x: torch.Tensor, importance: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """ggml's per-weight error weights under an importance matrix: ``qw * sqrtf(sigma2 + x^2)``.

    The sigma2 term keeps small weights from counting for nothing: with ``qw`` alone a weight near
    zero in an important column would barely pull on the scale.
    """
    return importance * sqrtf(sigma2 + x * x)


def make_qx_quants(x: torch.Tensor, nmax: int,
                   weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's symmetric scale search (``make_qx_quants``, rmse_type 1): 19 candidate scales around
    ``-nmax / signed_max``, each refit by weighted least squares; weights default to x^2.

    Returns (scale (...), L (..., n) in [0, 2*nmax)) with x ~ scale * (L - nmax); all-zero groups get
    scale 0 and L = 0, as ggml writes them.
    """
    weights = x * x if weights is None else weights.expand_as(x)
    empty = x.abs().amax(-1) < GROUP_MAX_EPS
    safe_max = torch.where(empty, torch.ones_like(x[..., 0]), signed_absmax(x))

    def trial(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = nearest_int(iscale[..., None] * x).clamp(-nmax, nmax - 1)
        return levels, sequential_sum(weights * x * levels), sequential_sum(weights * levels * levels)

    levels, sumlx, suml2 = trial(rdiv(-nmax, safe_max))
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s != 0]:
        cand, sumlx, suml2 = trial(rdiv(-(nmax + np.float32(0.1) * step), safe_max))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        levels = torch.where(better[..., None], cand, levels)
        scale = torch.where(better, sumlx / torch.where(suml2 > 0, suml2, 1.0), scale)
        best = torch.where(better, scale * sumlx, best)
    levels = torch.where(empty[..., None], torch.zeros_like(levels), levels + nmax)
    return torch.where(empty, torch.zeros_like(scale), scale), levels


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's symmetric search with x^2 weights and coordinate refinement (do_rmse), vectorized over
    leading dims of x (..., n). Returns (scale, L in [0, 2*nmax)); all-zero groups get L = 0."""
    amax = x.abs().amax(-1)
    empty = amax < GROUP_MAX_EPS
    iscale = rdiv(-nmax, torch.where(empty, torch.ones_like(amax), signed_absmax(x)))
    levels = nearest_int(iscale[..., None] * x).clamp(-nmax, nmax - 1)
    weights = x * x
    sumlx = sequential_sum(weights * x * levels)
    suml2 = sequential_sum(weights * levels * levels)
    for _ in range(5):  # a pass without changes leaves the state as it was, so all five passes are safe
        for i in range(x.shape[-1]):
            w, xi, li = weights[..., i], x[..., i], levels[..., i]
            slx = sumlx - w * xi * li
            sl2 = suml2 - w * li * li
            new_l = nearest_int(xi * sl2 / torch.where(slx > 0, slx, 1.0)).clamp(-nmax, nmax - 1)
            slx2 = slx + w * xi * new_l
            sl22 = sl2 + w * new_l * new_l
            take = (slx > 0) & (new_l != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            levels[..., i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
    levels = torch.where(empty[..., None], torch.zeros_like(levels), levels + nmax)
    return torch.where(empty, 0.0, scale), levels


def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's asymmetric (scale, min) search (``make_qkx2_quants``; ``make_qkx3_quants`` is the same
    search with caller-given weights), vectorized over leading dims of x (..., n).

    Returns (scale, the_min, L in [0, nmax]) with x ~ scale * L - the_min.
    """
    n = x.shape[-1]
    weights = weights.expand_as(x)
    sum_w, sum_x = weights[..., 0], weights[..., 0] * x[..., 0]
    for i in range(1, n):
        sum_w = sum_w + weights[..., i]
        sum_x = sum_x + weights[..., i] * x[..., i]
    lo = x.amin(-1).clamp(max=0)
    hi = x.amax(-1)
    flat = hi == lo

    def levels_for(iscale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
        return nearest_int(iscale[..., None] * (x - minimum[..., None])).clamp(0, nmax)

    def span(minimum: torch.Tensor) -> torch.Tensor:
        # ggml keeps searching from the best (scale, min) so far: later steps use the updated min
        return torch.where(flat, torch.ones_like(hi), hi - minimum)

    def weighted_error(scale, minimum, levels) -> torch.Tensor:
        diff = scale[..., None] * levels + minimum[..., None] - x
        return sequential_sum(weights * (diff.abs() if use_mad else diff * diff))

    minimum = lo
    iscale = rdiv(nmax, span(minimum))
    scale = rdiv(1.0, iscale)
    levels = levels_for(iscale, minimum)
    best_error = weighted_error(scale, minimum, levels)
    for step in range(nstep + 1):
        cand = levels_for(rdiv(np.float32(rmin) + np.float32(rdelta) * step + nmax, span(minimum)), minimum)
        sum_l = sequential_sum(weights * cand)
        sum_l2 = sequential_sum(weights * cand * cand)
        sum_xl = sequential_sum(weights * cand * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe_det = torch.where(ok, det, 1.0)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / torch.where(sum_l2 > 0, sum_l2, 1.0), this_scale)
        this_min = torch.where(positive, 0.0, this_min)
        error = weighted_error(this_scale, this_min, cand)
        better = ok & (error < best_error)
        levels = torch.where(better[..., None], cand, levels)
        best_error = torch.where(better, error, best_error)
        scale = torch.where(better, this_scale, scale)
        minimum = torch.where(better, this_min, minimum)
    levels = torch.where(flat[..., None], torch.zeros_like(levels), levels)
    scale = torch.where(flat, 0.0, scale)
    return scale, -minimum, levels


def make_qp_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's search for non-negative levels (``make_qp_quants``, used for the sub-block scales and
    mins of k-quants under an importance matrix): the best of 9 scales around ``nmax / max`` by
    weighted error, then refined one level at a time.

    Returns (scale, L in [0, nmax]) with x ~ scale * L; groups below GROUP_MAX_EPS get (0, 0).
    """
    weights = weights.expand_as(x)
    top = positive_max(x)
    empty = top < GROUP_MAX_EPS
    safe_top = torch.where(empty, torch.ones_like(top), top)

    def mse(iscale: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        diff = x - rdiv(1.0, iscale)[..., None] * levels
        return sequential_sum(weights * diff * diff)

    iscale = rdiv(nmax, safe_top)
    best = mse(iscale, nearest_int(iscale[..., None] * x))  # the first try is not capped at nmax in ggml
    for step in [s for s in range(-4, 5) if s != 0]:
        trial = rdiv(np.float32(0.1) * step + nmax, safe_top)
        error = mse(trial, nearest_int(trial[..., None] * x).clamp(max=nmax))
        better = error < best
        best = torch.where(better, error, best)
        iscale = torch.where(better, trial, iscale)
    levels = nearest_int(iscale[..., None] * x).clamp(max=nmax)
    sumlx = sequential_sum(weights * x * levels)
    suml2 = sequential_sum(weights * levels * levels)
    for _ in range(5):  # as in make_q3_quants, passes without changes are no-ops
        for i in range(x.shape[-1]):
            w, xi, li = weights[..., i], x[..., i], levels[..., i]
            slx = sumlx - w * xi * li
            sl2 = suml2 - w * li * li
            ok = (slx > 0) & (sl2 > 0)
            new_l = nearest_int(xi * sl2 / torch.where(ok, slx, 1.0)).clamp(max=nmax)
            slx2 = slx + w * xi * new_l
            sl22 = sl2 + w * new_l * new_l
            take = ok & (new_l != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            levels[..., i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1.0), 0.0)
    levels = torch.where(empty[..., None], torch.zeros_like(levels), levels)
    return torch.where(empty, torch.zeros_like(scale), scale), levels
