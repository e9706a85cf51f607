"""The fused C loops against plain torch arithmetic, element by element, for every input/output
kind mix, and their argument checks (a wrong buffer size must be an error, never a stray write)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ckptops.hdr import fused

if fused._fused is None:
    pytestmark = pytest.mark.skipif(os.environ.get("CKPTOPS_REQUIRE_FUSED") != "1",
                                    reason="the fused extension is not built")

N = 5000


def _inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, generator=g) * 0.02
    values = {
        "h": base + torch.randn(N, generator=g) * 0.01,
        "b": base,
        "t": base + torch.randn(N, generator=g) * 0.004,
    }
    values["h"][:50] = values["b"][:50]  # tau == 0
    values["t"][40:60] = -0.0  # signed zeros in the target, half of them where tau == 0
    return values


def _as_kind(x: torch.Tensor, bf16: bool):
    """(buffer, kind, the float32 values the loop sees)."""
    if bf16:
        y = x.to(torch.bfloat16)
        return y.view(torch.int16).numpy().tobytes(), fused.KIND_BF16, y.float()
    return x.numpy().tobytes(), fused.KIND_F32, x.clone()


# (0, 0, 1, 1): tau_H from a LoRA adapter; (1, 1, 0, 1): a "base + adapter" target
APPLY_KINDS = [(1, 1, 1, 1), (0, 0, 0, 0), (1, 1, 1, 0), (1, 0, 1, 1), (0, 1, 0, 1), (0, 0, 1, 0), (0, 0, 1, 1), (1, 1, 0, 1)]


@pytest.mark.parametrize("kinds", APPLY_KINDS)
@pytest.mark.parametrize("shrink", [None, 0.0, 0.015])
@pytest.mark.parametrize("scale", [3.0, 0.1])
def test_apply_matches_torch(kinds, shrink, scale):
    v = _inputs(1)
    (h, hk, hf), (b, bk, bf), (t, tk, tf) = (_as_kind(v[k], bool(kind)) for k, kind in zip("hbt", kinds))
    out_bf16 = bool(kinds[3])
    out = bytearray(N * (2 if out_bf16 else 4))
    finite, changed = fused.apply(h, hk, b, bk, t, tk, N, shrink, scale, out, int(out_bf16))

    tau = hf - bf
    selected = tau if shrink is None else torch.hardshrink(tau, shrink)
    expected = tf - selected * scale
    if out_bf16:
        got = torch.frombuffer(out, dtype=torch.int16)
        want = expected.to(torch.bfloat16).view(torch.int16)
    else:
        got = torch.frombuffer(out, dtype=torch.int32)
        want = expected.view(torch.int32)
    assert finite is True
    assert changed == bool((selected != 0).any())
    assert torch.equal(got, want)


@pytest.mark.parametrize("kinds", APPLY_KINDS)
def test_apply_sums_match_float64_sums(kinds):
    """The drift sums every loop variant adds: sum d^2, tau^2, d.tau, (M tau)^2, d.(M tau) with
    d = t - b, in float64 (independent numpy sums; only the summation order differs)."""
    import numpy as np

    v = _inputs(2)
    (h, hk, hf), (b, bk, bf), (t, tk, tf) = (_as_kind(v[k], bool(kind)) for k, kind in zip("hbt", kinds))
    out = bytearray(N * (2 if kinds[3] else 4))
    sums = np.zeros(5)
    fused.apply(h, hk, b, bk, t, tk, N, 0.015, 3.0, out, kinds[3], sums)
    tau = (hf - bf).numpy().astype(np.float64)
    masked = np.where(np.abs(tau) > np.float32(0.015), tau, 0.0)
    d = tf.numpy().astype(np.float64) - bf.numpy().astype(np.float64)
    want = [np.sum(d * d), np.sum(tau * tau), np.sum(d * tau), np.sum(masked * masked), np.sum(d * masked)]
    np.testing.assert_allclose(sums, want, rtol=1e-9, atol=1e-12)


def test_apply_reports_overflow_and_unchanged():
    h, hk, _ = _as_kind(torch.full((N,), 3e38), False)
    b, bk, _ = _as_kind(torch.full((N,), -3e38), False)
    t, tk, _ = _as_kind(torch.zeros(N), False)
    out = bytearray(N * 4)
    assert fused.apply(h, hk, b, bk, t, tk, N, None, 3.0, out, 0) == (False, True)
    zeros, zk, _ = _as_kind(torch.zeros(N), True)
    assert fused.apply(zeros, zk, zeros, zk, zeros, zk, N, 0.5, 3.0, bytearray(N * 2), 1) == (True, False)


@pytest.mark.parametrize("kinds", [(1, 1), (0, 0), (1, 0), (0, 1)])
def test_band_count_matches_a_plain_count(kinds):
    v = _inputs(2)
    (h, hk, hf), (b, bk, bf) = (_as_kind(v[k], bool(kind)) for k, kind in zip("hb", kinds))
    bits = (hf - bf).abs().view(torch.int32)
    lo = int(torch.kthvalue(bits, int(0.85 * N)).values)
    size = 4096
    hist = np.zeros(size + 2, dtype=np.int64)
    finite, peak = fused.band_count(h, hk, b, bk, N, lo, size, hist)
    expected = np.zeros(size + 2, dtype=np.int64)
    for x in bits.tolist():
        expected[0 if x < lo else size + 1 if x >= lo + size else x - lo + 1] += 1
    assert finite is True
    assert hist.tolist() == expected.tolist()
    assert peak == (lo + size if expected[-1] else int(bits[(bits >= lo) & (bits < lo + size)].max()))


def test_band_count_flags_nonfinite_tau():
    h = torch.zeros(N)
    h[123] = float("inf")
    hb, hk, _ = _as_kind(h, False)
    zb, zk, _ = _as_kind(torch.zeros(N), True)
    finite, _ = fused.band_count(hb, hk, zb, zk, N, 0, 16, np.zeros(18, dtype=np.int64))
    assert finite is False


def test_buffer_sizes_and_arguments_are_checked():
    small = bytes(10)
    ok = bytes(N * 4)
    with pytest.raises(ValueError, match="needed"):
        fused.apply(small, 0, ok, 0, ok, 0, N, None, 3.0, bytearray(N * 4), 0)
    with pytest.raises(ValueError, match="needed"):
        fused.apply(ok, 0, ok, 0, ok, 0, N, None, 3.0, bytearray(N), 0)
    with pytest.raises(ValueError, match="kind"):
        fused.apply(ok, 7, ok, 0, ok, 0, N, None, 3.0, bytearray(N * 4), 0)
    with pytest.raises(ValueError, match="shrink"):
        fused.apply(ok, 0, ok, 0, ok, 0, N, -1.0, 3.0, bytearray(N * 4), 0)
    with pytest.raises(ValueError, match="band"):
        fused.band_count(ok, 0, ok, 0, N, 2**31 - 8, 16, np.zeros(18, dtype=np.int64))
    with pytest.raises(ValueError, match="band"):
        fused.band_count(ok, 0, ok, 0, N, 0, 16, np.zeros(10, dtype=np.int64))
    with pytest.raises((TypeError, BufferError)):
        fused.band_count(ok, 0, ok, 0, N, 0, 16, bytes(18 * 8))  # read-only histogram


@pytest.mark.parametrize("rows,rank,cols", [(7, 1, 5), (64, 16, 96), (33, 8, 130), (2, 64, 31)])
@pytest.mark.parametrize("post_scale", [1.0, 0.75])
def test_lora_rows_sums_the_rank_in_order(rows, rank, cols, post_scale):
    """The LoRA product loop: each element is fl(...fl(fl(l0 r0) + fl(l1 r1))...) * post_scale in
    float32 (no fused multiply-add), whatever the blocking - checked against that sum written out
    in numpy, and within float32 rounding of a float64 product."""
    import numpy as np

    if not fused.built():
        pytest.skip("extension not built")
    rng = np.random.default_rng(rows * 1000 + cols)
    left = rng.standard_normal((rows, rank)).astype(np.float32)
    right = rng.standard_normal((rank, cols)).astype(np.float32)
    out = np.full(rows * cols, np.nan, dtype=np.float32)
    fused.lora_rows(left, right, rows, rank, cols, out, post_scale)
    want = left[:, :1] * right[:1]
    for k in range(1, rank):
        want = want + left[:, k:k + 1] * right[k:k + 1]
    if post_scale != 1.0:
        want = want * np.float32(post_scale)
    assert np.array_equal(out.reshape(rows, cols), want)
    exact = (left.astype(np.float64) @ right.astype(np.float64)) * post_scale
    bound = (np.abs(left).astype(np.float64) @ np.abs(right).astype(np.float64)) * post_scale * (rank + 1) * 2.0 ** -23
    assert (np.abs(out.reshape(rows, cols) - exact) <= bound).all()


def test_lora_rows_checks_buffer_sizes():
    import numpy as np

    if not fused.built():
        pytest.skip("extension not built")
    with pytest.raises(ValueError, match="too small"):
        fused.lora_rows(np.zeros((4, 2), np.float32), np.zeros((2, 8), np.float32), 4, 2, 8,
                        np.zeros(31, np.float32), 1.0)
