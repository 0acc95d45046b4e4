#!/usr/bin/env bash
# The wheels benchmarks/gpu_run.sh installs on a GPU machine whose Python (3.12) lacks them: run this once on a
# machine that reaches PyPI, then carry the git-ignored folder .whl with the GPU call. .whl/ gets what the GPU image
# lacks (tyro, datasets, trl and what they need beyond it); .whl/transformers/ the project's pinned transformers and
# its tokenizers, which gpu_run.sh uses only if they import cleanly there. Versions are requirements*.txt's pins and
# what they resolved to here. Existing files in .whl are kept (pip skips a wheel already downloaded).
set -euo pipefail
cd "$(dirname "$0")/.."
download() {
    local dest=$1; shift
    mkdir -p "$dest"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dest" "$@"
}
download .whl tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 datasets==5.2.0 dill==0.4.1 \
    multiprocess==0.70.19 trl==1.16.0 fsspec==2026.9.0 typing-extensions==4.16.0
download .whl/transformers transformers==5.23.0 tokenizers==0.23.3
ls -1 .whl .whl/transformers
du -sh .whl
