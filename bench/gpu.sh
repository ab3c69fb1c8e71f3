#!/usr/bin/env bash
# bench/gpu.py on a lent GPU machine (the device tool), in one command.
#
# That machine has torch, transformers, accelerate and the rest of the trainer's needs but not diffusers,
# pydantic, submitit or clean-fid, and reaches no network: their wheels travel in .whl/ (git-ignored),
# pinned to this checkout's .venv. The bare-step anchor, ../shared/bench/prx_bare_step.py, sits beside
# the checkout and so does not travel: it is copied to .cache/bench/ (git-ignored), where gpu.py looks.
#
#   here, once (needs the package index):  bench/gpu.sh prepare
#   there: the device tool's run with carry [".whl", ".cache/bench"], timeout_s 600, command
#                                          bash bench/gpu.sh
#          (any of gpu.py's options may follow, e.g. --sweep sweeps/prx-pixel-1024.yaml --batch 8)
#
# gpu.py writes <device>-<sweep>.json and .md into $OUT there (the tool brings them back: copy them into
# bench/results/), or into bench/results/ where OUT is unset. It rewrites the JSON after each arm, so a
# run stopped at the time limit still returns the arms it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(diffusers pydantic pydantic-core annotated-types typing-inspection typing-extensions submitit clean-fid)

if [[ "${1:-}" == prepare ]]; then
    mkdir -p .whl .cache/bench
    cp ../shared/bench/prx_bare_step.py .cache/bench/
    mapfile -t pins < <(.venv/bin/python -c 'import importlib.metadata as m, sys
for name in sys.argv[1:]: print(f"{name}=={m.version(name)}")' "${PACKAGES[@]}")
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${pins[@]}"
    exit
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 bench/gpu.py --out-dir "${OUT:-bench/results}" "$@"
