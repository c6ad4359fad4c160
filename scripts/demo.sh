#!/usr/bin/env bash
# The whole pipeline on the real fixture model (SmolLM2-135M) and real text (botchan.txt):
# calibrate on the first 80% of the novel, binarize with ARB-LLM_RC (rc + cgb), pack to real
# 1-bit safetensors, and evaluate FP vs binarized (fake-quant and packed) on the held-out 20%.
set -euo pipefail
CACHE="${ARBQ_CACHE:-$HOME/.cache/arbq}"
MODEL="$CACHE/smollm2-135m"
TEXT="$CACHE/botchan.txt"
OUT="${DEMO_OUT:-runs/demo}"
NSAMPLES="${DEMO_NSAMPLES:-16}"
SEQLEN="${DEMO_SEQLEN:-512}"
mkdir -p "$OUT"

echo "== calibrate: $NSAMPLES x $SEQLEN tokens from botchan.txt[0:80%]"
arbq calibrate "$MODEL" --data "$TEXT@0:0.8" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" --no-stats \
    -o "$OUT/calib" --resume
echo "== binarize: rc + cgb (arbq/recipes/rc-cgb.yaml)"
arbq binarize "$MODEL" --recipe rc-cgb --calib "$OUT/calib" -o "$OUT/rc-cgb" --resume
echo "== pack"
arbq pack "$OUT/rc-cgb" -o "$OUT/rc-cgb-packed" --json "$OUT/size.json"
echo "== eval on the held-out botchan.txt[80%:100%], GPTQ protocol, seqlen 2048"
for m in fp:"$MODEL" fake:"$OUT/rc-cgb/model-fake" packed:"$OUT/rc-cgb-packed"; do
    arbq eval "${m#*:}" --ppl "$TEXT@0.8:1" --seqlen 2048 --json "$OUT/eval-${m%%:*}.json"
done
python3 scripts/demo_table.py "$OUT"
