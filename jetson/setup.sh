#!/usr/bin/env bash
# Set up edgekidney on a Jetson with JetPack 6.x (L4T R36; TensorRT 10.3, CUDA 12.6 on JetPack 6.1/6.2).
#
#   jetson/setup.sh [--check] [--venv DIR]
#
# Checks the L4T release, CUDA, TensorRT's Python bindings and the build tools pycuda needs, and says
# plainly what is missing. Then makes a virtual environment that sees JetPack's TensorRT
# (--system-site-packages) and installs pycuda and edgekidney with the [serve] extra, without PyTorch.
# TensorRT itself is never pip-installed here: on a Jetson it comes from JetPack (python3-libnvinfer).
#   --check      only check, install nothing (exit 1 when something is missing)
#   --venv DIR   where to make the environment (default: .venv-jetson in the repository)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$REPO/.venv-jetson"
CHECK_ONLY=0
while (($#)); do
  case "$1" in
    --check) CHECK_ONLY=1; shift ;;
    --venv) VENV=${2:?--venv needs a folder}; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

MISSING=()
ok() { printf '  ok       %s\n' "$*"; }
missing() { printf '  MISSING  %s\n' "$*"; MISSING+=("$*"); }

echo "edgekidney Jetson setup: checking this device"

# -- L4T / JetPack ---------------------------------------------------------------------------------
if [[ -r /etc/nv_tegra_release ]]; then
  HEAD=$(head -n 1 /etc/nv_tegra_release)
  L4T_MAJOR=$(sed -n 's/^# R\([0-9][0-9]*\) (release).*/\1/p' <<<"$HEAD")
  L4T_REV=$(sed -n 's/.*REVISION: \([0-9.]*\).*/\1/p' <<<"$HEAD")
  if [[ "$L4T_MAJOR" == 36 ]]; then
    ok "L4T R$L4T_MAJOR.$L4T_REV (JetPack 6.x; 6.1/6.2 are R36.4)"
  elif [[ -n "$L4T_MAJOR" && "$L4T_MAJOR" -lt 36 ]]; then
    missing "JetPack 6: this is L4T R$L4T_MAJOR.$L4T_REV (JetPack 5 ships TensorRT 8.5, which edgekidney does not support); flash JetPack 6.1 or newer"
  else
    echo "  note     L4T '$HEAD' is newer than JetPack 6; continuing (TensorRT 11.x needs JetPack 7.2.2+)"
  fi
else
  missing "a Jetson: /etc/nv_tegra_release not found (this script is for JetPack 6 devices; on a workstation use pip install 'edgekidney[trt,serve]')"
fi

# -- Python, CUDA, build tools ---------------------------------------------------------------------------
if command -v python3 >/dev/null && python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  ok "Python $(python3 -c 'import platform; print(platform.python_version())')"
else
  missing "Python 3.10+ (JetPack 6 ships it: sudo apt-get install python3)"
fi
if python3 -c 'import venv, ensurepip' 2>/dev/null; then
  ok "python3-venv"
else
  missing "python3-venv (sudo apt-get install python3-venv python3-pip)"
fi
PYINC=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null || true)
if [[ -n "$PYINC" && -f "$PYINC/Python.h" ]]; then
  ok "Python headers"
else
  missing "Python headers to build pycuda (sudo apt-get install python3-dev)"
fi
if command -v g++ >/dev/null; then
  ok "C++ compiler"
else
  missing "a C++ compiler to build pycuda (sudo apt-get install build-essential)"
fi
CUDA_ROOT=${CUDA_ROOT:-/usr/local/cuda}
if [[ -x "$CUDA_ROOT/bin/nvcc" ]]; then
  ok "CUDA $("$CUDA_ROOT/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') at $CUDA_ROOT"
else
  missing "the CUDA toolkit at $CUDA_ROOT (pycuda builds against it: sudo apt-get install nvidia-jetpack, or cuda-toolkit-12-6)"
fi

# -- TensorRT from JetPack --------------------------------------------------------------------------------
TRT_VERSION=$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)
if [[ -z "$TRT_VERSION" ]]; then
  missing "TensorRT Python bindings (sudo apt-get install python3-libnvinfer python3-libnvinfer-dev; part of nvidia-jetpack)"
elif python3 -c "import sys; v=tuple(int(x) for x in '$TRT_VERSION'.split('.')[:2]); sys.exit(v < (10, 3))"; then
  ok "TensorRT $TRT_VERSION"
else
  missing "TensorRT 10.3+: found $TRT_VERSION (edgekidney builds strongly typed engines; JetPack 6.1/6.2 ship 10.3)"
fi

if ((${#MISSING[@]})); then
  echo
  echo "Missing (${#MISSING[@]}):"
  printf '  - %s\n' "${MISSING[@]}"
  exit 1
fi
if ((CHECK_ONLY)); then
  echo "everything edgekidney needs is here (--check: nothing installed)"
  exit 0
fi

# -- install ------------------------------------------------------------------------------------------------
echo "installing into $VENV (sees JetPack's TensorRT through --system-site-packages)"
python3 -m venv --system-site-packages "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --upgrade pip
export CUDA_ROOT PATH="$CUDA_ROOT/bin:$PATH"
# NumPy 1.x as a precaution: JetPack 6's python3-libnvinfer was built in the NumPy 1 era (not verified
# against NumPy 2 here). pycuda is compiled against JetPack's CUDA on this device.
"${PIP[@]}" install "numpy<2" "pycuda>=2024.1"
# edgekidney core + the HTTP service; the [trt] extra's 'tensorrt' requirement is met by JetPack, not PyPI.
"${PIP[@]}" install "${REPO}[serve]"

echo
echo "checking the installed environment"
"$VENV/bin/python" - <<'EOF'
import json, sys
from edgekidney.runtime.engine_compat import missing_for_tensorrt
from edgekidney.runtime.tensorrt import detect_environment

env = detect_environment()
print(json.dumps(env, indent=2))
if "torch" in sys.modules:
    print("warning: torch was imported by the runtime; it should not be", file=sys.stderr)
problems = missing_for_tensorrt(env)
for p in problems:
    print(f"  MISSING  {p}")
sys.exit(1 if problems else 0)
EOF
echo "done: source $VENV/bin/activate, then build engines on this device:"
echo "  edgekidney build-engine MODEL.int8.onnx --out MODEL.int8.engine --timing-cache ~/.cache/edgekidney/"
