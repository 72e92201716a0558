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
* `compile` holds a per-kernel lock from writing the source to opening the library: a mutex per kernel for the
  threads of one process, and a POSIX record lock (fcntl) on `<kernel>_op.so.lock` for processes. A second compile
  of the same kernel waits, then finds it built (the `.key` matches) and only opens it. The record lock is dropped
  by the kernel when its process dies and is not inherited by children (the first version of this patch used a
  flock, which a child forked during a compile keeps holding after its parent is killed).
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

MARKER = "guided-diffusion-jittor: per-kernel compile lock v2"
# The first version of this patch (a flock per kernel) as written into Jittor, replaced by this one.
OLD_MARKERS = ("guided-diffusion-jittor: per-kernel compile lock (",)

HELPERS_ANCHOR = "JPU(header)\n"
HELPERS = HELPERS_ANCHOR + r"""
// %(marker)s (.ci/patch_jittor.py): one thread of one process compiles and
// loads a given kernel at a time, and kernel sources are replaced atomically.
#ifndef _WIN32
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include <cstdio>
#include <functional>
#include <memory>
#include <thread>
#include <unordered_map>
namespace jittor {
namespace jit_compiler {
// Threads of this process wait on a mutex per kernel; processes on a POSIX record lock of <kernel>_op.so.lock,
// which the kernel drops when its process dies and which no child inherits (a flock would stay held by any
// child forked while it is taken).
struct KernelCompileLock {
    std::unique_lock<std::mutex> in_process;
    int fd = -1;
    static std::mutex& mutex_of(const string& path) {
        static std::mutex table_mutex;
        static std::unordered_map<string, std::unique_ptr<std::mutex>> table;
        std::lock_guard<std::mutex> guard(table_mutex);
        auto& m = table[path];
        if (!m) m.reset(new std::mutex());
        return *m;
    }
    explicit KernelCompileLock(const string& path) : in_process(mutex_of(path)) {
        fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0666);
        if (fd < 0) return;
        struct flock region;
        memset(&region, 0, sizeof(region));
        region.l_type = F_WRLCK;
        region.l_whence = SEEK_SET;
        while (::fcntl(fd, F_SETLKW, &region) != 0 && errno == EINTR) {}
    }
    ~KernelCompileLock() {
        if (fd >= 0) ::close(fd);  // closing drops this process's record lock
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
""" % {"marker": MARKER}

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


def strip_old_version(text: str) -> str:
    """Jittor's source with an earlier version of this patch taken back out (its helpers and its compile lines)."""
    for old in OLD_MARKERS:
        at = text.find("\n// " + old)
        if at < 0 or not text[:at].endswith(HELPERS_ANCHOR):
            continue
        end = text.index("#endif\n", at) + len("#endif\n")
        text = text[:at] + text[end:]
        text = text.replace(COMPILE_PATCHED, COMPILE_ANCHOR)
    return text


def patch(path: str) -> bool:
    """Apply the patch to `path` (atomically; an earlier version of it is replaced); False when it was there."""
    with open(path) as f:
        text = f.read()
    if MARKER in text:
        return False
    text = strip_old_version(text)
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
