#!/usr/bin/env bash
# The CUDA check of issue #21 in one call: environment from carried wheels, Jittor's CUDA build, the parity tests on
# CUDA, and the GPU benchmarks beside the PyTorch reference; a JSON summary in $OUT. README, "CUDA machines".
#
#   bench/gpu_wheels.sh && bench/fetch_reference.sh      # once, on a machine with network (fills .whl/, bench/reference_src/)
#   OUT=/some/dir bench/gpu_check.sh                      # on the CUDA machine (offline is fine)
#   GPU_CHECK_DRY=1 bench/gpu_check.sh                    # CPU rehearsal: same steps, tiny sizes, no CUDA
#
# Stages (GPU_CHECK_STAGES, default "setup import tests bench"), each recorded in $OUT/stages.jsonl:
#   setup   install .whl/*.whl into $GPU_CHECK_SITE (pip --target, offline), find nvcc, cuDNN, cuBLAS, cuRAND, cuFFT,
#           cuSPARSE (toolkit or NVIDIA's pip wheels), build the CUDA layout Jittor expects in $GPU_CHECK_CUDA_SHIM,
#           patch Jittor 1.3.11 for CUDA >= 13 / cuDNN >= 9, write $OUT/versions.json
#   import  first `import jittor` (Jittor compiles its core and CUDA libraries: timed), a CUDA smoke check
#   tests   the parity tests with GDJT_TEST_DEVICE=cuda and NVIDIA_TF32_OVERRIDE=0 ($OUT/pytest.xml)
#   bench   bench/gpu_bench.py, reference then ours, per benchmark ($OUT/bench.jsonl)
# then $OUT/gpu_summary.json and a table. Every stage runs inside the time budget GPU_CHECK_BUDGET_S (default 460 s);
# what does not fit is recorded as skipped. Variables: GPU_CHECK_PY (python3), GPU_CHECK_REF_PY (the Python with
# torch; default GPU_CHECK_PY), GPU_CHECK_NVCC, GPU_CHECK_NVIDIA_DIRS (folders holding NVIDIA's pip libraries;
# default: the `nvidia` package of GPU_CHECK_PY), GPU_CHECK_BENCHES, GPU_CHECK_TESTS, GPU_CHECK_WHEELS (.whl), and
# the per-step caps in seconds GPU_CHECK_IMPORT_S (240), GPU_CHECK_TESTS_S (150), GPU_CHECK_REF_S (75),
# GPU_CHECK_OURS_S (150).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
DRY="${GPU_CHECK_DRY:-0}"
OUT_DIR="${OUT:-$ROOT/results/gpu_check}"
BUDGET="${GPU_CHECK_BUDGET_S:-460}"
STAGES="${GPU_CHECK_STAGES:-setup import tests bench}"
BENCHES="${GPU_CHECK_BENCHES:-adm256_ddim dit_cfg adm64_train}"
WHL="${GPU_CHECK_WHEELS:-$ROOT/.whl}"
SITE="${GPU_CHECK_SITE:-/tmp/gdjt-site}"
SHIM="${GPU_CHECK_CUDA_SHIM:-/tmp/gdjt-cutk}"   # no "cuda" in the name: Jittor warns about such LD_LIBRARY_PATH entries
PARITY_TESTS=(
    tests/test_unet.py::test_unet_output_matches_reference_fixture
    tests/test_unet.py::test_classifier_logits_match_reference_fixture
    tests/test_unet.py::test_superres_output_matches_reference_fixture
    tests/test_unet.py::test_fixture_unet_converted_to_fp16_on_cuda_stays_close_to_float32
    tests/test_unet.py::test_fp16_mode_casts_the_torso_only_and_stays_close_to_float32
    tests/test_gaussian_diffusion.py::test_training_losses_and_q_sample_match_reference_fixture
    tests/test_gaussian_diffusion.py::test_p_mean_variance_on_ddim10_matches_reference_fixture
    tests/test_gaussian_diffusion.py::test_ddim10_sample_loop_matches_reference_fixture_and_compiles_once
    tests/test_guidance.py::test_condition_mean_and_score_with_per_sample_classifier_gradient_match_reference
    tests/test_guidance.py::test_classifier_guided_ddim10_sample_matches_reference
    tests/test_dit_models.py::test_dit_forward_matches_reference_fixture
    tests/test_dit_models.py::test_forward_with_cfg_matches_reference_fixture
    tests/test_dit_diffusion.py::test_training_losses_match_reference_fixture
    tests/test_dit_diffusion.py::test_ddim8_cfg_sample_matches_reference_fixture
    tests/test_dit_autoencoder.py::test_vae_encode_matches_reference_fixture
    tests/test_dit_autoencoder.py::test_vae_decode_matches_reference_fixture
    tests/test_fp16_util.py
)
if [ -n "${GPU_CHECK_TESTS:-}" ]; then read -r -a PARITY_TESTS <<<"$GPU_CHECK_TESTS"; fi

