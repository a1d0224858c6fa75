#!/usr/bin/env bash
# Set up Kestrel in ./.venv from pinned packages; safe to run again (it only adds what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "Kestrel needs Python 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# 1. Everything pinned, torch==2.13.0 (CPU build) and fbgemm-gpu-cpu==1.8.0 included.
"${PIP[@]}" -r requirements.lock
# 2. torchrec on its own and without dependencies: its metadata asks for the CUDA
#    fbgemm-gpu, which would overwrite the CPU build and break the import.
"${PIP[@]}" --no-deps torchrec==1.8.0
# 3. Kestrel itself (the `kestrel` command), editable, nothing more pulled in.
"${PIP[@]}" --no-deps -e .
# 4. Debian's Chromium for the browser test of the alert pages (driven over the DevTools protocol, so
#    nothing else is downloaded). Installed only as root with apt-get; without it that test fails and
#    says so, unless KESTREL_SKIP_BROWSER_TESTS=1 asks to skip it.
if [ ! -x /usr/bin/chromium ] && [ "${KESTREL_SKIP_BROWSER_TESTS:-0}" != 1 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
      || echo "could not install chromium: the browser test will fail (KESTREL_SKIP_BROWSER_TESTS=1 skips it)" >&2
  else
    echo "no /usr/bin/chromium: install Debian's chromium as root for the browser test of the alert pages" >&2
  fi
fi
.venv/bin/python -c 'import torch, torchrec, faiss, faust, river, confluent_kafka' \
  || { echo "install check failed: an import is broken" >&2; exit 1; }
echo "kestrel installed in $(pwd)/.venv (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
