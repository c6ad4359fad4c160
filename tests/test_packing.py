"""The packed format: bit planes, golden bytes, stored slots, bit counts (measured vs closed form)."""

from __future__ import annotations

import pytest
import torch
from packing_utils import FLAVOURS, random_result

from arbq.errors import ArbqError
from arbq.methods.registry import scheme_for
from arbq.methods.result import LinearResult
from arbq.packed.codec import check_representable, dequantize_packed, pack_linear, unpack_rows
from arbq.packed.format import (
    LinearSpec,
    formula_bits,
    measured_bits,
    pack_bits,
    paper_bits,
    unpack_bits,
)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 8), (2, 9), (5, 13), (1, 64), (4, 1001)])
def test_bits_round_trip_odd_sizes(shape):
    bits = torch.rand(*shape, generator=torch.Generator().manual_seed(0)) < 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], -(-shape[1] // 8))
    assert torch.equal(unpack_bits(packed, shape[1]), bits)
    # padding bits of the last byte are zero
    assert torch.equal(unpack_bits(packed, 8 * packed.shape[1])[:, shape[1]:], torch.zeros(shape[0], -shape[1] % 8,
                                                                                          dtype=torch.bool))


def test_golden_bytes_lsb_first():
    bits = torch.zeros(2, 10, dtype=torch.bool)
    bits[0, [0, 3, 9]] = True
    bits[1, [7, 8]] = True
    assert pack_bits(bits).tolist() == [[0x09, 0x02], [0x80, 0x01]]
    assert pack_bits(torch.ones(1, 3, dtype=torch.bool)).tolist() == [[0x07]]


def _tiny_rc_result() -> LinearResult:
    """N=2, K=10, B=8 rc+cgb result with salient columns 2 and 9."""
    n, k = 2, 10
    sal = torch.zeros(k, dtype=torch.bool)
    sal[[2, 9]] = True
    sign1 = torch.zeros(n, k, dtype=torch.bool)
    sign1[0, [0, 3, 9]] = True
    sign2 = torch.zeros(n, k, dtype=torch.bool)
    sign2[0, 9] = True      # salient p=1 of row 0
    sign2[1, 2] = True      # salient p=0 of row 1
    sign2[1, 5] = True      # not salient: must not be stored
    group = torch.zeros(n, k, dtype=torch.bool)
    group[1, [1, 2]] = True
    alpha = torch.arange(2 * 2 * 8, dtype=torch.float32).reshape(n, 2, 2, 2, 2) + 1
    return LinearResult(sign1, sign2, group, sal, alpha, torch.zeros(n, 2, 2, 2), torch.full((2, 2, k), 0.5), 8)


def test_golden_linear_layout():
    p = pack_linear(_tiny_rc_result(), scheme_for("rc", True), "fp32")
    assert p["sign1"].tolist() == [[0x09, 0x02], [0x00, 0x00]]
    assert p["group"].tolist() == [[0x00, 0x00], [0x06, 0x00]]
    assert p["salient"].tolist() == [0x04, 0x02]
    assert p["sign2"].tolist() == [[0x02], [0x01]]
    # rc+cgb slots: alphas (0,0,0), (0,1,0), (1,0,0), (1,0,1), (1,1,0), (1,1,1); no means
    assert p["values"].shape == (2, 2, 6)
    assert p["values"][0, 0].tolist() == [1.0, 3.0, 5.0, 6.0, 7.0, 8.0]
    assert p["colscale_ns"].shape == (2, 8) and p["colscale_sal"].shape == (4, 2)


@pytest.mark.parametrize("method,cgb", FLAVOURS)
@pytest.mark.parametrize("scale_dtype", ["fp32", "fp16", "bf16", "fp8"])
def test_unpack_reproduces_result(method, cgb, scale_dtype):
    res = random_result(19, 83, method, cgb, blocksize=16, seed=3)
    p = pack_linear(res, scheme_for(method, cgb), scale_dtype)
    want, got = res.dequantize(), dequantize_packed(p)
    tol = {"fp32": 0, "fp16": 2e-3, "bf16": 1e-2, "fp8": 8e-2}[scale_dtype]
    assert (got - want).abs().max() <= tol * want.abs().max()
    if scale_dtype == "fp32":
        assert torch.equal(got, want)
    sub = unpack_rows(p, 5, 9).dequantize()
    assert torch.equal(sub, got[5:9])


@pytest.mark.parametrize("method,cgb", FLAVOURS)
@pytest.mark.parametrize("scale_dtype", ["fp16", "fp8"])
def test_measured_bits_equal_formula(method, cgb, scale_dtype):
    res = random_result(24, 200, method, cgb, blocksize=32, seed=1)
    p = pack_linear(res, scheme_for(method, cgb), scale_dtype)
    assert measured_bits(p.tensors) == formula_bits(p.spec)
    assert set(p.tensors) == set(p.spec.tensor_shapes())
    for name, (shape, dt) in p.spec.tensor_shapes().items():
        assert tuple(p[name].shape) == shape and p[name].dtype == dt


def test_values_per_row_block_match_the_spec_table():
    v = {f: scheme_for(*f).n_values for f in FLAVOURS}
    assert v == {("sign", False): 2, ("billm", False): 7, ("arb", True): 10, ("x", False): 7, ("x", True): 10,
                 ("rc", False): 4, ("rc", True): 6}


def test_honest_bits_at_4096():
    """Closed form at 4096² (B=128, s=0.08, fp16): the figures the spec quotes (our billm stores one mean
    for its salient part, so 7 values per block instead of the paper code's 8)."""
    def bpw(method, cgb, sd="fp16"):
        spec = LinearSpec(4096, 4096, round(0.08 * 4096), 128, scheme_for(method, cgb), sd)
        return sum(formula_bits(spec).values()) / 4096**2, paper_bits(spec) / 4096**2
    honest, paper = bpw("rc", True)
    assert honest == pytest.approx(2.84, abs=0.02) and paper == pytest.approx(1.08, abs=0.001)
    assert bpw("billm", False)[0] == pytest.approx(2.955, abs=0.02)
    assert bpw("x", True)[0] == pytest.approx(3.33, abs=0.02)
    assert bpw("rc", True, "fp8")[0] == pytest.approx(2.46, abs=0.02)


def test_fp8_uses_a_per_tensor_factor():
    res = random_result(8, 64, "rc", True, blocksize=32, seed=2)
    res.alpha *= 1000.0   # beyond e4m3's 448 without a factor
    p = pack_linear(res, scheme_for("rc", True), "fp8")
    assert p["values"].dtype == torch.float8_e4m3fn and p["values_scale"].dtype == torch.float32
    rel = (dequantize_packed(p) - res.dequantize()).abs().max() / res.dequantize().abs().max()
    assert rel < 0.1


def test_fp16_overflow_is_an_error():
    res = random_result(4, 32, "billm", False, blocksize=16, seed=0)
    res.alpha[0, 0, 0, 0, 0] = 1e6
    with pytest.raises(ArbqError, match="overflow"):
        pack_linear(res, scheme_for("billm", False), "fp16")


def test_unknown_method_and_scale_dtype():
    with pytest.raises(ArbqError, match="unknown method"):
        scheme_for("nope", False)
    with pytest.raises(ArbqError, match="binary layout"):
        scheme_for("gptq", False)
    res = random_result(4, 32, "rc", True, blocksize=16)
    with pytest.raises(ArbqError, match="scale dtype"):
        pack_linear(res, scheme_for("rc", True), "int4")


def test_contract_violations_are_refused():
    res = random_result(6, 48, "rc", True, blocksize=16, seed=4)
    check_representable(res, scheme_for("rc", True), "ok")
    res.mu[:] = 0.01                                   # rc stores no means
    with pytest.raises(ArbqError, match="slots"):
        check_representable(res, scheme_for("rc", True), "bad")
    res = random_result(6, 48, "billm", False, blocksize=16, seed=4)
    res.group[:, res.salient] = True                   # salient group bit without CGB
    res.alpha[:, :, 1, 1] += 1.0
    with pytest.raises(ArbqError, match="slots"):
        check_representable(res, scheme_for("billm", False), "bad")
    res = random_result(6, 48, "sign", False, blocksize=16, seed=4)
    res.salient[3] = True                              # sign has no salient columns
    res.alpha[:, :, 1] += 1.0
    with pytest.raises(ArbqError, match="slots"):
        check_representable(res, scheme_for("sign", False), "bad")
