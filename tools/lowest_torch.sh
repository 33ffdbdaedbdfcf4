#!/usr/bin/env bash
# Run the op, layer and torch.compile/torch.export tests on the lowest torch that
# pyproject.toml claims, in a scratch virtual environment outside the repository, with the
# compiled kernels built just in time against that torch. Nothing in the repository or in .venv
# changes.
#
#   tools/lowest_torch.sh                        # torch 2.6.0 (the floor), einops 0.7.0
#   TORCH_VERSION=2.8.0 tools/lowest_torch.sh    # any other release pip can get
#   PKS4_LOWEST_CLEAN=1 tools/lowest_torch.sh    # delete the scratch folder afterwards
#
# Settings (environment):
#   TORCH_VERSION   torch release to test (default 2.6.0: keep it equal to the floor of
#                   `torch>=` in pyproject.toml)
#   EINOPS_VERSION  einops release (default 0.7.0, the floor of `einops>=` in pyproject.toml)
#   PYTHON          interpreter for the scratch venv (default python3.11, as the dev venv)
#   PKS4_LOWEST_DIR scratch folder (default ${TMPDIR:-/tmp}/pks4-lowest-torch)
#   PKS4_LOWEST_CLEAN=1  remove the scratch folder at the end (the next run downloads again)
#   PYTEST_ARGS     extra pytest arguments (e.g. "-x" or "-k export")
#
# Cost on 2 cores: PyPI's Linux torch wheels are CUDA builds that need the nvidia-* wheels at
# import (the CPU-only index is not reachable here), so a first run downloads about 2.7-2.9 GB
# (kept in one folder per torch version, never in pip's cache) and installs about 5 GB; with the
# kernels' JIT build (1-2 minutes) and the tests (2-4 minutes) it takes 5-10 minutes. A second
# run reuses the wheels, the venv and the kernel cache: about 2-3 minutes.
set -euo pipefail

TORCH_VERSION="${TORCH_VERSION:-2.6.0}"
EINOPS_VERSION="${EINOPS_VERSION:-0.7.0}"
PYTHON="${PYTHON:-python3.11}"
# The test tools, pinned to what the dev stack uses, so that only torch (and einops) differ.
TEST_PINS=(pytest==9.2.0 hypothesis==6.170.17 numpy==2.4.6 ninja==1.13.2
    setuptools==84.2.1 wheel==0.48.0)
# What covers the op (all backends, compiled-op registration, opcheck, torch.compile), the
# layers (forward, backward, streaming) and whole-model guarantees (torch.compile included).
# Left out: data, models' pretrained weights, training, benchmarks and security tests, which
# need PyAV, timm, torchvision or the dev stack and say nothing about the op on an older torch.
TESTS=(tests/test_ops_motion_scan.py tests/test_ops_compiled.py tests/test_layers_block.py
    tests/test_layers_kinematic_prior.py tests/test_layers_temporal_conv.py
    tests/test_layers_temporal_scan.py tests/test_streaming.py tests/test_numerics.py
    tests/test_guarantees.py)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRATCH="${PKS4_LOWEST_DIR:-${TMPDIR:-/tmp}/pks4-lowest-torch}"
WHEELS="$SCRATCH/wheels-torch$TORCH_VERSION"
VENV="$SCRATCH/venv-torch$TORCH_VERSION"
SRC="$SCRATCH/src"
LOG="$SCRATCH/pytest-torch$TORCH_VERSION.log"
start=$SECONDS

say() { printf '[lowest_torch] %s\n' "$*"; }
if [[ "${PKS4_LOWEST_CLEAN:-0}" == 1 ]]; then
    trap 'rm -rf -- "$SCRATCH"; say "removed $SCRATCH"' EXIT
fi

# Private scratch folder: the kernel cache inside it must be owner-only (build.py checks).
mkdir -p "$SCRATCH"
chmod 700 "$SCRATCH"
export PKS4_CACHE_DIR="$SCRATCH/kernel-cache"
# Build the kernels just in time against this torch: nothing ahead of time (the Makefile
# exports PKS4_BUILD_EXT=1 for the dev install), no leftover switches from the caller.
unset PKS4_BUILD_EXT PKS4_FORCE_JIT PKS4_NO_EXT PKS4_BUILD_CUDA
export MAX_JOBS="${MAX_JOBS:-2}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. The wheels, downloaded once per torch version into their own folder (not pip's cache).
say "torch==$TORCH_VERSION einops==$EINOPS_VERSION with $PYTHON in $SCRATCH"
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" download --quiet --no-cache-dir -d "$WHEELS" \
    "torch==$TORCH_VERSION" "einops==$EINOPS_VERSION" "${TEST_PINS[@]}"
say "wheels: $(du -sh "$WHEELS" | cut -f1) in $WHEELS ($((SECONDS - start)) s so far)"

# 2. The scratch venv: torch pinned in the same command as everything that depends on it.
"${PIP[@]}" install --quiet --no-cache-dir --no-index --find-links "$WHEELS" \
    "torch==$TORCH_VERSION" "einops==$EINOPS_VERSION" "${TEST_PINS[@]}"

# 3. The package, from a copy of the working tree (tracked and untracked, not ignored), so that
# the build writes nothing into the repository; non-editable, so the tests import this copy.
rm -rf "$SRC"
mkdir -p "$SRC"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done \
        | tar --null -T - -cf -) | tar -xf - -C "$SRC"
else
    tar -C "$ROOT" --exclude=./.venv --exclude=./.git --exclude=./build -cf - . | tar -xf - -C "$SRC"
fi
"${PIP[@]}" install --quiet --no-cache-dir --no-index --no-deps --no-build-isolation \
    --force-reinstall "$SRC"
say "installed ($((SECONDS - start)) s so far); building the CPU kernels just in time"

# 4. The kernels, built just in time in this torch: fail here, with the reason, if they don't.
cd "$SRC"
"$VENV/bin/python" - "$VENV" <<'EOF'
import sys
import time
from pathlib import Path

import einops
import torch

import pks4_layers
from pks4_layers.ops import compiled

venv = Path(sys.argv[1]).resolve()
where = Path(pks4_layers.__file__).resolve()
assert venv in where.parents, f"pks4_layers imported from {where}, not from {venv}"
t0 = time.perf_counter()
status = compiled.load("cpu")
print(f"[lowest_torch] torch {torch.__version__}, einops {einops.__version__}, "
      f"python {sys.version.split()[0]}; pks4_layers from {where.parent}")
if not status.loaded:
    sys.exit(f"[lowest_torch] the CPU kernels did not build or load: {status.reason}")
print(f"[lowest_torch] CPU kernels: {status.origin} ({time.perf_counter() - t0:.0f} s)")
EOF

# 5. The tests, run from the copy (its conftest and helpers), against the installed package.
set +e
# shellcheck disable=SC2086
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}" ${PYTEST_ARGS:-} 2>&1 \
    | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
# pytest's closing line: "N failed, N passed, N skipped ... in 123.45s (0:02:03)".
summary="$(grep -E '(passed|failed|errors?|skipped|no tests ran).* in [0-9.]+s' "$LOG" | tail -1 \
    | sed -E 's/^=+ //; s/ =+$//' || true)"
installed="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
verdict=$([[ $rc == 0 ]] && echo PASSED || echo "FAILED (pytest exit $rc)")
say "venv $(du -sh "$VENV" | cut -f1), wheels $(du -sh "$WHEELS" | cut -f1), log $LOG"
say "torch $installed: ${summary:-no summary} (${SECONDS}s in all with set-up) -> $verdict"
exit "$rc"
