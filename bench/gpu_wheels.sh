#!/usr/bin/env bash
# Fill the git-ignored wheelhouse .whl/ with what an offline CUDA machine needs beyond its own Python: run it on a
# machine with PyPI access, then carry .whl/ to the CUDA machine (bench/gpu_check.sh installs from it offline).
#
#   bench/gpu_wheels.sh                      # for CPython 3.12 on x86-64 Linux (the lent H200's python3)
#   GPU_PY_VERSION=3.11 bench/gpu_wheels.sh  # for another target interpreter
#
# What goes in, and why (the target is assumed to have PyTorch's usual companions: tqdm, pillow, requests,
# safetensors, pytest, six; bench/gpu_check.sh checks and names anything missing):
#   jittor 1.3.11.0   PyPI has only its source archive; it is built here into a pure-Python wheel (py3-none-any),
#                     so the target needs no build step. Jittor compiles its C++/CUDA core at first import.
#   numpy 1.26.4      Jittor 1.3.11 requires numpy<2 (it reads numpy 1.x array structs in C); the target's numpy 2
#                     stays in place for its other packages, ours shadows it only in our processes.
#   astunparse 1.6.3  a Jittor dependency that PyTorch images usually lack (pure Python).
# Not included: tensorflow (only the evaluator needs it), blobfile (unused by the code that runs on the GPU), timm
# (the reference DiT needs it; the lent machine has it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHL="${GPU_WHEELS_DIR:-$ROOT/.whl}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
PYVER="${GPU_PY_VERSION:-3.12}"
LIMIT_MIB="${GPU_CARRY_LIMIT_MIB:-64}"
PINS=(numpy==1.26.4 astunparse==1.6.3)
JITTOR=jittor==1.3.11.0
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

die() { echo "gpu_wheels: error: $*" >&2; exit 1; }
"$PY" -m pip --version >/dev/null 2>&1 || die "no pip for $PY (set PYTHON=/path/to/python with pip)"
mkdir -p "$WHL"

# One version of each package only (two versions stop an offline install): drop older copies of ours.
for name in numpy astunparse jittor; do
    find "$WHL" -maxdepth 1 -iname "${name}-*" -delete
done

echo "gpu_wheels: binary wheels for CPython $PYVER, x86-64 Linux -> $WHL"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d "$WHL" "${PINS[@]}" \
    || die "pip download failed (needs PyPI access; offline, copy the wheels from a machine that has it)"

echo "gpu_wheels: building the pure-Python wheel of $JITTOR from its source archive"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$TMP" "$JITTOR" || die "could not download $JITTOR"
"$PY" -m pip wheel -q --no-deps -w "$WHL" "$TMP"/jittor-*.tar.gz || die "could not build the $JITTOR wheel"
ls "$WHL"/jittor-*-py3-none-any.whl >/dev/null 2>&1 || die "the jittor wheel is not pure Python (py3-none-any)"

echo "gpu_wheels: contents"
(cd "$WHL" && ls -l --block-size=K ./*.whl | awk '{print "  " $5 "  " $9}')
whl_bytes=$(du -cb "$WHL"/*.whl | tail -1 | cut -f1)

# What a device call carries: tracked + untracked-not-ignored files, plus the carried folders.
cd "$ROOT"
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
             | awk '{s+=$1} END {print s+0}')
ref_bytes=0
if [ -d bench/reference_src ]; then ref_bytes=$(du -cb bench/reference_src | tail -1 | cut -f1); fi
total=$((tree_bytes + whl_bytes + ref_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "gpu_wheels: wheels $(mib "$whl_bytes"), working tree $(mib "$tree_bytes"), bench/reference_src" \
     "$(mib "$ref_bytes"): $(mib "$total") of the ${LIMIT_MIB} MiB a device call carries"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    die "over the ${LIMIT_MIB} MiB carry limit: drop something from .whl/ or the working tree"
fi
