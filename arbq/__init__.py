"""arbq: binary (1-bit) post-training quantization of large language models.

Pipeline: calibrate → binarize → pack → eval (see `arbq.stages`). Algorithms live in
`arbq.methods`; the packed 1-bit format and its runtime module in `arbq.packed`.
"""

__version__ = "0.1.0"
