#!/usr/bin/env bash
# napari's Qt viewer needs an OpenGL context to add layers; headless machines get one from Xvfb + Mesa.
set -euo pipefail
if command -v xvfb-run >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Xvfb (needed for the headless napari tests)..."
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xvfb xauth libgl1 libegl1 libxkbcommon-x11-0 \
    libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 \
    libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1 >/dev/null
else
  echo "xvfb-run not found. Install it (Debian/Ubuntu: sudo apt-get install xvfb) and run 'make test' again." >&2
  exit 1
fi