if [ "$DRY" = "1" ]; then
    PY="${GPU_CHECK_PY:-$ROOT/.venv/bin/python}"
    REF_PY="${GPU_CHECK_REF_PY:-}"          # a Python with torch, if this machine has one; else the ref side is skipped
    DEVICE=cpu; TINY=(--tiny); TEST_DEVICE=cpu
else
    PY="${GPU_CHECK_PY:-python3}"
    REF_PY="${GPU_CHECK_REF_PY:-$PY}"
    DEVICE=cuda; TINY=(); TEST_DEVICE=cuda
fi

export PYTHONUNBUFFERED=1   # keep Python's output in order with ours in the log
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/{stages.jsonl,bench.jsonl,pytest.xml,versions.json,gpu_summary.json,gpu_check.log,jittor_cuda_env.sh}
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
START=$(date +%s)
DEADLINE=$((START + BUDGET))
RESERVE=15   # seconds kept for the summary

ORIG_LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"   # the reference runs with the machine's own (driver) paths

say() { echo "[gpu_check $(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }
# fail MESSAGE: report an error of the current stage (the caller returns 1; later stages still run where they can).
fail() { say "error: $*"; LAST_ERROR="$*"; return 1; }

# record_stage NAME RC SECONDS NOTE: one line of $OUT/stages.jsonl.
record_stage() {
    local note="${4//[\"\\]/}"
    printf '{"stage": "%s", "rc": %s, "seconds": %s, "note": "%s"}\n' "$1" "$2" "$3" "${note:0:300}" \
        >>"$OUT_DIR/stages.jsonl"
}

# budget CAP: seconds a step may take (CAP, or what is left before the deadline less the reserve).
budget() {
    local left=$((DEADLINE - $(date +%s) - RESERVE))
    if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}

# ---------------------------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------------------------

# first_existing PATH...: the first path that exists.
first_existing() { local p; for p in "$@"; do if [ -e "$p" ]; then echo "$p"; return 0; fi; done; return 1; }

# find_one NAME DIR...: a file NAME (glob allowed) in the first folder that has one (4 levels down at most), the
# highest version by file name; empty when absent.
find_one() {
    local name="$1"; shift
    local d hit
    for d in "$@"; do
        [ -d "$d" ] || continue
        hit="$(find -L "$d" -maxdepth 4 -name "$name" \( -type f -o -type l \) -printf '%f\t%p\n' 2>/dev/null \
               | sort -V | tail -1 | cut -f2)"
        if [ -n "$hit" ]; then echo "$hit"; return 0; fi
    done
    return 0
}

install_wheels() {
    if [ "$DRY" = "1" ] && "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('jittor') is None)"; then
        say "dry run: $PY already has Jittor; the carried wheels are not installed"
        return 0
    fi
    ls "$WHL"/*.whl >/dev/null 2>&1 \
        || { fail "no wheels in $WHL: run bench/gpu_wheels.sh on a machine with PyPI access and carry .whl/"; return 1; }
    say "installing $(cd "$WHL" && echo *.whl) into $SITE (offline)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl \
        || { fail "pip could not install the carried wheels into $SITE"; return 1; }
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

check_python_modules() {
    "$PY" - <<'EOF' || { fail "the Python above lacks what the package needs (carry its wheels in .whl/)"; return 1; }
import importlib, importlib.util, sys
missing = [m for m in ("numpy", "PIL", "tqdm", "requests", "safetensors", "pytest", "astunparse")
           if importlib.util.find_spec(m) is None]
if importlib.util.find_spec("jittor") is None:
    missing.append("jittor")
import numpy
print("python %s at %s, numpy %s" % (sys.version.split()[0], sys.executable, numpy.__version__))
if int(numpy.__version__.split(".")[0]) >= 2:
    missing.append("numpy<2 (Jittor 1.3.11 reads numpy 1.x arrays; this one is %s)" % numpy.__version__)
if missing:
    print("missing: " + ", ".join(missing))
    sys.exit(1)
EOF
}

find_cuda() {
    if [ -n "${GPU_CHECK_NVIDIA_DIRS:-}" ]; then
        NVIDIA_DIRS="$GPU_CHECK_NVIDIA_DIRS"
    else
        NVIDIA_DIRS="$(env -u PYTHONPATH "$PY" -c 'import nvidia; print(" ".join(nvidia.__path__))' 2>/dev/null || true)"
    fi
    NVCC="${GPU_CHECK_NVCC:-$(command -v nvcc || true)}"
    [ -n "$NVCC" ] || NVCC="$(first_existing /usr/local/cuda/bin/nvcc /usr/bin/nvcc /opt/cuda/bin/nvcc || true)"
    # shellcheck disable=SC2086  # NVIDIA_DIRS is a list of folders
    [ -n "$NVCC" ] || NVCC="$(find_one nvcc $NVIDIA_DIRS)"   # NVIDIA's nvcc wheel (nvidia/cu13/bin/nvcc)
    [ -n "$NVCC" ] || { CUDA_NOTE="no nvcc found (PATH, /usr/local/cuda/bin, ${NVIDIA_DIRS:-no nvidia pip package})"; return 1; }
    local probe; probe="$(mktemp -d)"
    echo '__global__ void k() {}' >"$probe/p.cu"
    local top; top="$("$NVCC" --dryrun -c "$probe/p.cu" -o "$probe/p.o" 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)"
    rm -rf "$probe"
    [ -n "$top" ] || top="$(dirname "$(readlink -f "$NVCC")")/.."
    TK="$(cd "$top" && pwd -P)"
    NVCC_REAL="$(first_existing "$TK/bin/nvcc")" || NVCC_REAL="$NVCC"
    CUDA_VERSION="$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p' | head -1)"
    CUDA_MAJOR="${CUDA_VERSION%%.*}"
    local rt
    rt="$(first_existing "$TK/include/cuda_runtime.h" "$TK/targets/x86_64-linux/include/cuda_runtime.h")" \
        || { CUDA_NOTE="no cuda_runtime.h under $TK"; return 1; }
    TK_INC="$(dirname "$rt")"
    local cudart; cudart="$(find_one 'libcudart.so*' "$TK/lib64" "$TK/targets/x86_64-linux/lib" "$TK/lib")"
    [ -n "$cudart" ] || { CUDA_NOTE="no libcudart.so under $TK"; return 1; }
    TK_LIB="$(dirname "$cudart")"
    local -a search_inc=("$TK_INC") search_lib=("$TK_LIB")
    local d
    for d in $NVIDIA_DIRS; do search_inc+=("$d"); search_lib+=("$d"); done
    declare -gA HDR LIB
    local missing=""
    for h in cudnn.h cudnn_version.h cublas_v2.h cublas_api.h curand.h cufft.h cusparse.h; do
        HDR[$h]="$(find_one "$h" "${search_inc[@]}")"
        [ -n "${HDR[$h]}" ] || missing+=" $h"
    done
    for l in cudnn cublas cublasLt curand cufft cusparse; do
        LIB[$l]="$(find_one "lib$l.so*" "${search_lib[@]}")"
        [ -n "${LIB[$l]}" ] || missing+=" lib$l.so"
    done
    if [ -n "$missing" ]; then CUDA_NOTE="not found:$missing (searched $TK and ${NVIDIA_DIRS:-no nvidia pip package})"; return 1; fi
    local vh="${HDR[cudnn_version.h]}"
    CUDNN_VERSION="$(awk '/#define CUDNN_MAJOR/{a=$3} /#define CUDNN_MINOR/{b=$3} /#define CUDNN_PATCHLEVEL/{c=$3} END{print a"."b"."c}' "$vh")"
    CUDNN_MAJOR="${CUDNN_VERSION%%.*}"
    CUBLAS_VERSION="$(awk '/#define CUBLAS_VER_MAJOR/{a=$3} /#define CUBLAS_VER_MINOR/{b=$3} /#define CUBLAS_VER_PATCH/{c=$3} END{print a"."b"."c}' "${HDR[cublas_api.h]}")"
    CUDA_NOTE="CUDA $CUDA_VERSION at $TK, cuDNN $CUDNN_VERSION at $(dirname "${LIB[cudnn]}"), cuBLAS $CUBLAS_VERSION"
    return 0
}

# build_shim: the layout Jittor derives from nvcc_path (<home>/bin/nvcc, <home>/include, <home>/lib64 with
# unversioned .so names), made of links to the toolkit and to NVIDIA's pip libraries; nothing outside $SHIM changes.
build_shim() {
    rm -rf "$SHIM"
    mkdir -p "$SHIM/bin" "$SHIM/include" "$SHIM/lib64"
    printf '#!/bin/sh\nexec "%s" "$@"\n' "$NVCC_REAL" >"$SHIM/bin/nvcc"
    chmod +x "$SHIM/bin/nvcc"
    local e d
    for e in "$TK_INC"/*; do ln -s "$e" "$SHIM/include/"; done
    for h in "${!HDR[@]}"; do
        d="$(dirname "${HDR[$h]}")"
        for e in "$d"/*; do [ -e "$SHIM/include/$(basename "$e")" ] || ln -s "$e" "$SHIM/include/"; done
    done
    for e in "$TK_LIB"/libcudart.so*; do ln -sf "$e" "$SHIM/lib64/"; done
    [ -e "$SHIM/lib64/libcudart.so" ] || ln -s "$(find_one 'libcudart.so*' "$TK_LIB")" "$SHIM/lib64/libcudart.so"
    LIB_DIRS=""
    for l in "${!LIB[@]}"; do
        ln -sf "${LIB[$l]}" "$SHIM/lib64/lib$l.so"
        ln -sf "${LIB[$l]}" "$SHIM/lib64/$(basename "${LIB[$l]}")"
        d="$(dirname "${LIB[$l]}")"
        case " $LIB_DIRS " in *" $d "*) ;; *) LIB_DIRS="$LIB_DIRS $d" ;; esac
    done
    # cuDNN 9's sub-libraries, and the cuDNN 8 names Jittor 1.3.11 loads for CUDA >= 11 (libcudnn_ops_infer.so ...;
    # cuDNN 9 merged them into libcudnn_ops / libcudnn_cnn).
    d="$(dirname "${LIB[cudnn]}")"
    for e in "$d"/libcudnn_*.so*; do [ -e "$e" ] && ln -sf "$e" "$SHIM/lib64/"; done
    if [ "${CUDNN_MAJOR:-0}" -ge 9 ]; then
        local ops cnn
        ops="$(find_one 'libcudnn_ops.so*' "$d")"; cnn="$(find_one 'libcudnn_cnn.so*' "$d")"
        [ -n "$ops" ] && [ -n "$cnn" ] || { fail "cuDNN $CUDNN_VERSION without libcudnn_ops / libcudnn_cnn in $d"; return 1; }
        ln -sf "$ops" "$SHIM/lib64/libcudnn_ops_infer.so"; ln -sf "$ops" "$SHIM/lib64/libcudnn_ops_train.so"
        ln -sf "$cnn" "$SHIM/lib64/libcudnn_cnn_infer.so"; ln -sf "$cnn" "$SHIM/lib64/libcudnn_cnn_train.so"
    fi
    # Jittor's misc/cuda_limits.h includes <npp.h> for eight integer limits only; a toolkit without NPP (such as one
    # assembled from NVIDIA's pip wheels) gets a stand-in that defines just those.
    # shellcheck disable=SC2086  # NVIDIA_DIRS is a list of folders
    if [ -z "$(find_one npp.h "$TK_INC" $NVIDIA_DIRS)" ]; then
        cat >"$SHIM/include/npp.h" <<'EOF'
/* Stand-in written by bench/gpu_check.sh: the NPP integer limits Jittor's misc/cuda_limits.h reads. */
#pragma once
#define NPP_MIN_32U (0)
#define NPP_MAX_32U (4294967295U)
#define NPP_MIN_32S (-2147483647 - 1)
#define NPP_MAX_32S (2147483647)
#define NPP_MIN_64U (0)
#define NPP_MAX_64U (18446744073709551615ULL)
#define NPP_MIN_64S (-9223372036854775807LL - 1)
#define NPP_MAX_64S (9223372036854775807LL)
EOF
        CUDA_NOTE="$CUDA_NOTE, npp.h stand-in"
    fi
    # Jittor's GPU query loads the driver as "libcuda.so"; drivers often install only libcuda.so.1.
    local libcuda
    libcuda="$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 .*x86-64/{print $NF; exit}')"
    [ -n "$libcuda" ] || libcuda="$(find_one 'libcuda.so.1' /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu /usr/lib64)"
    if [ -n "$libcuda" ]; then ln -sf "$libcuda" "$SHIM/lib64/libcuda.so"; fi
    export LD_LIBRARY_PATH="$SHIM/lib64${LIB_DIRS// /:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

# python_config: Jittor asks python3.X-config for the include flags and extension suffix; without one (no -dev
# package) a small stand-in answers from sysconfig.
python_config() {
    local found
    found="$("$PY" - <<'EOF'
import os, sys, sysconfig
v = "%d.%d" % sys.version_info[:2]
exe = sys.executable
cands = [os.path.join(os.path.dirname(exe), "python%s-config" % v), exe + "-config", "/usr/bin/python%s-config" % v,
         "/usr/local/bin/python%s-config" % v, os.path.join(os.path.dirname(exe), "python3-config")]
inc = sysconfig.get_paths()["include"]
if not os.path.exists(os.path.join(inc, "Python.h")):
    print("NO_PYTHON_H " + inc)
else:
    print(next((c for c in cands if os.path.isfile(c)), ""))
EOF
)"
    case "$found" in
        NO_PYTHON_H*) fail "Python.h is missing (${found#NO_PYTHON_H }): Jittor compiles against it; install python3-dev"
                      return 1 ;;
        "") mkdir -p "$SHIM/bin"
            "$PY" - "$SHIM/bin/python-config" <<'EOF'
