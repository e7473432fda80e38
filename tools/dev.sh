#!/usr/bin/env bash
# One-command set-up for a fresh machine (Debian/Ubuntu, Python >= 3.10, CPU is enough).
#
#   bash tools/dev.sh quickstart   # venv in .venv, install, train the quickstart on CPU
#   bash tools/dev.sh test         # venv in .venv, install, run the test suite
#   bash tools/dev.sh install      # only the venv and the install
#
# Extra arguments after `test` go to pytest (e.g. `bash tools/dev.sh test -m slow`).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
venv=${CMSCALE_VENV:-$here/.venv}
python=${PYTHON:-python3}

install() {
    if [ ! -x "$venv/bin/python" ]; then
        "$python" -m venv "$venv"
    fi
    # torch first and pinned: an unpinned torch pulls a multi-GB CUDA build from PyPI.
    # On a CUDA cluster, install the matching torch wheel yourself before this script.
    if ! "$venv/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
        "$venv/bin/pip" install --quiet "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
    fi
    "$venv/bin/pip" install --quiet -e ".[dev]"
}

cmd=${1:-test}
shift || true
case "$cmd" in
    install)
        install
        ;;
    quickstart)
        install
        exec "$venv/bin/python" -m cmscale.quickstart "$@"
        ;;
    test)
        install
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
        exec "$venv/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: bash tools/dev.sh {quickstart|test|install} [args...]" >&2
        exit 2
        ;;
esac
