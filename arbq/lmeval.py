"""`python -m arbq.lmeval ARGS`: lm-evaluation-harness's own command line (`lm_eval ARGS`) with arbq's
packed format registered in transformers first, so `--model hf --model_args pretrained=PACKED` loads a
packed arbq dir. Run it under `accelerate launch -m arbq.lmeval ...` for lm-eval's data parallelism
(one model copy per process); `arbq eval` itself evaluates an already loaded model in one process.
"""

from __future__ import annotations

import arbq  # noqa: F401  (registers quant_method "arbq" with transformers)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
