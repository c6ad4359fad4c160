"""bench.frontier: points from a results dict, the Pareto marks, and the plot file."""

from __future__ import annotations

from bench.frontier import plot, points

RES = {"config": {"ppl_protocol": "GPTQ non-overlapping windows", "ppl_seqlen": 2048},
       "quality": {"fp": {"heldout_ppl": 27.2}, "rc+cgb": {"heldout_ppl": 106.5, "packed_fp8_heldout_ppl": 115.5},
                   "sign": {"heldout_ppl": 1.4e6}, "gptq-3b": {"heldout_ppl": 60.0}, "gptq-2b": {"heldout_ppl": 2e4},
                   "billm": {"heldout_ppl": 1129.0}},
       "size": {"rc+cgb": {"bits_per_weight": 3.048, "bits_per_weight_paper": 1.17},
                "rc+cgb-fp8": {"bits_per_weight": 2.616, "bits_per_weight_paper": 1.17},
                "sign": {"bits_per_weight": 1.271, "bits_per_weight_paper": 1.0},
                "gptq-3b": {"bits_per_weight": 3.31, "bits_per_weight_paper": 3.0},
                "gptq-2b": {"bits_per_weight": 2.29, "bits_per_weight_paper": 2.0},
                "billm": {"bits_per_weight": 3.127, "bits_per_weight_paper": 1.17}},
       "reference": {"reference-rc-cgb-hessian": {"bits_per_weight": 2.929, "heldout_ppl": 210.4}}}


def test_points_sorted_by_bits_with_the_pareto_front():
    pts = points(RES)
    assert [p["name"] for p in pts] == ["sign", "gptq-2b", "rc+cgb (fp8 scales)", "reference-rc-cgb-hessian",
                                        "rc+cgb", "billm", "gptq-3b"]
    front = {p["name"] for p in pts if p["pareto"]}
    assert front == {"sign", "gptq-2b", "rc+cgb (fp8 scales)", "rc+cgb", "gptq-3b"}


def test_plot_writes_a_png(tmp_path):
    png = plot(RES, tmp_path / "f.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
