"""Multimodal Compact Bilinear pooling (Fukui et al. 2016; Gao et al. 2016), as used in
grounding-mcb-attention §2.2: ``f' = Ψ(f) * Ψ(t) = FFT⁻¹(FFT(Ψ(f)) ⊙ FFT(Ψ(t)))``.

Ψ is the Count Sketch (Charikar et al. 2002): for an input ``x`` of size ``n`` it keeps a fixed
hash ``h: [n] -> [d]`` and sign ``s: [n] -> {-1, +1}`` and returns ``Ψ(x)[k] = Σ_{i: h(i)=k} s(i) x_i``.
The circular convolution of two sketches equals the sketch of the outer product ``x ⊗ y`` under the
combined hash ``(h1(i) + h2(j)) mod d`` and sign ``s1(i) s2(j)`` — which is why MCB approximates
bilinear pooling in ``d`` instead of ``n1 * n2`` dimensions (tests/test_mcb.py checks exactly this).

Why this file exists rather than a copied port: the widely copied PyTorch MCB ports either
multiply complex spectra as if they were real pairs or call ``torch.rfft``, removed in PyTorch
1.8. Here the spectra are true complex tensors from ``torch.fft.rfft``, multiplied with ``*``.

The hashes and signs are buffers: drawn once from a seeded generator (identical on every DDP rank
even before DDP's initial broadcast) and saved with the model, so a restored model sketches with
the same Ψ it was trained with.
"""

from __future__ import annotations

import torch
from torch import nn


class CountSketch(nn.Module):
    """Ψ: ``(..., n) -> (..., d)`` with a fixed random hash ``h`` and sign ``s`` (buffers)."""

    def __init__(self, n: int, d: int, generator: torch.Generator | None = None):
        super().__init__()
        if n < 1 or d < 1:
            raise ValueError(f"CountSketch: input size {n} and sketch size {d} must be >= 1")
        self.n, self.d = n, d
        self.register_buffer("h", torch.randint(0, d, (n,), generator=generator))  # (n,) in [0, d)
        self.register_buffer("s", torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1)  # (n,) ±1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"CountSketch: last dimension is {x.shape[-1]}, expected {self.n}")
        if x.dtype != torch.float64:
            x = x.float()  # half precision would lose the sums; float64 stays (gradcheck)
        out = x.new_zeros(*x.shape[:-1], self.d)  # (..., d)
        # scatter-add instead of a dense (n, d) sketch matrix: O(n) per vector, not O(n d)
        return out.index_add_(-1, self.h, x * self.s.to(x.dtype))

    def extra_repr(self) -> str:
        return f"n={self.n}, d={self.d}"


class CompactBilinearPooling(nn.Module):
    """MCB: ``(..., n1) x (..., n2) -> (..., d)``; leading dimensions broadcast.

    §2.2: ``f' = FFT⁻¹(FFT(Ψ1(x)) ⊙ FFT(Ψ2(y)))``, the circular convolution of the two sketches.
    ``spectrum_x`` / ``spectrum_y`` / ``combine`` split the computation so that a caller can
    sketch a feature map once and combine it with several queries (the grounding model does).
    The FFTs run in float32 with autocast off (cuFFT has no bf16, and half-precision FFTs need
    power-of-two sizes).
    """

    def __init__(self, n1: int, n2: int, d: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.d = d
        self.sketch_x = CountSketch(n1, d, g)
        self.sketch_y = CountSketch(n2, d, g)

    def _fft(self, sketch: CountSketch, v: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=v.device.type, enabled=False):
            return torch.fft.rfft(sketch(v), n=self.d, dim=-1)  # (..., d//2 + 1) complex

    def spectrum_x(self, x: torch.Tensor) -> torch.Tensor:
        return self._fft(self.sketch_x, x)

    def spectrum_y(self, y: torch.Tensor) -> torch.Tensor:
        return self._fft(self.sketch_y, y)

    def combine(self, fx: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
        """Elementwise complex product of two spectra, back to the signal domain: ``(..., d)``."""
        with torch.autocast(device_type=fx.device.type, enabled=False):
            return torch.fft.irfft(fx * fy, n=self.d, dim=-1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.combine(self.spectrum_x(x), self.spectrum_y(y))

    def fused_linear(self, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``A(y)`` (..., n1, k) with ``MCB(x, y) @ weight.T == x @ A(y)`` exactly, for every ``x``.

        A linear map after MCB re-associates: with ``z = Ψ1(x) ⊛ Ψ2(y)`` (circular convolution),
        ``z[m] = Σ_i s1(i) x_i Ψ2(y)[(m - h1(i)) mod d]``, hence
        ``(W z)_o = Σ_i x_i · s1(i) · G[o, h1(i)]`` with ``G[o, p] = Σ_m W[o, m] Ψ2(y)[(m - p) mod d]``,
        the circular cross-correlation of each row of ``W`` with ``Ψ2(y)``, computed by FFT as
        ``irfft(rfft(W) ⊙ conj(rfft(Ψ2(y))))``. Per query this costs ``k · d log d`` once instead of
        a d-point FFT pair per pixel, and never materialises the (..., H, W, d) tensor — the same
        numbers (tests/test_mcb.py) at a fraction of the cost. ``y`` (..., n2), ``weight`` (k, d).
        """
        if weight.shape[-1] != self.d:
            raise ValueError(f"fused_linear: weight has {weight.shape[-1]} inputs, MCB has d={self.d}")
        fy = self.spectrum_y(y)  # (..., F)
        with torch.autocast(device_type=fy.device.type, enabled=False):
            fw = torch.fft.rfft(weight.float(), n=self.d, dim=-1)  # (k, F)
            g = torch.fft.irfft(fw * fy.conj()[..., None, :], n=self.d, dim=-1)  # (..., k, d)
            a = g[..., self.sketch_x.h] * self.sketch_x.s  # (..., k, n1)
        return a.transpose(-1, -2)  # (..., n1, k)

    def fused_gram(self, y: torch.Tensor) -> torch.Tensor:
        """``G(y)`` (..., n1, n1) with ``||MCB(x, y)||² == x G(y) xᵀ`` exactly, for every ``x``.

        ``MCB(x, y) = x B`` with ``B[i, m] = s1(i) Ψ2(y)[(m - h1(i)) mod d]``, so ``G = B Bᵀ`` and
        ``G[i, j] = s1(i) s1(j) R[(h1(i) - h1(j)) mod d]`` with ``R`` the circular autocorrelation
        of ``Ψ2(y)``, ``irfft(|rfft(Ψ2(y))|²)``: the per-pixel L2 norm of the MCB output without
        forming it (for the normalisation of Gao et al. / Fukui et al., fused)."""
        fy = self.spectrum_y(y)  # (..., F)
        with torch.autocast(device_type=fy.device.type, enabled=False):
            r = torch.fft.irfft(fy.real.pow(2) + fy.imag.pow(2), n=self.d, dim=-1)  # (..., d)
            h, s = self.sketch_x.h, self.sketch_x.s
            lag = (h[:, None] - h[None, :]) % self.d  # (n1, n1)
            return r[..., lag] * (s[:, None] * s[None, :])  # (..., n1, n1)

    def extra_repr(self) -> str:
        return f"n1={self.sketch_x.n}, n2={self.sketch_y.n}, d={self.d}"


__all__ = ["CountSketch", "CompactBilinearPooling"]
