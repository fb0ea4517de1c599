#!/usr/bin/env bash
# The main command of the README: the demo on real MNIST (see `fimfast demo --help`). Installs only
# what the demo needs into .venv (scripts/env.sh with FIMFAST_ENV_PROFILE=demo), then runs it.
set -euo pipefail
export FIMFAST_ENV_PROFILE=demo
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m fimfast.cli demo "$@"
