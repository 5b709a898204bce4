#!/usr/bin/env bash
# The quick start: installs what the build needs, builds ferry (into the same
# directory the tests use), and runs `ferry demo`: two sites on this machine,
# the whole story, narrated. Arguments go to `ferry demo` (e.g. --size 1GiB).
set -euo pipefail
cd "$(dirname "$0")"
source .ci/setup
exec cargo run --release --locked --quiet -- demo "$@"
