#!/usr/bin/env bash
# Make headless Chromium available for the HTML report tests (tests/test_report.py).
# Installs Debian's `chromium` when no Chromium is on PATH. Exits 1, with the reason on stderr, when it cannot
# provide one: CI (.ci/run) stops there rather than let those tests skip (they fail under CI or
# TOKENFLEET_REQUIRE_CHROMIUM anyway). Locally, without CI set, they skip with their reason.
set -u

have_chromium() {  # the names tests/test_report.py looks for
    local name
    for name in chromium chromium-browser google-chrome chrome; do
        command -v "$name" >/dev/null 2>&1 && return 0
    done
    return 1
}

fail() {
    echo "ensure_chromium: $1; cannot provide Chromium for the HTML report tests" >&2
    exit 1
}

have_chromium && exit 0
command -v apt-get >/dev/null 2>&1 || fail "no Chromium on PATH and no apt-get here"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        fail "not root and no passwordless sudo"
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null 2>&1 || fail "apt-get update failed (offline?)"
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || fail "apt-get install chromium failed"
have_chromium || fail "apt-get installed chromium, but none is on PATH"
echo "ensure_chromium: installed $(chromium --version 2>/dev/null || echo chromium)"
