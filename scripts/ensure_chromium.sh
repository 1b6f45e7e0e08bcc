#!/usr/bin/env bash
# Make headless Chromium available for the HTML report test (tests/test_report.py).
# Installs Debian's `chromium` when /usr/bin/chromium is missing. Never fails the caller: without Chromium the
# test skips with its reason, so this prints why and exits 0.
set -u

if [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: no apt-get here; the Chromium report test will skip" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "ensure_chromium: not root and no passwordless sudo; the Chromium report test will skip" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get update -qq >/dev/null 2>&1; then
    echo "ensure_chromium: apt-get update failed (offline?); the Chromium report test will skip" >&2
    exit 0
fi
if ! $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; then
    echo "ensure_chromium: apt-get install chromium failed; the Chromium report test will skip" >&2
    exit 0
fi
echo "ensure_chromium: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
exit 0
