#!/usr/bin/env bash
# Installs what the web demo (`fineregion-pl demo`), the server (`fineregion-pl serve`) and their tests
# (tests/commands/test_demo.py, test_serve.py) need: Debian's chromium, the demo and serve extras and
# playwright. Safe to run again: it only adds what is missing.
# No `playwright install`: it downloads a browser build, which cannot be fetched here; the test
# drives /usr/bin/chromium instead.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

python -m pip install -q -e ".[demo,serve]" "playwright>=1.45"
# fail here, not as a skipped test, if an extra did not bring its libraries
python -c "import gradio, gradio_image_annotation, litserve, playwright.sync_api" || { echo "install-demo.sh: the demo or serve extra (gradio, gradio_image_annotation, litserve) or playwright did not install" >&2; exit 1; }
chromium --version 2>/dev/null
