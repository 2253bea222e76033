"""Float64 references for hedgehog / window-hybrid / nystrom / performer / focused / agent that build the N×N attention
matrix explicitly (masks, landmarks and convolutions written out). Tests only: O(N²) memory on purpose, and
written independently of the modules (loops and explicit masks instead of shifts, matmul tricks and convs).
"""

from __future__ import annotations

import math

import torch


def _apply(a: torch.Tensor, v: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Row-normalise the (B,H,N,M) weights and apply them to v (B,H,M,Dv)."""
    return torch.einsum("bhnm,bhme->bhne", a, v.double()) / (a.sum(-1, keepdim=True) + eps)


def hedgehog_reference(q, k, v, weight_q, weight_k, eps: float = 1e-6) -> torch.Tensor:
    def phi(x, w):
        z = torch.einsum("bhnd,hdf->bhnf", x.double(), w.double())
        e = torch.cat([z, -z], -1)
        e = torch.exp(e - e.amax(-1, keepdim=True))
        return e / e.sum(-1, keepdim=True)

    a = torch.einsum("bhnf,bhmf->bhnm", phi(q, weight_q), phi(k, weight_k))
    return _apply(a, v, eps)


def window_exact_mask(n: int, prefix: int, h: int, w: int, window: int) -> torch.Tensor:
    """(N, N) bool: which (query, key) pairs window-hybrid attends to exactly."""
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:prefix, :] = True
    mask[:, :prefix] = True
    r = window // 2
    for i in range(h * w):
        yi, xi = divmod(i, w)
        for j in range(h * w):
            yj, xj = divmod(j, w)
            if abs(yi - yj) <= r and abs(xi - xj) <= r:
                mask[prefix + i, prefix + j] = True
    return mask


def window_hybrid_reference(q, k, v, scale, prefix, grid, window, gamma, eps: float = 1e-6) -> torch.Tensor:
    """a = exp(s·qk − max over the exact set) there; b = γ φq·φk / (φq·mean_patches φk) elsewhere."""
    q, k = q.double(), k.double()
    n = q.shape[2]
    exact = window_exact_mask(n, prefix, grid[0], grid[1], window)
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    m = scores.masked_fill(~exact, -math.inf).amax(-1, keepdim=True)
    a = torch.exp(scores - m) * exact
    elu1 = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
    lin = torch.einsum("bhnd,bhmd->bhnm", elu1(q), elu1(k))
    mean_k = lin[..., prefix:].mean(-1, keepdim=True)
    g = torch.as_tensor(gamma, dtype=torch.float64).view(1, -1, 1, 1)
    b = g * lin / mean_k * ~exact
    return _apply(a + b, v, eps)


def nystrom_reference(q, k, v, scale, landmarks, pinv_iterations: int = 6) -> torch.Tensor:
    q, k, vv = q.double(), k.double(), v.double()
    n = q.shape[2]
    if n <= landmarks:
        a = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", q, k) * scale, -1)
        return _apply(a, vv)
    segs = [(i * n // landmarks, (i + 1) * n // landmarks) for i in range(landmarks)]
    q_l = torch.stack([q[:, :, s:e].mean(2) for s, e in segs], 2)
    k_l = torch.stack([k[:, :, s:e].mean(2) for s, e in segs], 2)
    f = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", q, k_l) * scale, -1)
    a = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", q_l, k_l) * scale, -1)
    bm = torch.softmax(torch.einsum("bhnd,bhmd->bhnm", q_l, k) * scale, -1)
    if pinv_iterations == 0:
        z = torch.linalg.pinv(a)
    else:
        z = torch.empty_like(a)
        eye = torch.eye(landmarks, dtype=torch.float64)
        for bi in range(a.shape[0]):
            for hi in range(a.shape[1]):
                am = a[bi, hi]
                zm = am.T / (torch.linalg.matrix_norm(am, 1) * torch.linalg.matrix_norm(am, math.inf))
                for _ in range(pinv_iterations):
                    az = am @ zm
                    zm = 0.25 * zm @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
                z[bi, hi] = zm
    full = f @ z @ bm  # the explicit (N, N) approximate attention matrix
    return torch.einsum("bhnm,bhme->bhne", full, vv)


def performer_reference(q, k, v, projection, scale, kernel_eps: float = 1e-4, eps: float = 1e-6) -> torch.Tensor:
    w = projection.double()
    m = w.shape[0]

    def phi(x, per_query):
        x = x.double() * math.sqrt(scale)
        z = torch.einsum("bhnd,md->bhnm", x, w) - 0.5 * (x**2).sum(-1, keepdim=True)
        c = z.amax(-1, keepdim=True) if per_query else z.amax((-2, -1), keepdim=True)
        return (torch.exp(z - c) + kernel_eps) / math.sqrt(m)

    a = torch.einsum("bhnf,bhmf->bhnm", phi(q, True), phi(k, False))
    return _apply(a, v, eps)


def focused_reference(q, k, v, feature_scale, p, dwc_weight, dwc_bias, prefix, grid, eps: float = 1e-6):
    """Focused linear attention as an explicit N×N matrix, plus the depthwise conv written as a neighbour sum."""
    s = torch.nn.functional.softplus(feature_scale.double())  # (H, 1, D)

    def phi(x):
        r = torch.relu(x.double() / s) + 1e-6
        rp = r**p
        return r.norm(dim=-1, keepdim=True) * rp / rp.norm(dim=-1, keepdim=True)

    a = torch.einsum("bhnd,bhmd->bhnm", phi(q), phi(k))
    out = _apply(a, v, eps)
    h, w = grid
    kernel = dwc_weight.shape[-1]
    r = kernel // 2
    vv = v.double()
    wt, bias = dwc_weight.double()[:, 0], dwc_bias.double()  # (D, kh, kw), (D,)
    conv = torch.zeros_like(out[:, :, prefix:]) + bias
    for i in range(h * w):
        yi, xi = divmod(i, w)
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                yj, xj = yi + dy, xi + dx
                if 0 <= yj < h and 0 <= xj < w:
                    conv[:, :, i] += wt[:, dy + r, dx + r] * vv[:, :, prefix + yj * w + xj]
    return torch.cat([out[:, :, :prefix], out[:, :, prefix:] + conv], dim=2)


def linear_options_reference(q, k, v, log_tau, conv_weight, conv_bias, prefix: int, h: int, w: int,
                             eps: float = 1e-6, dilation: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """linear-elu with ``temperature`` (per-head scales on q, k before φ) and ``dwc`` (depthwise conv over V on
    the patch grid, added to patch tokens, its taps ``dilation`` patches apart), written out: the N×N kernel
    matrix and the conv as explicit loops."""
    q, k, v = q.double(), k.double(), v.double()
    b, heads, n, d = v.shape
    if log_tau is not None:
        q = q * log_tau[0].double().exp().view(1, heads, 1, 1)
        k = k * log_tau[1].double().exp().view(1, heads, 1, 1)

    def phi(x):
        return torch.where(x > 0, x + 1, torch.exp(x))

    out = _apply(torch.einsum("bhnd,bhmd->bhnm", phi(q), phi(k)), v, eps)
    if conv_weight is not None:
        conv = _dwc_loops(v, conv_weight, conv_bias, prefix, h, w, dilation)
        out = torch.cat([out[:, :, :prefix], out[:, :, prefix:] + conv], 2)
    return out


def _dwc_loops(v, conv_weight, conv_bias, prefix: int, h: int, w: int, dilation: tuple[int, int] = (1, 1)
               ) -> torch.Tensor:
    """A zero-padded depthwise conv over the patch tokens of V (B, H, N, D) on the h×w grid, as explicit loops,
    tap (dy, dx) reading the patch dy·dilation[0] rows and dx·dilation[1] columns away; channel c of the conv is
    head c // D, dimension c % D. Returns (B, H, h·w, D)."""
    v = v.double()
    b, heads, _, d = v.shape
    size = conv_weight.shape[-1]
    r = size // 2
    vg = v[:, :, prefix:].transpose(1, 2).reshape(b, h, w, heads * d)  # channel c = head * d + j
    conv = torch.zeros_like(vg)
    for y in range(h):
        for x in range(w):
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    yy, xx = y + dy * dilation[0], x + dx * dilation[1]
                    if 0 <= yy < h and 0 <= xx < w:
                        conv[:, y, x] += vg[:, yy, xx] * conv_weight[:, 0, dy + r, dx + r].double()
            conv[:, y, x] += conv_bias.double()
    return conv.reshape(b, h * w, heads, d).transpose(1, 2)


def _cell_means(x: torch.Tensor, h: int, w: int, cells: int) -> torch.Tensor:
    """(P, D) patch rows of an h×w grid -> (cells², D): the mean of each adaptive-pooling cell, rows
    [⌊i·h/c⌋, ⌈(i+1)·h/c⌉) × columns [⌊j·w/c⌋, ⌈(j+1)·w/c⌉), written out cell by cell."""
    grid = x.reshape(h, w, -1)
    out = []
    for i in range(cells):
        for j in range(cells):
            r0, r1 = (i * h) // cells, -((-(i + 1) * h) // cells)
            c0, c1 = (j * w) // cells, -((-(j + 1) * w) // cells)
            out.append(grid[r0:r1, c0:c1].reshape(-1, x.shape[-1]).mean(0))
    return torch.stack(out)


def _lloyd_loops(points: torch.Tensor, centres: torch.Tensor, iterations: int) -> torch.Tensor:
    """k-means by explicit loops: each point to its nearest centre (squared distance), each centre to the mean of
    its points (unchanged when it has none)."""
    for _ in range(iterations):
        dist = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
        nearest = dist.argmin(1)
        new = centres.clone()
        for c in range(centres.shape[0]):
            members = points[nearest == c]
            if len(members):
                new[c] = members.mean(0)
        centres = new
    return centres


@torch.no_grad()
def agent_reference(q, k, v, scale, prefix: int, grid: tuple[int, int], agents: int, kmeans: int,
                    log_tau=None, conv_weight=None, conv_bias=None, kmeans_stride: int = 1,
                    dilation: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """Agent attention as the explicit (N, N) matrix softmax(τq·s·q Aᵀ)·softmax(τa·s·A Kᵀ) for patch queries and
    exact softmax rows for prefix queries; agents A = [prefix queries; k-means of the patch queries at every
    ``kmeans_stride``-th grid row and column, started from the grid cells' means], one (batch, head) at a time."""
    q, k, v = q.double(), k.double(), v.double()
    b, heads, n, d = q.shape
    h, w = grid
    attn = torch.zeros(b, heads, n, n, dtype=torch.float64)
    for bi in range(b):
        for hi in range(heads):
            tq = 1.0 if log_tau is None else math.exp(float(log_tau[0, hi]))
            ta = 1.0 if log_tau is None else math.exp(float(log_tau[1, hi]))
            qs, ks = q[bi, hi], k[bi, hi]
            points = [qs[prefix + y * w + x] for y in range(0, h, kmeans_stride) for x in range(0, w, kmeans_stride)]
            centres = _lloyd_loops(torch.stack(points), _cell_means(qs[prefix:], h, w, agents), kmeans)
            a = torch.cat([qs[:prefix], centres])
            to_keys = torch.softmax(ta * scale * a @ ks.T, -1)  # (M, N)
            to_agents = torch.softmax(tq * scale * qs[prefix:] @ a.T, -1)  # (P, M)
            attn[bi, hi, prefix:] = to_agents @ to_keys
            attn[bi, hi, :prefix] = torch.softmax(scale * qs[:prefix] @ ks.T, -1)
    out = torch.einsum("bhnm,bhme->bhne", attn, v)
    if conv_weight is not None:
        out[:, :, prefix:] += _dwc_loops(v, conv_weight, conv_bias, prefix, h, w, dilation)
    return out