import sys, sysconfig
inc, suffix = sysconfig.get_paths()["include"], sysconfig.get_config_var("EXT_SUFFIX")
with open(sys.argv[1], "w") as f:
    f.write('#!/bin/sh\ncase "$1" in\n  --includes) echo "-I%s";;\n  --extension-suffix) echo "%s";;\n'
            '  *) echo "";;\nesac\n' % (inc, suffix))
EOF
            chmod +x "$SHIM/bin/python-config"
            export python_config_path="$SHIM/bin/python-config"
            say "no python3.x-config: Jittor uses $python_config_path (from sysconfig)" ;;
        *) say "python config: $found" ;;
    esac
}

# patch_jittor DIR CUDA_MAJOR CUDNN_MAJOR: make Jittor 1.3.11 build and run on CUDA >= 13 and cuDNN >= 9.
#   CUDA 13 removed cudaDeviceProp::computeMode and ::clockRate, which two helpers of extern/cuda/inc/helper_cuda.h
#   read (CUDA samples code Jittor never calls; every CUDA file includes the header): read as "default mode", 1.
#   CUDA 13's CUB (CCCL 3) needs C++17 and dropped cub::Max; Jittor compiles CUDA as C++14, so its CUB code cannot
#   build: the CUB ops (extern/cuda/cub: argsort, where, arg-reduce, cumsum) are set aside, so Jittor uses its own
#   kernels for argsort/where/argmax, and its CUB softmax kernel is switched off (other/code_softmax.py), so
#   nn.softmax takes Jittor's generic max/exp/sum path. (jt.cumsum, jt.unique and depthwise convolutions on CUDA
#   still need CUB; this package uses none of them.)
#   cuDNN 9 removed the v6/v7 RNN API that extern/cuda/cudnn's RNN ops use: those 6 files are set aside (Jittor's
#   cuDNN module then builds its convolution ops only; nn.RNN/LSTM on CUDA would not use cuDNN).
patch_jittor() {
    "$PY" - "$1" "$2" "$3" <<'EOF'
import os, shutil, sys
jt_dir, cuda_major, cudnn_major = sys.argv[1], int(sys.argv[2] or 0), int(sys.argv[3] or 0)
aside = os.path.join(jt_dir, "extern", "gpu_check_set_aside")
done = []


def set_aside(rel):
    """Move jt_dir/extern/<rel> under extern/gpu_check_set_aside/ (out of the folders Jittor compiles)."""
    src = os.path.join(jt_dir, "extern", rel)
    if not os.path.exists(src):
        return 0
    os.makedirs(os.path.dirname(os.path.join(aside, rel)), exist_ok=True)
    shutil.move(src, os.path.join(aside, rel))
    return 1


if cuda_major >= 13:
    p = os.path.join(jt_dir, "extern", "cuda", "inc", "helper_cuda.h")
    s = open(p).read()
    n = s.count("deviceProp.computeMode") + s.count("deviceProp.clockRate")
    if n:
        s = s.replace("deviceProp.computeMode", "cudaComputeModeDefault /* gpu_check: gone in CUDA 13 */")
        s = s.replace("deviceProp.clockRate", "1 /* gpu_check: gone in CUDA 13 */")
        open(p, "w").write(s)
        done.append("helper_cuda.h: %d uses of removed cudaDeviceProp fields" % n)
    if set_aside(os.path.join("cuda", "cub")):
        done.append("CUB ops set aside (CCCL 3 needs C++17)")
    p = os.path.join(jt_dir, "other", "code_softmax.py")
    if os.path.exists(p):
        s = open(p).read()
        head = "def can_softmax_v1(a, dim):\n"
        mark = "    return False  # gpu_check: a CUB kernel for C++14-era CUB (cub::Max); CUDA 13 has CCCL 3\n"
        if head in s and mark not in s:
            open(p, "w").write(s.replace(head, head + mark, 1))
            done.append("CUB softmax kernel off")
if cudnn_major >= 9:
    names = ["ops/cudnn_rnn_op.cc", "ops/cudnn_rnn_op.h", "ops/cudnn_rnn_backward_x_op.cc",
             "ops/cudnn_rnn_backward_x_op.h", "src/cudnn_rnn_descriptor.cc", "inc/cudnn_rnn_descriptor.h"]
    moved = sum(set_aside(os.path.join("cuda", "cudnn", n)) for n in names)
    if moved:
        done.append("cuDNN RNN ops set aside (%d files, API removed in cuDNN 9)" % moved)
print("; ".join(done) or "nothing to patch")
EOF
}

