"""
Codebase for Improved Denoising Diffusion Probabilistic Models, ported to Jittor.

Importing this package prepares Jittor's environment before Jittor itself is imported, so every entry
point (scripts, DiT, tests) gets the same behaviour:

* no NVIDIA GPU: ``nvcc_path=""`` (an installed CUDA compiler would otherwise make Jittor look for
  libcudart and crash);
* a GPU: CUDA is switched on (``jt.flags.use_cuda``);
* oneDNN: Jittor's own download of oneDNN fails offline; ``make setup`` wires Debian's library in its
  place, and a missing wiring is reported with the fix instead of a traceback.
"""

import json
import os
import shutil
import subprocess
import sys
import warnings

_ONEDNN_DIRNAME = "dnnl_lnx_2.2.0_cpu_gomp"


def _has_nvidia_gpu() -> bool:
    """True when an NVIDIA GPU is visible to this process."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if os.path.exists("/dev/nvidia0"):
        return True
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
            return out.returncode == 0 and "GPU" in out.stdout
        except (OSError, subprocess.SubprocessError):
            return False
    return False


def _jittor_home() -> str:
    """Jittor's home (its caches live in <home>/.cache/jittor): $JITTOR_HOME, the value Jittor remembered, or ~."""
    if os.environ.get("JITTOR_HOME"):
        return os.environ["JITTOR_HOME"]
    remembered = os.path.join(os.path.expanduser("~"), ".cache", "jittor", "config.json")
    try:
        with open(remembered) as f:
            return json.load(f).get("JITTOR_HOME") or os.path.expanduser("~")
    except (OSError, ValueError):
        return os.path.expanduser("~")


def _check_onednn() -> None:
    """Stop with the fix when Jittor would try (and fail) to download oneDNN."""
    if os.environ.get("use_mkl", "1") == "0":
        return
    lib = os.path.join(_jittor_home(), ".cache", "jittor", "mkl", _ONEDNN_DIRNAME, "lib", "libmkldnn.so")
    if not os.path.exists(lib):
        sys.stderr.write(
            "guided_diffusion: Jittor's oneDNN library is not set up (%s is missing).\n"
            "Run `make setup` in the repository (it links Debian's libdnnl there), or set use_mkl=0 to run "
            "without oneDNN (CPU convolutions ~100x slower).\n" % lib
        )
        raise SystemExit(2)


# The marker .ci/patch_jittor.py writes into Jittor's src/jit_compiler.cc (`make setup` applies it).
_COMPILE_LOCK_MARKER = "guided-diffusion-jittor: per-kernel compile lock v2"


def _guard_kernel_compiles() -> None:
    """Without the compile-lock patch, two threads of Jittor's parallel op compiler can build one kernel at once and
    garble it (.ci/patch_jittor.py says how): compile one kernel at a time instead, and say how to fix it."""
    import importlib.util

    spec = importlib.util.find_spec("jittor")
    if spec is None or not spec.origin:
        return
    source = os.path.join(os.path.dirname(spec.origin), "src", "jit_compiler.cc")
    try:
        with open(source) as f:
            patched = _COMPILE_LOCK_MARKER in f.read()
    except OSError:
        return
    if patched or "use_parallel_op_compiler" in os.environ:
        return
    os.environ["use_parallel_op_compiler"] = "0"
    sys.stderr.write(
        "guided_diffusion: Jittor at %s lacks the compile-lock patch, so kernels are compiled one at a time "
        "(slower first runs). Run `make setup` (or `python .ci/patch_jittor.py`) to patch it.\n"
        % os.path.dirname(spec.origin))


def _prepare_jittor_environment() -> None:
    """Set Jittor's environment variables (CUDA off where no GPU is present, safe kernel compiles) and check
    oneDNN."""
    if not _has_nvidia_gpu():
        os.environ["nvcc_path"] = ""
    _check_onednn()
    _guard_kernel_compiles()


os.environ.setdefault("log_silent", "1")  # Jittor info lines; our strict loader makes its warnings unnecessary
if "jittor" not in sys.modules:
    _prepare_jittor_environment()

import jittor as _jt  # noqa: E402  (must come after the environment is prepared)

from . import job_failure as _job_failure  # noqa: E402

# Under mpirun a crashing rank must end the job (Jittor's own handler, installed at its import, finalizes MPI and
# waits for the other ranks forever).
_job_failure.end_job_when_this_rank_fails()

# Jittor's compiled libraries switch the CPU to flush-to-zero, after which numpy warns on every np.finfo call.
warnings.filterwarnings("ignore", message="The value of the smallest subnormal")

if _jt.has_cuda:
    _jt.flags.use_cuda = 1
