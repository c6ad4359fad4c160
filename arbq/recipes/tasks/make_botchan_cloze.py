"""Build `botchan_cloze.jsonl`: an offline 4-way "which sentence comes next?" task from botchan.txt.

Source: Natsume Soseki's *Botchan*, English translation by Yasotaro Morri (1919), public domain,
as shipped in the sentencepiece sdist (`arbq.fixtures.botchan_path()`). Only the novel's text is
used (from "CHAPTER I" to the Project Gutenberg end marker; headings dropped).

Each example: `context` = the sentences just before sentence i (up to CONTEXT_CHARS characters,
at least one), `choices` = sentence i plus 3 distractor sentences of similar length drawn from at
least FAR sentences away, shuffled; `label` = index of the true sentence. Chance accuracy is 25%.

    python arbq/recipes/tasks/make_botchan_cloze.py [BOTCHAN_TXT] [-o OUT.jsonl]

The output is deterministic (fixed seed), so it can be regenerated and compared byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

N_EXAMPLES = 200
CONTEXT_CHARS = 240
MIN_LEN, MAX_LEN = 30, 140          # characters of the true sentence
LEN_RATIO = 1.3                     # distractor length within [len / r, len * r]
FAR = 30                            # distractors come from >= FAR sentences away
SEED = 1234

_SENT_END = re.compile(r"(?<!\bMr)(?<!\bMrs)(?<!\bDr)(?<!\bSt)([.!?][\"']?)\s+(?=[\"']?[A-Z])")


def novel_text(raw: str) -> str:
    """The novel's body as one line: from CHAPTER I to the end marker, chapter headings removed."""
    start = raw.index("\nCHAPTER I\n")
    end = raw.index("End of Project Gutenberg")
    body = re.sub(r"\nCHAPTER [IVXL]+\n", "\n", raw[start:end] + "\n")
    return re.sub(r"\s+", " ", body).strip()


def sentences(text: str) -> list[str]:
    """Split after . ! ? (and a closing quote) followed by a capital; Mr./Mrs./Dr./St. do not end one."""
    return [t.strip() for t in _SENT_END.sub("\\1\n", text).split("\n") if t.strip()]


def _context(sents: list[str], i: int) -> str:
    ctx = [sents[i - 1]]
    j = i - 2
    while j >= 0 and len(" ".join([sents[j], *ctx])) <= CONTEXT_CHARS:
        ctx.insert(0, sents[j])
        j -= 1
    return " ".join(ctx)


def build_examples(raw: str, n: int = N_EXAMPLES, seed: int = SEED) -> list[dict]:
    """`n` examples {"id", "context", "choices"[4], "label"} spread evenly over the novel."""
    sents = sentences(novel_text(raw))
    rng = random.Random(seed)
    eligible = [i for i in range(1, len(sents)) if MIN_LEN <= len(sents[i]) <= MAX_LEN]
    step = len(eligible) / n
    examples = []
    for k in range(n):
        i = eligible[int(k * step)]
        gold = sents[i]
        lo, hi = len(gold) / LEN_RATIO, len(gold) * LEN_RATIO
        pool = [s for j, s in enumerate(sents) if abs(j - i) >= FAR and lo <= len(s) <= hi and s != gold]
        choices = [gold, *rng.sample(sorted(set(pool)), 3)]
        rng.shuffle(choices)
        examples.append({"id": k, "context": _context(sents, i), "choices": choices,
                         "label": choices.index(gold)})
    return examples


def to_jsonl(examples: list[dict]) -> str:
    return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("botchan", nargs="?", type=Path,
                    default=Path.home() / ".cache" / "arbq" / "botchan.txt")
    ap.add_argument("-o", "--out", type=Path, default=Path(__file__).with_name("botchan_cloze.jsonl"))
    args = ap.parse_args()
    text = to_jsonl(build_examples(args.botchan.read_text(encoding="utf-8")))
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text.encode())} bytes)")


if __name__ == "__main__":
    main()
