#!/usr/bin/env bash
# Build the documentation site (Sphinx + furo + MyST-NB) into docs/_build/html, strictly:
# -W turns every warning into an error, --keep-going reports them all, -n checks every reference.
# The notebooks are executed on the embedded SmolLM2 model (LENS_LAAI_DOCS_EXECUTE=off skips that).
# Run it in an environment with lens_laai and its `docs` extra installed (scripts/test.sh does).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
rm -rf docs/_build/html docs/api/generated docs/jupyter_execute
start=$(date +%s)
python -m sphinx -W --keep-going -n -b html docs docs/_build/html "$@"
echo "docs built in $(( $(date +%s) - start ))s: $root/docs/_build/html/index.html"