write_versions() {
    GC_NVSMI="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1 || true)" \
    GC_GXX="$(g++ --version 2>/dev/null | head -1 || true)" \
    GC_TORCH="$(env -u PYTHONPATH "${REF_PY:-$PY}" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version())' 2>/dev/null || true)" \
    GC_TIMM="$(env -u PYTHONPATH "${REF_PY:-$PY}" -c 'import timm; print(timm.__version__)' 2>/dev/null || true)" \
    GC_CUDA="${CUDA_VERSION:-}" GC_CUDNN="${CUDNN_VERSION:-}" GC_CUBLAS="${CUBLAS_VERSION:-}" GC_TK="${TK:-}" \
    GC_NOTE="${CUDA_NOTE:-}" GC_PATCH="${PATCH_NOTE:-}" GC_DRY="$DRY" GC_SHIM="$SHIM" GC_SITE="$SITE" \
    "$PY" - "$OUT_DIR/versions.json" <<'EOF'
import json, os, platform, re, sys, importlib.util
env = os.environ
spec = importlib.util.find_spec("jittor")
jt_version = ""
if spec:
    m = re.search(r"__version__ = '([^']+)'", open(spec.origin).read())
    jt_version = m.group(1) if m else ""
import numpy
out = {"dry_run": env["GC_DRY"] == "1", "python": platform.python_version(), "python_executable": sys.executable,
       "numpy": numpy.__version__, "jittor": jt_version, "jittor_path": os.path.dirname(spec.origin) if spec else "",
       "gpu": env["GC_NVSMI"], "gxx": env["GC_GXX"], "torch_cuda_cudnn": env["GC_TORCH"], "timm": env["GC_TIMM"],
       "cuda_toolkit": env["GC_CUDA"], "cuda_toolkit_path": env["GC_TK"], "cudnn": env["GC_CUDNN"],
       "cublas": env["GC_CUBLAS"], "cuda_search": env["GC_NOTE"], "jittor_patches": env["GC_PATCH"],
       "jittor_env": {k: env.get(k) for k in ("nvcc_path", "use_mkl", "use_mpi", "use_nccl", "use_cutt", "use_cutlass",
                                                "FIX_TORCH_ERROR", "python_config_path", "LD_LIBRARY_PATH",
                                                "PYTHONPATH") if k in env},
       "cuda_shim": env["GC_SHIM"], "site": env["GC_SITE"]}
with open(sys.argv[1], "w") as f:
    json.dump(out, f, indent=1, sort_keys=True)
print("versions: " + json.dumps({k: out[k] for k in ("python", "numpy", "jittor", "gpu", "cuda_toolkit", "cudnn",
                                                      "cublas", "torch_cuda_cudnn", "timm")}))
EOF
}

