"""MCB (grounding-mcb-attention §2.2): the circular convolution of two count sketches equals the
count sketch of the explicit outer product under the combined hash (h1 + h2) mod d, sign s1·s2."""

import pytest
import torch

from xray_match.models.mcb import CompactBilinearPooling, CountSketch


def explicit_outer_sketch(x, y, h1, s1, h2, s2, d):
    """Ψ(x ⊗ y) written out: every product x_i y_j goes to bucket (h1_i + h2_j) mod d with sign
    s1_i s2_j. Loops on purpose: an independent reference, not a second FFT."""
    out = torch.zeros(*x.shape[:-1], d, dtype=torch.float64)
    for i in range(x.shape[-1]):
        for j in range(y.shape[-1]):
            k = int(h1[i] + h2[j]) % d
            out[..., k] += float(s1[i] * s2[j]) * x[..., i].double() * y[..., j].double()
    return out


def _set(sketch: CountSketch, h, s):
    sketch.h.copy_(torch.tensor(h))
    sketch.s.copy_(torch.tensor(s, dtype=torch.float32))


def test_count_sketch_hand_computed():
    cs = CountSketch(3, 2)
    _set(cs, [0, 1, 0], [1, -1, -1])
    # Ψ(x)[0] = +1*x0 - 1*x2 = 1 - 3 = -2 ; Ψ(x)[1] = -1*x1 = -2
    assert torch.equal(cs(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([-2.0, -2.0]))


def test_mcb_hand_computed():
    mcb = CompactBilinearPooling(2, 2, 3)
    _set(mcb.sketch_x, [0, 2], [1, -1])
    _set(mcb.sketch_y, [1, 1], [1, 1])
    # x ⊗ y = [[3, 4], [6, 8]]; buckets: (0,0),(0,1) -> (0+1)%3 = 1 with +1: 3 + 4 = 7;
    # (1,0),(1,1) -> (2+1)%3 = 0 with -1: -6 - 8 = -14; bucket 2 gets nothing.
    out = mcb(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
    assert torch.allclose(out, torch.tensor([-14.0, 7.0, 0.0]), atol=1e-5)


@pytest.mark.parametrize("d", [16, 17, 64])  # odd d: irfft must be told n
def test_mcb_equals_sketch_of_explicit_outer_product(d):
    torch.manual_seed(0)
    mcb = CompactBilinearPooling(7, 5, d, seed=3)
    x, y = torch.randn(4, 7), torch.randn(4, 5)
    ref = explicit_outer_sketch(x, y, mcb.sketch_x.h, mcb.sketch_x.s, mcb.sketch_y.h, mcb.sketch_y.s, d)
    assert torch.allclose(mcb(x, y).double(), ref, atol=1e-4)


def test_broadcast_tiling_and_spectrum_reuse_equal_explicit_tiling():
    torch.manual_seed(1)
    mcb = CompactBilinearPooling(6, 4, 32)
    f = torch.randn(2, 3, 5, 6)  # (B, H, W, C) feature map, channels last
    t = torch.randn(3, 4)  # three queries
    qi = torch.tensor([0, 1, 1])  # query -> image
    got = mcb.combine(mcb.spectrum_x(f)[qi], mcb.spectrum_y(t)[:, None, None, :])  # (3, 3, 5, 32)
    tiled = t[:, None, None, :].expand(3, 3, 5, 4)  # the paper's explicit tiling
    assert torch.allclose(got, mcb(f[qi], tiled), atol=1e-5)


def test_hashes_are_buffers_seeded_saved_and_restored():
    a, b, c = CompactBilinearPooling(8, 4, 16, seed=0), CompactBilinearPooling(8, 4, 16, seed=0), CompactBilinearPooling(8, 4, 16, seed=1)
    sd = a.state_dict()
    assert set(sd) == {"sketch_x.h", "sketch_x.s", "sketch_y.h", "sketch_y.s"}
    assert all(torch.equal(sd[k], b.state_dict()[k]) for k in sd)  # same seed -> same Ψ on every rank
    assert not torch.equal(sd["sketch_x.h"], c.state_dict()["sketch_x.h"])
    c.load_state_dict(sd)
    x, y = torch.randn(2, 8), torch.randn(2, 4)
    assert torch.equal(a(x, y), c(x, y))
    assert set(sd["sketch_x.s"].unique().tolist()) <= {-1.0, 1.0} and int(sd["sketch_x.h"].max()) < 16
    assert list(a.parameters()) == []  # nothing to learn


def test_gradients_and_bf16_autocast():
    mcb = CompactBilinearPooling(5, 3, 8).double()
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: mcb(a, b), (x, y))
    mcb = CompactBilinearPooling(5, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mcb(torch.randn(2, 5).bfloat16(), torch.randn(2, 3))
    assert out.dtype == torch.float32


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="last dimension is 4, expected 5"):
        CountSketch(5, 8)(torch.randn(2, 4))


@pytest.mark.parametrize("d", [16, 33])
def test_fused_linear_equals_mcb_then_linear(d):
    torch.manual_seed(2)
    mcb = CompactBilinearPooling(6, 4, d, seed=5)
    w = torch.randn(3, d)
    x, y = torch.randn(2, 5, 6), torch.randn(2, 4)  # 2 queries, 5 pixels each
    a = mcb.fused_linear(y, w)  # (2, 6, 3)
    assert a.shape == (2, 6, 3)
    reference = mcb(x, y[:, None, :]) @ w.T  # the literal path: sketch, FFT, product, iFFT, linear
    assert torch.allclose(torch.bmm(x, a), reference, atol=1e-4)


def test_fused_gram_gives_the_norm_of_the_mcb_output():
    torch.manual_seed(4)
    mcb = CompactBilinearPooling(6, 4, 21, seed=1)
    x, y = torch.randn(2, 5, 6), torch.randn(2, 4)
    g = mcb.fused_gram(y)  # (2, 6, 6)
    z = mcb(x, y[:, None, :])  # (2, 5, 21)
    assert torch.allclose((torch.bmm(x, g) * x).sum(-1), z.pow(2).sum(-1), rtol=1e-4, atol=1e-4)
