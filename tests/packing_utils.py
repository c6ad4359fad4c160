"""Random LinearResults that respect each method's slots, a synthetic RUN dir, for packing tests; one fit on one
thread (pinned errors are measured that way)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from arbq.methods.registry import scheme_for
from arbq.methods.result import LinearResult


def fit_one_thread(W: torch.Tensor, H: torch.Tensor, **cfg):
    """(result, report row, checked BinarizeConfig) of the method's fit of W with H on one torch thread
    (the order of the float sums, hence the last bits, depends on the thread count)."""
    from arbq.methods.config import BinarizeConfig
    from arbq.methods.registry import get_method

    c = BinarizeConfig(**cfg).checked()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res, row = get_method(c.method).fit(W, H, c, "t")
    finally:
        torch.set_num_threads(before)
    return res, row, c


# (method, cgb) flavours the format distinguishes
FLAVOURS = [("sign", False), ("billm", False), ("arb", True), ("x", False), ("x", True), ("rc", False),
            ("rc", True)]


def random_result(n: int, k: int, method: str = "rc", cgb: bool = True, blocksize: int = 128,
                  salient_frac: float = 0.08, seed: int = 0) -> LinearResult:
    """A LinearResult a `method` could produce: random bits; slots it does not use hold garbage
    where dequantize() never reads them, and the neutral value (mu 0 / col_scale 1) where it does."""
    gen = torch.Generator().manual_seed(seed)
    sc = scheme_for(method, cgb)
    t = -(-k // blocksize)

    def bits(*shape):
        return torch.rand(*shape, generator=gen) < 0.5

    sal = torch.zeros(k, dtype=torch.bool)
    if sc.salient:
        n_sal = max(1, round(salient_frac * k))
        sal[torch.randperm(k, generator=gen)[:n_sal]] = True
    group = bits(n, k) if sc.group else torch.zeros(n, k, dtype=torch.bool)
    if not sc.cgb:
        group &= ~sal
    alpha = torch.rand(n, t, 2, 2, 2, generator=gen) * 0.05 + 0.001
    mu = torch.zeros(n, t, 2, 2) if sc.rc else torch.randn(n, t, 2, 2, generator=gen) * 0.01
    col_scale = torch.rand(2, 2, k, generator=gen) * 2 + 0.1 if sc.rc else torch.ones(2, 2, k)
    return LinearResult(sign1=bits(n, k), sign2=bits(n, k), group=group, salient=sal, alpha=alpha, mu=mu,
                        col_scale=col_scale, blocksize=blocksize)


def write_run(run: Path, model_dir: Path, method: str = "rc", cgb: bool = True, blocksize: int = 32,
              layers: list[int] | None = None, calib_sha: str = "c0ffee", seed: int = 0) -> dict:
    """A RUN dir for the model in `model_dir` with random results for `layers` (default: all).

    Returns {(layer, linear): LinearResult} so a test can build the matching fake-quant model.
    """
    from transformers import AutoConfig

    from arbq.models.arch import arch_for
    from arbq.stages.run_dir import RUN_FORMAT, RunDir

    cfg = AutoConfig.from_pretrained(model_dir)
    spec = arch_for(cfg.model_type)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rd = RunDir(run)
    layers = list(range(cfg.num_hidden_layers)) if layers is None else layers
    out = {}
    for i in layers:
        layer = model.get_submodule(spec.layers)[i]
        results = {}
        for j, name in enumerate(spec.linears):
            w = layer.get_submodule(name).weight
            results[name] = random_result(w.shape[0], w.shape[1], method, cgb, blocksize, seed=seed + 100 * i + j)
            out[(i, name)] = results[name]
        rd.write_layer(i, results, [{"layer": i, "linear": n} for n in results], dict.fromkeys(results, method))
    info = {"format": RUN_FORMAT, "model": str(model_dir), "model_type": cfg.model_type,
            "num_layers": cfg.num_hidden_layers, "linears": list(spec.linears),
            "recipe": {"method": method, "cgb": cgb, "blocksize": blocksize, "iters": 15},
            "calib": {"manifest_sha256": calib_sha}}
    (run / "run.json").write_text(json.dumps(info))
    return out


def check_bf16_prefill(p, seed: int = 0) -> None:
    """The CPU kernel's bf16 prefill path on packed layer p: its bf16 dequantization (scalar and AVX-512
    code) is bit for bit the fp32 one rounded to nearest even, and a batched bf16 call equals bf16(x) @
    bf16(Ŵ)ᵀ up to the bf16 rounding of the output (Ŵ from the torch backend)."""
    from arbq.kernels import cpu
    from arbq.packed import layouts

    n, k = p.spec.out_features, p.spec.in_features
    r0 = min(1, n - 1)                                     # rows r0:n, from row 1 where there is one
    for mode in (0, 1):
        buf = torch.empty(n, k, dtype=torch.bfloat16)
        got = cpu.dequantize(p, {}, r0, n, mode=mode, out=buf)
        assert got.dtype == torch.bfloat16 and got.data_ptr() == buf.data_ptr()
        want = cpu.dequantize(p, {}, r0, n, mode=mode).bfloat16()
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    x = torch.randn(cpu.BATCH_TILE + 3, k, generator=torch.Generator().manual_seed(seed)).bfloat16()
    want = x.float() @ layouts.dequantize(p).bfloat16().float().T
    y = cpu.matmul(p, x, {})
    assert y.dtype == torch.bfloat16 and y.shape == want.shape
    assert float((y.float() - want).abs().max() / want.abs().max()) < 8e-3


def runs_put_back(stored: torch.Tensor, runs: list[int], m: int) -> torch.Tensor:
    """The obvious loop for a run order: stored run r of m columns is the model's run runs[r]; a last partial run
    stays last. stored [N, K] -> Ŵ in the model's column order."""
    want = torch.zeros_like(stored)
    for r, run in enumerate(runs):
        want[:, run * m:(run + 1) * m] = stored[:, r * m:(r + 1) * m]
    want[:, len(runs) * m:] = stored[:, len(runs) * m:]
    return want


def check_ordered_packing(p, want: torch.Tensor, layout: str, atol: float) -> None:
    """A packed linear p with a run order (layout `layout`) and its lookup form: params round trip, measured bits =
    formula with run_order = 16 bits per run, Ŵ = want (the model's order), the run order kept by the lookup form
    and back, and every backend computes x @ wantᵀ from the model's x at batch 1 and 3."""
    from arbq import kernels
    from arbq.packed import layouts
    from arbq.packed.binary_linear import BinaryLinear
    from arbq.packed.format import measured_bits

    k = p.spec.in_features
    assert p.spec.ordered and p.spec.to_params()["run_order"] is True
    assert layouts.layout_of(layout).spec_type.from_params(p.spec.to_params()) == p.spec
    assert measured_bits(p.tensors, p.spec)["run_order"] == 16 * (k // p.spec.run_length)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
    for q in (p, layouts.lookup_form(p)):
        layouts.validate(q, "layer")
        assert q.spec.ordered and measured_bits(q.tensors, q.spec) == q.spec.formula_bits()
        assert torch.equal(layouts.dequantize(q), want)
        assert torch.equal(layouts.from_lookup_form(q, layout).tensors["run_order"], p["run_order"])
        for backend in kernels.backends_for(q.spec.layout):
            lin = BinaryLinear.from_packed(q, backend=backend)
            for xs in (x[:1], x):
                torch.testing.assert_close(lin(xs), xs @ want.T, atol=atol, rtol=1e-3)
            torch.testing.assert_close(lin.dequantize(), want)
