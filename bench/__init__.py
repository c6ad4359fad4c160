"""`make bench`: the quality, speed and size report to check before trusting arbq.

Entry point `python -m bench.run` (see its docstring for flags and the results.json key paths).
Modules: methods (what each benchmarked name means), pipeline (calibrate / binarize / pack, reused
when finished), measure (runs one arbq command and records wall time and peak RSS), quality
(perplexity and lm-eval, cached), speed (kernels, decode), machine (where it ran), report (tables).
"""
