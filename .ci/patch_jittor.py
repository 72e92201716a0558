#!/usr/bin/env python3
"""Make Jittor 1.3.11's kernel compiles safe against concurrent compiles and kills (run by `make setup`).

The problem (Jittor 1.3.11, `src/jit_compiler.cc`, `jit_compiler::compile`): a kernel is built at fixed paths in
the cache's `jit/` folder. `compile` rewrites `<kernel>_op.cc` in place (truncate, then write), and
`utils/asm_tuner.py` writes `<kernel>_op.post.s`, `<kernel>_op.s` and then `<kernel>_op.so` beside it before
`<kernel>_op.so.key` is written and the library is opened. Jittor guards compiles with one lock (`jittor::lock_guard`),
an fcntl lock on `jittor.lock` plus a process-wide `_has_lock` flag: it keeps other processes out, but not other
threads of the same process (while one thread holds the lock, every thread's `lock_guard` sees `_has_lock` set and
does not lock). Two threads of the parallel op compiler can then build the same kernel at once: measured on a cold
cache, `image_train.py` ran asm_tuner twice for one `mkl_conv_backward_w` kernel, the two runs overlapping in one
process, and failed with `Error: no such instruction` on the garbled `.s` (and an `.so` opened while another thread
rewrites it is the segfault in thread 'C4' seen on resume).

The patch (one file, `src/jit_compiler.cc`; Jittor rebuilds its core on the next import):
* `compile` holds an exclusive lock on `<kernel>_op.so.lock` (flock on a descriptor opened per call, so threads of
  one process exclude each other as processes do) from writing the source to opening the library. A second
  compile of the same kernel waits, then finds it built (the `.key` matches) and only opens it.
* The kernel's source is written to a temporary file and renamed into place, so no compile reads half a source.
Kill safety follows from the order Jittor already keeps: the `.key` is written only after the library is complete,
and a library without a matching key is rebuilt; the lock dies with its process.

No upstream issue or fix was found for this (Jittor/jittor issues searched for asm_tuner, parallel compile and
lock). Idempotent: a patched file is recognised by its marker and left alone; another Jittor version stops with
an error. Usage: python .ci/patch_jittor.py [--check] (uses the Jittor that this Python imports).
"""

import importlib.util
import os
import sys

MARKER = "guided-diffusion-jittor: per-kernel compile lock"

HELPERS_ANCHOR = "JPU(header)\n"
HELPERS = HELPERS_ANCHOR + r'''
// %(marker)s (.ci/patch_jittor.py): one thread of one process compiles and
// loads a given kernel at a time, and kernel sources are replaced atomically.
#ifndef _WIN32
#include <errno.h>
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>
#include <cstdio>
#include <functional>
#include <thread>
namespace jittor {
namespace jit_compiler {
struct KernelCompileLock {
    int fd = -1;
    explicit KernelCompileLock(const string& path) {
        fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
        if (fd < 0) return;
        while (::flock(fd, LOCK_EX) != 0 && errno == EINTR) {}
    }
    ~KernelCompileLock() {
        if (fd < 0) return;
        ::flock(fd, LOCK_UN);
        ::close(fd);
    }
};
static void write_replacing(const string& path, const string& content) {
    string tmp = path + ".tmp" + std::to_string(getpid()) + "_"
        + std::to_string(std::hash<std::thread::id>()(std::this_thread::get_id()));
    {
        std::ofstream out(tmp);
        out << content;
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        std::remove(tmp.c_str());
        write(path, content);
    }
}
} // jit_compiler
} // jittor
#endif
''' % {"marker": MARKER}

COMPILE_ANCHOR = """    string other_src;
    LOGvvv << "Generate" << jit_src_path >> "\\n" >> src;
    if (rewrite_op || !file_exist(jit_src_path2))
        write(jit_src_path2, src);
"""
COMPILE_PATCHED = """    string other_src;
    LOGvvv << "Generate" << jit_src_path >> "\\n" >> src;
#ifndef _WIN32
    KernelCompileLock kernel_compile_lock(jit_lib_path + ".lock");
    if (rewrite_op || !file_exist(jit_src_path2))
        write_replacing(jit_src_path2, src);
#else
    if (rewrite_op || !file_exist(jit_src_path2))
        write(jit_src_path2, src);
#endif
"""


def jittor_source(name: str) -> str:
    """Path of a file of the installed Jittor's source tree (found without importing Jittor)."""
    spec = importlib.util.find_spec("jittor")
    if spec is None or not spec.origin:
        raise SystemExit("[patch_jittor] Jittor is not installed in %s" % sys.executable)
    return os.path.join(os.path.dirname(spec.origin), name)


def is_patched(path: str) -> bool:
    """True when the file carries this patch."""
    with open(path) as f:
        return MARKER in f.read()


def patch(path: str) -> bool:
    """Apply the patch to `path` (atomically); False when it was already there."""
    with open(path) as f:
        text = f.read()
    if MARKER in text:
        return False
    if text.count(HELPERS_ANCHOR) != 1 or text.count(COMPILE_ANCHOR) != 1:
        raise SystemExit(
            "[patch_jittor] %s is not the Jittor 1.3.11 source this patch was written for; install jittor==1.3.11.0 "
            "(requirements.txt), or set use_parallel_op_compiler=0 to avoid concurrent kernel compiles" % path)
    text = text.replace(HELPERS_ANCHOR, HELPERS).replace(COMPILE_ANCHOR, COMPILE_PATCHED)
    tmp = path + ".gdjt-tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return True


def main(argv) -> int:
    path = jittor_source(os.path.join("src", "jit_compiler.cc"))
    if "--check" in argv:
        ok = is_patched(path)
        print("[patch_jittor] %s: %s" % (path, "patched" if ok else "NOT patched"))
        return 0 if ok else 1
    if patch(path):
        print("[patch_jittor] patched %s (per-kernel compile lock); Jittor rebuilds its core on the next import" % path)
    else:
        print("[patch_jittor] %s already patched" % path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
