#!/usr/bin/env bash
# Installs what the web demo (`fineregion-pl demo`) and its browser test (tests/test_demo.py) need:
# Debian's chromium, the demo extra and playwright. Safe to run again: it only adds what is missing.
# No `playwright install`: it downloads a browser build, which cannot be fetched here; the test
# drives /usr/bin/chromium instead.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

python -m pip install -q -e ".[demo]" "playwright>=1.45"
# fail here, not as a skipped test, if the demo extra did not bring its server library
python -c "import aiohttp, playwright.sync_api" || { echo "install-demo.sh: the demo extra (aiohttp) or playwright did not install" >&2; exit 1; }
chromium --version 2>/dev/null
