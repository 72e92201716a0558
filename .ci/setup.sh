#!/usr/bin/env bash
# Idempotent environment set-up for guided-diffusion-jittor (called by `make setup`).
#  1. Debian packages (g++, oneDNN, OpenMPI) when running as root and they are missing.
#  2. A virtual environment at a stable path outside the checkout (so Jittor's compile cache,
#     which is keyed on the interpreter path, survives fresh clones); `.venv` links to it.
#  3. Python requirements, the package itself (editable), the evaluator's requirements.
#  4. Debian's oneDNN wired into Jittor's cache in place of the download that fails offline.
#  5. Jittor patched for concurrent and interrupted kernel compiles (.ci/patch_jittor.py).
#  6. A warm-up import that fails loudly when oneDNN was not picked up.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV_HOME=${GDJT_VENV:-$HOME/.cache/guided-diffusion-jittor/venv-py311}
PY=${PYTHON:-python3}
say() { echo "[setup] $*"; }

need_pkgs=()
for p in g++ libdnnl-dev openmpi-bin libopenmpi-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    say "installing Debian packages: ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}"
  else
    echo "[setup] missing Debian packages: ${need_pkgs[*]} (run as root, or: sudo apt-get install ${need_pkgs[*]})" >&2
    exit 1
  fi
fi

if [ ! -x "$VENV_HOME/bin/python" ]; then
  say "creating virtual environment $VENV_HOME"
  mkdir -p "$(dirname "$VENV_HOME")"
  "$PY" -m venv "$VENV_HOME"
fi
if [ -L .venv ] || [ ! -e .venv ]; then
  ln -sfn "$VENV_HOME" .venv
fi
VPY="$ROOT/.venv/bin/python"

stamp="$VENV_HOME/.gdjt-requirements"
want=$(cat requirements.txt evaluations/requirements.txt pyproject.toml | sha1sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing Python requirements"
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q -r requirements.txt -r evaluations/requirements.txt
  echo "$want" > "$stamp"
fi
# The editable install points at this checkout; redo it when the checkout moved. (Checked from / : from the
# checkout itself Python would find the package through the working directory whatever the install says.)
if ! (cd / && "$VPY" -c "import guided_diffusion, os, sys; sys.exit(0 if os.path.dirname(os.path.dirname(os.path.abspath(guided_diffusion.__file__))) == '$ROOT' else 1)") 2>/dev/null; then
  say "installing the package (editable)"
  "$VPY" -m pip install -q --no-deps --no-build-isolation -e .
fi

# Debian's oneDNN 2.x under the name and place Jittor's downloader would have used.
D="${JITTOR_HOME:-$HOME}/.cache/jittor/mkl/dnnl_lnx_2.2.0_cpu_gomp"
mkdir -p "$D/lib" "$D/include"
ln -sfn /usr/lib/x86_64-linux-gnu/libdnnl.so.2 "$D/lib/libmkldnn.so"

# Kernel compiles safe against concurrent compiles of one kernel (threads, ranks, runs) and kills: a small patch to
# the installed Jittor's src/jit_compiler.cc (the next import rebuilds the changed file of Jittor's core).
"$VPY" .ci/patch_jittor.py

say "warm-up import (the first one compiles Jittor's core: a few minutes)"
"$VPY" - <<'PY'
import guided_diffusion  # sets Jittor's environment first
import jittor as jt
if jt.mkl_ops is None:
    raise SystemExit("[setup] oneDNN was NOT picked up by Jittor: CPU convolutions would be ~100x slower")
print("[setup] jittor", jt.__version__, "| oneDNN ops: yes | cuda:", bool(jt.has_cuda), "| mpi:", jt.mpi is not None)
from guided_diffusion.cpu import signals_off_compute_threads
with signals_off_compute_threads():  # compiles the run guard's signal-mask kernel once, before any training
    pass
PY
say "ok"
