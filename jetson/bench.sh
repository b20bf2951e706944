#!/usr/bin/env bash
# Benchmark edgekidney TensorRT engines on a Jetson (JetPack 6.x) at maximum power, then put the power
# mode and clocks back as they were, even when a benchmark fails or the run is interrupted.
#
#   jetson/bench.sh --data DIR [--out DIR] [--power-mode ID] [--interval MS] ENGINE...
#
#   --data DIR        labelled CT slices for the accuracy gates (class folders, or a split manifest)
#   --out DIR         where to write everything (default: bench-YYYYmmdd-HHMMSS)
#   --power-mode ID   nvpmodel mode to benchmark in (default: the MAXN mode in /etc/nvpmodel.conf, else 0)
#   --interval MS     tegrastats sampling interval (default 500)
#
# Writes OUT/report.json and OUT/report.md (device model, JetPack, power mode, clocks, temperatures,
# latency percentiles and accuracy gates per engine/precision), OUT/report.tegrastats.csv, the raw
# benchmark JSONs and logs. nvpmodel and jetson_clocks need root: run as root or with sudo rights.
set -euo pipefail

die() { echo "bench.sh: $*" >&2; exit 2; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DATA="" OUT="" POWER_MODE="" INTERVAL_MS=500
ENGINES=()
while (($#)); do
  case "$1" in
    --data) DATA=${2:?--data needs a folder}; shift 2 ;;
    --out) OUT=${2:?--out needs a folder}; shift 2 ;;
    --power-mode) POWER_MODE=${2:?--power-mode needs an id}; shift 2 ;;
    --interval) INTERVAL_MS=${2:?--interval needs milliseconds}; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) ENGINES+=("$1"); shift ;;
  esac
done
((${#ENGINES[@]})) || die "no engines given (build them on this device: edgekidney build-engine MODEL.onnx --out MODEL.engine)"
[[ -n "$DATA" ]] || die "--data DIR is required for the accuracy gates"
for e in "${ENGINES[@]}"; do [[ -f "$e" && -f "$e.json" ]] || die "$e: engine or its sidecar $e.json not found"; done
for tool in nvpmodel jetson_clocks tegrastats edgekidney python3; do
  command -v "$tool" >/dev/null || die "$tool not found: is this a Jetson with JetPack 6, set up by jetson/setup.sh?"
done

OUT=${OUT:-bench-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
SUDO=()
if ((EUID != 0)); then SUDO=(sudo); fi

# -- record the current power mode and clocks, and restore them on any exit ---------------------------
ORIG_MODE_NAME=$(nvpmodel -q 2>/dev/null | sed -n 's/^NV Power Mode: //p')
ORIG_MODE_ID=$(nvpmodel -q 2>/dev/null | tail -n 1 | tr -d '[:space:]')
[[ "$ORIG_MODE_ID" =~ ^[0-9]+$ ]] || die "cannot read the current power mode from 'nvpmodel -q'"
CLOCKS_SAVED="$OUT/jetson_clocks.before"
"${SUDO[@]}" jetson_clocks --store "$CLOCKS_SAVED"

TEGRA_PID=""
restore() {
  local rc=$?
  set +e
  if [[ -n "$TEGRA_PID" ]]; then kill "$TEGRA_PID" 2>/dev/null; wait "$TEGRA_PID" 2>/dev/null; fi
  "${SUDO[@]}" nvpmodel -m "$ORIG_MODE_ID" </dev/null >/dev/null
  "${SUDO[@]}" jetson_clocks --restore "$CLOCKS_SAVED"
  echo "restored power mode $ORIG_MODE_NAME ($ORIG_MODE_ID) and the clocks saved in $CLOCKS_SAVED" >&2
  exit "$rc"
}
trap restore EXIT
trap 'exit 130' INT TERM

# -- maximum power -----------------------------------------------------------------------------------------
if [[ -z "$POWER_MODE" ]]; then
  POWER_MODE=$( (sed -n 's/.*POWER_MODEL ID=\([0-9][0-9]*\) NAME=MAXN.*/\1/p' /etc/nvpmodel.conf 2>/dev/null || true) | head -n 1)
  POWER_MODE=${POWER_MODE:-0}
fi
# nvpmodel asks before a mode change that needs a reboot; answer nothing, then check it took effect.
"${SUDO[@]}" nvpmodel -m "$POWER_MODE" </dev/null || true
NOW_ID=$(nvpmodel -q 2>/dev/null | tail -n 1 | tr -d '[:space:]')
[[ "$NOW_ID" == "$POWER_MODE" ]] || die "power mode $POWER_MODE needs a reboot: sudo nvpmodel -m $POWER_MODE, reboot, rerun"
NOW_NAME=$(nvpmodel -q 2>/dev/null | sed -n 's/^NV Power Mode: //p')
"${SUDO[@]}" jetson_clocks
sleep 2
"${SUDO[@]}" jetson_clocks --show >"$OUT/jetson_clocks.show" 2>&1 || true
python3 "$HERE/report.py" device --power-mode "$NOW_NAME" --power-mode-id "$NOW_ID" \
  --clocks "$OUT/jetson_clocks.show" --out "$OUT/device.json"
python3 -c 'import json; from edgekidney.runtime.tensorrt import detect_environment; print(json.dumps(detect_environment()))' \
  >"$OUT/environment.json" || true

# -- benchmarks, with tegrastats sampling beside them ------------------------------------------------------
tegrastats --interval "$INTERVAL_MS" --logfile "$OUT/tegrastats.log" &
TEGRA_PID=$!

FAILED=()
echo "== latency (power mode $NOW_NAME) ==" >&2
if ! edgekidney bench latency "${ENGINES[@]}" --backend trt --json "$OUT/latency.json" 2>&1 | tee "$OUT/latency.log"; then
  FAILED+=(latency)
fi
echo "== accuracy ==" >&2
if ! edgekidney bench accuracy "${ENGINES[@]}" --data "$DATA" --json "$OUT/accuracy.json" 2>&1 | tee "$OUT/accuracy.log"; then
  FAILED+=(accuracy)
fi

kill "$TEGRA_PID" 2>/dev/null || true
wait "$TEGRA_PID" 2>/dev/null || true
TEGRA_PID=""
python3 "$HERE/report.py" temps >"$OUT/temps_after.json"

python3 "$HERE/report.py" merge --device "$OUT/device.json" --latency "$OUT/latency.json" \
  --accuracy "$OUT/accuracy.json" --tegrastats "$OUT/tegrastats.log" --temps-after "$OUT/temps_after.json" \
  --engines "${ENGINES[@]}" --out "$OUT/report"

if ((${#FAILED[@]})); then
  echo "bench.sh: ${FAILED[*]} failed (see $OUT/*.log); the report has what was measured" >&2
  exit 1
fi
