#!/usr/bin/env bash
# VNN-COMP install_tool.sh: one argument, the interface version "v1". Installs verikit and its
# dependencies into a virtual environment beside this folder (or $VERIKIT_VENV) and checks that
# the command runs. Exit 0 on success, nonzero otherwise.
set -euo pipefail
if [ "${1:-}" != "v1" ]; then
    echo "Expected first argument (version string) 'v1', got '${1:-}'" >&2
    exit 1
fi
TOOL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VERIKIT_VENV:-$TOOL_DIR/.venv}"
echo "Installing verikit from $TOOL_DIR into $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade pip
# torch first: a bare dependency resolution pulls a multi-GB CUDA build (see README);
# set VERIKIT_TORCH to choose another build, e.g. a CUDA one on a GPU instance
"$VENV/bin/python" -m pip install "${VERIKIT_TORCH:-torch==2.13.0}"
"$VENV/bin/python" -m pip install -e "$TOOL_DIR"
"$VENV/bin/verikit" --version