stage_setup() {
    say "machine: $(uname -srm), $(nproc) cores, $(free -g 2>/dev/null | awk '/Mem:/{print $2 " GiB"}') memory"
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L || true; else say "no nvidia-smi"; fi
    "$PY" --version >/dev/null 2>&1 || { fail "no Python at '$PY' (set GPU_CHECK_PY)"; return 1; }
    command -v g++ >/dev/null || { fail "no g++: Jittor compiles its kernels with it (nvcc too, as host compiler)"; return 1; }
    install_wheels || return 1
    check_python_modules || return 1
    CUDA_OK=0
    if find_cuda; then CUDA_OK=1; say "$CUDA_NOTE"; build_shim; else say "CUDA: $CUDA_NOTE"; fi
    local jt_dir
    jt_dir="$("$PY" -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('jittor').origin))")"
    if [ "$DRY" = "1" ]; then
        # Never patch the development environment: prove the patch on a copy of Jittor's CUDA sources instead.
        local copy; copy="$(mktemp -d)"
        mkdir -p "$copy/extern" "$copy/other"
        cp -r "$jt_dir/extern/cuda" "$copy/extern/"; cp "$jt_dir/other/code_softmax.py" "$copy/other/"
        PATCH_NOTE="dry run, on a copy: $(patch_jittor "$copy" 13 9)"
        rm -rf "$copy"
        export nvcc_path=""   # CPU rehearsal: keep Jittor off CUDA even where a toolkit is installed
    else
        [ "$CUDA_OK" = 1 ] || { fail "CUDA not usable: $CUDA_NOTE (set GPU_CHECK_NVCC / GPU_CHECK_NVIDIA_DIRS)"; return 1; }
        case "$jt_dir" in
            "$SITE"/*) ;;
            *) [ "${GPU_CHECK_PATCH_JITTOR:-0}" = 1 ] || { fail "Jittor at $jt_dir is not the carried one in $SITE; \
set GPU_CHECK_PATCH_JITTOR=1 to patch it in place"; return 1; } ;;
        esac
        PATCH_NOTE="$(patch_jittor "$jt_dir" "$CUDA_MAJOR" "$CUDNN_MAJOR")" || { fail "patching Jittor failed"; return 1; }
        python_config || return 1
        export nvcc_path="$SHIM/bin/nvcc"
        # Offline: no oneDNN download (CPU convolutions are not used here), no MPI/NCCL (one GPU), no cutt/CUTLASS
        # download (Jittor's own transpose kernels), and no `import torch` inside Jittor's import.
        export use_mkl=0 use_mpi=0 use_nccl=0 use_cutt=0 use_cutlass=0 FIX_TORCH_ERROR=0
    fi
    say "jittor patches: $PATCH_NOTE"
    write_env_file
    write_versions
}

# write_env_file: $OUT/jittor_cuda_env.sh, to `source` in a shell that should run the package the same way.
write_env_file() {
    local f="$OUT_DIR/jittor_cuda_env.sh" v
    {
        echo "# Written by bench/gpu_check.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ): source it to use the same Jittor set-up."
        for v in PYTHONPATH LD_LIBRARY_PATH nvcc_path use_mkl use_mpi use_nccl use_cutt use_cutlass FIX_TORCH_ERROR \
                 python_config_path; do
            if [ -n "${!v+x}" ]; then printf 'export %s=%q\n' "$v" "${!v}"; fi
        done
    } >"$f"
}

# ---------------------------------------------------------------------------------------------------------------
# import, tests, bench
# ---------------------------------------------------------------------------------------------------------------

stage_import() {
    local t rc
    t="$(budget "${GPU_CHECK_IMPORT_S:-240}")"; [ "$t" -gt 10 ] || { IMPORT_NOTE="no time left"; return 124; }
    say "first import of Jittor (compiles its core and CUDA libraries; up to ${t}s)"
    log_silent=0 timeout -k 10 "$t" "$PY" - "$DEVICE" <<'EOF'
import sys, time
t0 = time.time()
import jittor as jt
print("gpu_check: import jittor %.1fs, has_cuda=%s, version %s" % (time.time() - t0, jt.has_cuda, jt.__version__))
if sys.argv[1] == "cuda":
    from jittor import compile_extern as ce
    libs = {n: getattr(ce, n, None) is not None for n in ("cudnn", "cublas", "curand", "cufft", "cusparse")}
    print("gpu_check: CUDA libraries loaded: %s" % libs)
    if not jt.has_cuda:
        sys.exit("gpu_check: Jittor found no CUDA")
    jt.flags.use_cuda = 1
import numpy as np
rng = np.random.RandomState(0)
x, w = rng.randn(2, 8, 16, 16).astype(np.float32), rng.randn(4, 8, 3, 3).astype(np.float32)
t0 = time.time()
y = jt.nn.conv2d(jt.array(x), jt.array(w), padding=1).numpy()
ref = np.zeros_like(y)
xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
for i in range(3):
    for j in range(3):
        ref += np.einsum("nchw,oc->nohw", xp[:, :, i:i + 16, j:j + 16], w[:, :, i, j])
a, b = rng.randn(64, 32).astype(np.float32), rng.randn(32, 16).astype(np.float32)
m = jt.matmul(jt.array(a), jt.array(b)).numpy()
y16 = jt.nn.conv2d(jt.array(x).float16(), jt.array(w).float16(), padding=1).float32().numpy()
print("gpu_check: smoke on %s: conv err %.2e, matmul err %.2e, fp16 conv rel err %.2e (%.1fs incl. compile)" % (
    "cuda" if jt.flags.use_cuda else "cpu", np.abs(y - ref).max(), np.abs(m - a @ b).max(),
    np.abs(y16 - ref).max() / np.abs(ref).max(), time.time() - t0))
assert np.abs(y - ref).max() < 1e-3 and np.abs(m - a @ b).max() < 1e-3
EOF
    rc=$?
    IMPORT_NOTE="first import + smoke rc=$rc"
    if [ "$rc" = 0 ]; then
        IMPORT_NOTE="$IMPORT_NOTE; warm import $("$PY" -c 'import time; t = time.time(); import jittor; print("%.1f" % (time.time() - t))' 2>/dev/null | tail -1)s"
    fi
    return "$rc"
}

stage_tests() {
    local t; t="$(budget "${GPU_CHECK_TESTS_S:-150}")"; [ "$t" -gt 20 ] || { TESTS_NOTE="no time left"; return 124; }
    say "parity tests on $TEST_DEVICE (${#PARITY_TESTS[@]} selections, up to ${t}s)"
    # SIGINT at the limit: pytest stops as on Ctrl-C and still writes the report of the tests that ran. Jittor
    # quits at once on SIGINT unless JPY_PARENT_PID is set (it leaves SIGINT to Jupyter then), hence that variable.
    JPY_PARENT_PID=$$ GDJT_TEST_DEVICE="$TEST_DEVICE" NVIDIA_TF32_OVERRIDE=0 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \
        timeout -s INT -k 20 "$t" "$PY" -m pytest -p no:cacheprovider -q -rfEs -o junit_logging=system-out \
        --junitxml="$OUT_DIR/pytest.xml" "${PARITY_TESTS[@]}"
    local rc=$?
    TESTS_NOTE="pytest rc=$rc"
    return "$rc"
}

# run_bench SIDE NAME CAP: one gpu_bench.py process; a timeout or crash still leaves a record.
run_bench() {
    local side="$1" name="$2" t rc deadline
    t="$(budget "$3")"
    deadline=$(( $(date +%s) + t - 10 ))   # gpu_bench.py skips warm repeats that would end later
    if [ "$t" -lt 20 ]; then
        printf '{"bench": "%s", "side": "%s", "error": "skipped: out of time budget"}\n' "$name" "$side" >>"$OUT_DIR/bench.jsonl"
        return 124
    fi
    if [ "$side" = ref ]; then
        if [ -z "$REF_PY" ]; then
            printf '{"bench": "%s", "side": "ref", "error": "skipped: no Python with torch (GPU_CHECK_REF_PY)"}\n' \
                "$name" >>"$OUT_DIR/bench.jsonl"
            return 0
        fi
        say "bench $name: reference (PyTorch), up to ${t}s"
        # The machine's own Python and numpy: none of our carried packages on the path.
        env -u PYTHONPATH LD_LIBRARY_PATH="$ORIG_LD_LIBRARY_PATH" ${GPU_CHECK_REF_PATH:+PYTHONPATH="$GPU_CHECK_REF_PATH"} \
            timeout -k 10 "$t" "$REF_PY" bench/gpu_bench.py --side ref --bench "$name" --device "$DEVICE" \
            "${TINY[@]}" --deadline "$deadline" --out "$OUT_DIR/bench.jsonl"
    else
        say "bench $name: ours (Jittor), up to ${t}s"
        timeout -k 10 "$t" "$PY" bench/gpu_bench.py --side ours --bench "$name" --device "$DEVICE" "${TINY[@]}" \
            --deadline "$deadline" --out "$OUT_DIR/bench.jsonl"
    fi
    rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        printf '{"bench": "%s", "side": "%s", "error": "timeout after %ss"}\n' "$name" "$side" "$t" >>"$OUT_DIR/bench.jsonl"
    fi
    return "$rc"
}

stage_bench() {
    [ -d bench/reference_src ] || say "bench/reference_src is missing (bench/fetch_reference.sh): the reference side will fail"
    local name failures=0
    for name in $BENCHES; do
        run_bench ref "$name" "${GPU_CHECK_REF_S:-75}" || failures=$((failures + 1))
        if [ "${IMPORT_RC:-0}" = 0 ]; then
            run_bench ours "$name" "${GPU_CHECK_OURS_S:-150}" || failures=$((failures + 1))
        else
            printf '{"bench": "%s", "side": "ours", "error": "skipped: Jittor import failed"}\n' "$name" >>"$OUT_DIR/bench.jsonl"
        fi
    done
    BENCH_NOTE="$failures failed or skipped runs"
    return "$failures"
}

# ---------------------------------------------------------------------------------------------------------------

say "start: OUT=$OUT_DIR, budget ${BUDGET}s, stages: $STAGES, dry=$DRY, python $PY"
IMPORT_RC=0
SETUP_RC=0
for stage in $STAGES; do
    t0=$(date +%s)
    LAST_ERROR=""
    if [ "$SETUP_RC" != 0 ] && { [ "$stage" = import ] || [ "$stage" = tests ]; }; then
        record_stage "$stage" 125 0 "skipped: setup failed"
        IMPORT_RC=125
        continue
    fi
    case "$stage" in
        setup) stage_setup; rc=$?; SETUP_RC=$rc; [ "$rc" = 0 ] || IMPORT_RC=$rc
               note="${CUDA_NOTE:-}; patches: ${PATCH_NOTE:-}" ;;
        import) stage_import; rc=$?; IMPORT_RC=$rc; note="${IMPORT_NOTE:-}" ;;
        tests) stage_tests; rc=$?; note="${TESTS_NOTE:-}" ;;
        bench) stage_bench; rc=$?; note="${BENCH_NOTE:-}" ;;
        *) rc=2; fail "unknown stage '$stage' (setup, import, tests, bench)" ;;
    esac
    [ -z "$LAST_ERROR" ] || note="error: $LAST_ERROR; ${note:-}"
    record_stage "$stage" "$rc" "$(( $(date +%s) - t0 ))" "$note"
    say "stage $stage: rc=$rc ($note)"
done
"$PY" bench/gpu_bench.py --summarize "$OUT_DIR"
say "done in $(( $(date +%s) - START ))s; files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
sleep 1   # let tee finish writing the log
