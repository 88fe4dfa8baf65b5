#!/usr/bin/env bash
# VNN-COMP run_instance.sh: v1 CATEGORY ONNX VNNLIB RESULTS_FILE TIMEOUT. Writes RESULTS_FILE:
# one word (sat, unsat, timeout, unknown or error), for sat followed by the counterexample
# ((X_0 v) (X_1 v) ... (Y_0 v) ...) that onnxruntime re-checked. verikit runs its default chain
# for VNN-LIB properties (`verikit certify --vnnlib`) with a budget below TIMEOUT, so it stops
# by itself; a hard stop at TIMEOUT (+ 5 s) is the backstop. Exit 0 whenever a result was
# written; 1 for bad arguments.
set -uo pipefail
if [ "${1:-}" != "v1" ]; then
    echo "Expected first argument (version string) 'v1', got '${1:-}'" >&2
    exit 1
fi
if [ "$#" -ne 6 ]; then
    echo "usage: run_instance.sh v1 CATEGORY ONNX VNNLIB RESULTS_FILE TIMEOUT" >&2
    exit 1
fi
CATEGORY="$2"; ONNX_FILE="$3"; VNNLIB_FILE="$4"; RESULTS_FILE="$5"; TIMEOUT="$6"
if ! [[ "$TIMEOUT" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    echo "TIMEOUT must be a number of seconds, got '$TIMEOUT'" >&2
    exit 1
fi
TOOL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VERIKIT_VENV:-$TOOL_DIR/.venv}"
echo "Running verikit on category '$CATEGORY': $ONNX_FILE, $VNNLIB_FILE, timeout $TIMEOUT s"
rm -f "$RESULTS_FILE"
# start-up (imports, loading the model, the import check) comes out of the same budget
BUDGET=$(awk -v t="$TIMEOUT" 'BEGIN { b = 0.9 * t - 3; if (b < 1) b = 1; printf "%.1f", b }')
timeout --kill-after=5 "$TIMEOUT" "$VENV/bin/verikit" certify "$ONNX_FILE" --vnnlib "$VNNLIB_FILE" \
    --result-file "$RESULTS_FILE" --sat-unsat --timeout "$BUDGET"
rc=$?
if [ ! -s "$RESULTS_FILE" ]; then
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "timeout" > "$RESULTS_FILE"
    else
        echo "error" > "$RESULTS_FILE"  # e.g. an operator verikit does not support (its line is above)
    fi
fi
echo "result: $(head -n 1 "$RESULTS_FILE")"
exit 0
