#!/usr/bin/env bash
# Make a release folder from a training run: export, calibrate, quantize (INT8 cpu + INT8 trt), and measure
# what the model card states. Usage (from the repository root):
#   bash models/release.sh RUN DATA MASKS VOLUMES OUT
#   RUN      the training run folder (model.pt, split.csv)
#   DATA     the dataset folder it was trained on (class folders)
#   MASKS    the stone-mask folder (same relative paths, .png)
#   VOLUMES  a folder of real CT volumes for the out-of-scope table and the calculus pairs (see docs/scope.md)
#   OUT      the release folder to write (e.g. models/kidney-stone-ct-v3)
# then: python models/card.py OUT --command "..." --where "..."
set -euo pipefail
RUN=$1 DATA=$2 MASKS=$3 VOLUMES=$4 OUT=$5
# the forms to ship (the first is the CPU form the card's scope table measures): INT8 only where
# bench accuracy passed its gates, else FP16 (chosen below; SHIP="..." to name them yourself)
WORK="$RUN/release"
mkdir -p "$WORK" "$OUT/results"
T="--threads 2"

edgekidney export "$RUN" --out "$WORK/model.onnx"
edgekidney calibrate "$DATA" --model "$WORK/model.onnx" --manifest "$RUN/split.csv" --out "$WORK/calibration" --n "${CAL_N:-256}"
edgekidney quantize "$WORK/model.onnx" --precision int8 --target cpu --calibration "$WORK/calibration" \
    --out "$WORK/model-int8cpu.onnx"
edgekidney quantize "$WORK/model.onnx" --precision int8 --target trt --calibration "$WORK/calibration" \
    --out "$WORK/model-int8trt.onnx"
edgekidney quantize "$WORK/model.onnx" --precision fp16 --out "$WORK/model-fp16.onnx"

# accuracy of the children against their parent on the validation blocks (exit 1 if a gate fails)
edgekidney bench accuracy "$WORK/model.onnx" "$WORK/model-fp16.onnx" "$WORK/model-int8cpu.onnx" "$WORK/model-int8trt.onnx" \
    --data "$RUN/split.csv" --split val --json "$OUT/results/accuracy.json" || echo "an INT8 form failed its gates" >&2
if [ -z "${SHIP:-}" ]; then
    SHIP=$(python - "$OUT/results/accuracy.json" <<'PY'
import json, sys
from pathlib import Path
passed = {Path(r["model"]).stem for r in json.load(open(sys.argv[1]))["rows"] if r["passed"]}
forms = ["model-int8cpu" if "model-int8cpu" in passed else "model-fp16",
         "model-int8trt" if "model-int8trt" in passed else "model-fp16"]
print(" ".join(dict.fromkeys(forms)))
PY
)
fi
echo "shipping: $SHIP"
# clinical metrics with 95 % bootstrap intervals, FP32 and the shipped CPU form
edgekidney evaluate "$WORK/model.onnx" "$RUN/split.csv" --split val $T --json "$OUT/results/evaluate-fp32.json" \
    --plots "$OUT/results/plots-fp32"
for f in $SHIP; do
    edgekidney evaluate "$WORK/$f.onnx" "$RUN/split.csv" --split val $T --json "$OUT/results/evaluate-${f#model-}.json"
done
# where it points, on the masked validation Stone slices
python benchmarks/located.py "$WORK/model.onnx" "$WORK/model-fp16.onnx" "$WORK/model-int8cpu.onnx" "$WORK/model-int8trt.onnx" \
    --manifest "$RUN/split.csv" --data "$DATA" --masks "$MASKS" --json "$OUT/results/located.json"
# out of scope on real CT of other hospitals, and calculus pairs in their kidneys
python benchmarks/scope.py "$WORK/${SHIP%% *}.onnx" --val "$RUN/split.csv" --volumes "$VOLUMES" \
    --json "$OUT/results/scope.json"
# a whole exam of another hospital (the example volume): where its calls land, against the kidneys and their foci
python benchmarks/exam.py "$WORK/model.onnx" "$WORK/model-fp16.onnx" "$WORK/model-int8cpu.onnx" \
    --json "$OUT/results/exam.json"
# latency, batch 1, ONNX Runtime CPU, 2 threads
edgekidney bench latency "$WORK/model.onnx" "$WORK/model-fp16.onnx" "$WORK/model-int8cpu.onnx" --batch-sizes 1 --threads 2 --seconds 10 \
    --torch none --json "$OUT/results/latency.json" || true

for f in $SHIP; do
    cp "$WORK/$f.onnx" "$WORK/$f.json" "$OUT/"
done
cp "$RUN/metrics.json" "$OUT/results/training-metrics.json"
cp "$RUN/history.csv" "$OUT/results/history.csv"
# the run's configuration, with its folders named by their last part only (they were this machine's)
python - "$RUN/config.json" "$OUT/results/training-config.json" <<'PY'
import json, sys
from pathlib import Path
c = json.load(open(sys.argv[1]))
for k in ("data", "out", "weights", "stone_masks"):
    if isinstance(c.get(k), str) and "/" in c[k]:
        c[k] = "/".join(Path(c[k]).parts[-2:]) if k == "weights" else Path(c[k]).name
Path(sys.argv[2]).write_text(json.dumps(c, indent=2) + "\n")
PY
(cd "$OUT" && for f in $SHIP; do sha256sum "$f.onnx"; done > SHA256SUMS)
du -sh "$OUT"/*.onnx
