#!/usr/bin/env bash
# Creates .venv with the pinned stack (CPU torch unless a CUDA torch is already there) and the
# torchvision import hook. Safe to run again: pip skips what is installed.
# --scale adds the scale-out engines' packages (requirements-scale.txt: DeepSpeed).
# --gguf adds llama-cpp-python (requirements-gguf.txt), compiled from source: the tests and the
# benchmark that run the GGUF export in llama.cpp itself.
set -euo pipefail
SCALE=0
GGUF=0
for arg in "$@"; do
  case "$arg" in
    --scale) SCALE=1 ;;
    --gguf) GGUF=1 ;;
    *) echo "tools/install.sh: unknown option $arg (known: --scale, --gguf)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# The constraints file keeps every later pip call from swapping in a CUDA torch.
"$VENV/bin/pip" install --disable-pip-version-check -q -r requirements.txt -c constraints.txt
# The web chat's Gradio, without dependency resolution: every Gradio release caps Pillow below the
# pinned 13.0.0 (see requirements-web.txt); the rest of its closure is pinned there.
"$VENV/bin/pip" install --disable-pip-version-check -q --no-deps -r requirements-web.txt \
  -c constraints.txt
if [ "$SCALE" = 1 ]; then
  "$VENV/bin/pip" install --disable-pip-version-check -q --no-build-isolation \
    -r requirements-scale.txt -c constraints.txt
fi
if [ "$GGUF" = 1 ]; then
  # One compile job per core (42 min with one job on a 2-core machine busy with other work); no
  # -march=native, so the wheel runs on any x86-64 with AVX2. pip skips it once installed and
  # reuses its cached wheel in a new venv on the same machine.
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
  CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
-DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"} \
    "$VENV/bin/pip" install --disable-pip-version-check -q --no-binary llama-cpp-python \
    -r requirements-gguf.txt -c constraints.txt
fi

site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp tools/torchvision_cpu_hook.py "$site/"
echo "import torchvision_cpu_hook" > "$site/torchvision_cpu_hook.pth"
"$VENV/bin/python" - <<'PY'
import torch, transformers, peft  # noqa: F401 - fails loudly if the stack does not import
from transformers import Trainer  # noqa: F401 - the import torchvision used to break
print(f"environment ready: torch {torch.__version__}, transformers {transformers.__version__}")
PY
