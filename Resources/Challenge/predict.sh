#!/bin/sh
# CVPR 2025 "Foundation Models for Interactive 3D Biomedical Image Segmentation": the container's
# entry point. The organisers run `sh predict.sh` once per interaction step; every case file in the
# input folder (imgs, spacing, boxes; later also clicks, clicks_order, prev_pred) gets <case>.npz
# with `segs` in the output folder. See `ensam predict --help`.
#
# Overridable (for tests and local runs):
#   ENSAM_INPUT_DIR   default /workspace/inputs
#   ENSAM_OUTPUT_DIR  default /workspace/outputs
#   ENSAM_COMMAND     default `ensam` (e.g. "/path/to/.venv/bin/ensam")
#   ENSAM_CHECKPOINT  model file; default: $ENSAM_HOME/model.pt when present, else the default model
#   ENSAM_DEVICE      auto (default), cpu, cuda
#   ENSAM_METHOD      ensam (default); growcut or box run a baseline instead
set -eu

INPUT_DIR="${ENSAM_INPUT_DIR:-/workspace/inputs}"
OUTPUT_DIR="${ENSAM_OUTPUT_DIR:-/workspace/outputs}"
ENSAM="${ENSAM_COMMAND:-ensam}"
CHECKPOINT="${ENSAM_CHECKPOINT:-}"
if [ -z "$CHECKPOINT" ] && [ -f "${ENSAM_HOME:-/opt/ensam}/model.pt" ]; then
    CHECKPOINT="${ENSAM_HOME:-/opt/ensam}/model.pt"
fi

mkdir -p "$OUTPUT_DIR"
# $ENSAM is left unquoted on purpose: it may be a command with arguments.
# shellcheck disable=SC2086
exec $ENSAM predict --input "$INPUT_DIR" --output "$OUTPUT_DIR" \
    --method "${ENSAM_METHOD:-ensam}" --device "${ENSAM_DEVICE:-auto}" ${CHECKPOINT:+--checkpoint "$CHECKPOINT"}
