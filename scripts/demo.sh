#!/usr/bin/env bash
# The main command of the README: the demo on real MNIST (see `fimfast demo --help`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m fimfast.cli demo "$@"
