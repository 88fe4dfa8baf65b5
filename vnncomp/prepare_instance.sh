#!/usr/bin/env bash
# VNN-COMP prepare_instance.sh: v1 CATEGORY ONNX VNNLIB. No analysis: checks that verikit can
# take the instance (the network imports and agrees with onnxruntime, the property parses and
# fits it). A nonzero exit tells the harness that verikit does not support the instance.
set -uo pipefail
if [ "${1:-}" != "v1" ]; then
    echo "Expected first argument (version string) 'v1', got '${1:-}'" >&2
    exit 1
fi
if [ "$#" -ne 4 ]; then
    echo "usage: prepare_instance.sh v1 CATEGORY ONNX VNNLIB" >&2
    exit 1
fi
CATEGORY="$2"; ONNX_FILE="$3"; VNNLIB_FILE="$4"
TOOL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VERIKIT_VENV:-$TOOL_DIR/.venv}"
echo "Preparing verikit for category '$CATEGORY': $ONNX_FILE, $VNNLIB_FILE"
exec "$VENV/bin/python" -c 'import sys
from verikit.certify.vnn import check_instance
sys.exit(check_instance(sys.argv[1], sys.argv[2]))' "$ONNX_FILE" "$VNNLIB_FILE"
