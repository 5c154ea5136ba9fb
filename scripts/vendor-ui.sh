#!/usr/bin/env bash
# Vendors the web UI's charting library (uPlot, MIT) from the npm registry into the package:
# src/probewire/serve/static/vendor/ (gitignored; shipped as package data). Idempotent: a copy of
# the pinned version is kept. Third-party minified code is never committed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

UPLOT_VERSION=1.6.32
DEST=src/probewire/serve/static/vendor
STAMP=$DEST/.uplot-$UPLOT_VERSION

[ -f "$STAMP" ] && [ -f "$DEST/uPlot.iife.min.js" ] && [ -f "$DEST/uPlot.min.css" ] && exit 0
command -v npm >/dev/null || { echo "vendor-ui.sh: npm is missing (apt-get install npm)" >&2; exit 3; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "uplot@$UPLOT_VERSION" >/dev/null)
tar -xzf "$work/uplot-$UPLOT_VERSION.tgz" -C "$work"
mkdir -p "$DEST"
rm -f "$DEST"/.uplot-*
cp "$work/package/dist/uPlot.iife.min.js" "$work/package/dist/uPlot.min.css" \
   "$work/package/LICENSE" "$DEST/"
touch "$STAMP"
echo "vendor-ui: uPlot $UPLOT_VERSION -> $DEST" >&2
