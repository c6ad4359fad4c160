"""`arbq generate`: greedy generation from a packed dir (run from the bits) or any plain HF model."""

from __future__ import annotations

import torch

from arbq.models.loading import load_model, load_tokenizer, resolve
from arbq.packed.loader import is_packed, load


def run_generate(model: str, prompt: str, max_new_tokens: int = 32) -> str:
    """Prompt plus its greedy continuation of at most max_new_tokens tokens, decoded."""
    ref = resolve(model)
    net = load(model) if is_packed(model) else load_model(ref)[0]
    tok = load_tokenizer(ref)
    enc = tok(prompt, return_tensors="pt")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.inference_mode():
        out = net.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                           pad_token_id=pad)
    return tok.decode(out[0], skip_special_tokens=True)
