#!/usr/bin/env bash
# One-command set-up for a fresh machine (Debian/Ubuntu, Python >= 3.10, CPU is enough).
#
#   bash tools/dev.sh quickstart   # venv, install, EDM teacher -> one-step CD model, comparison
#   bash tools/dev.sh quickstart-ict   # venv, install, iCT from scratch (configs/quickstart.yaml)
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
    "$venv/bin/pip" install --quiet -e ".[${1:-dev}]"
}

# What the test suite needs from the system: shellcheck (the launch scripts' lint) and a real
# single-node SLURM (tools/local_slurm.sh). Installed and started only when we are root with
# apt-get (CI, fresh machines); elsewhere the tests that need them skip and say why.
system_deps() {
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "dev.sh: not root with apt-get: shellcheck/SLURM tests will skip if those are missing" >&2
        return 0
    fi
    if ! command -v shellcheck >/dev/null 2>&1; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends shellcheck; } >/dev/null 2>&1 \
            || echo "dev.sh: could not install shellcheck" >&2
    fi
    bash tools/local_slurm.sh up >/dev/null || echo "dev.sh: local SLURM did not start" >&2
}

cmd=${1:-test}
shift || true
case "$cmd" in
    install)
        install
        ;;
    quickstart)
        # The point of consistency models in one picture: an EDM teacher (a many-step
        # diffusion model), distilled (CD) into a one-step generator; runs/quickstart/compare/
        # compare.png shows both with their Frechet distances. Re-running resumes each stage.
        install data
        run=${RUN_DIR:-runs/quickstart}
        cm=("$venv/bin/python" -m cmscale.cli)
        "${cm[@]}" train --config configs/quickstart_teacher.yaml --run-dir "$run/teacher" "$@"
        "${cm[@]}" export "$run/teacher" --out "$run/teacher.safetensors"
        "${cm[@]}" train --config configs/quickstart_cd.yaml --run-dir "$run/cd" \
            "loss.teacher=$run/teacher.safetensors" "$@"
        exec "${cm[@]}" compare --teacher "$run/teacher" --checkpoint "$run/cd" \
            --out "$run/compare"
        ;;
    quickstart-ict)
        install data
        exec "$venv/bin/python" -m cmscale.train --config configs/quickstart.yaml \
            --run-dir "${RUN_DIR:-runs/quickstart-ict}" "$@"
        ;;
    test)
        install
        system_deps
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
        exec "$venv/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: bash tools/dev.sh {quickstart|quickstart-ict|test|install} [args...]" >&2
        exit 2
        ;;
esac
