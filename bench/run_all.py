"""Run every benchmark, each in a fresh process, and print one JSON line per measurement: `python bench/run_all.py`.

Fresh processes keep the measurements apart (compile caches in memory, peak RSS). OMP_NUM_THREADS (the OpenMP
thread count of oneDNN and of our CPU kernels) passes through from the environment; unset, OpenMP uses every core.
On a machine whose cores are busy with other work, one thread can be faster (see bench/RESULTS.md): `--threads 1 2`
runs the whole set once per value. `--quick` keeps to the issue's headline figures (ADM-64 batch 4, DDIM small-64, training step, DiT-XL/2).
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

FULL = [
    ["bench_unet_forward.py", "--config", "adm64", "--batch", "1"],
    ["bench_unet_forward.py", "--config", "adm64", "--batch", "2"],
    ["bench_unet_forward.py", "--config", "adm64", "--batch", "4"],
    ["bench_unet_forward.py", "--config", "adm256", "--batch", "1", "--repeats", "2"],
    ["bench_unet_forward.py", "--config", "adm256", "--batch", "2", "--repeats", "2"],
    ["bench_unet_forward.py", "--config", "adm256", "--batch", "4", "--repeats", "1"],
    ["bench_ddim_loop.py", "--config", "small64", "--batch", "4", "--steps", "25"],
    ["bench_train_step.py", "--config", "small64", "--batch", "8"],
    ["bench_dit_forward.py", "--model", "DiT-XL/2", "--batch", "2"],
    ["bench_winograd.py"],
]
QUICK_NAMES = {("adm64", "4"), ("small64", "4"), ("small64", "8"), ("DiT-XL/2", "2")}


def _is_quick(cmd):
    args = dict(zip(cmd[1::2], cmd[2::2]))
    key = args.get("--config", args.get("--model")), args.get("--batch")
    return key in QUICK_NAMES


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", nargs="*", default=None,
                        help="OMP_NUM_THREADS values to run the set with (default: the environment's setting)")
    parser.add_argument("--quick", action="store_true", help="only the issue's headline figures")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per benchmark process")
    args = parser.parse_args()
    cmds = [c for c in FULL if not args.quick or _is_quick(c)]
    thread_values = args.threads or [os.environ.get("OMP_NUM_THREADS")]
    failures = 0
    for threads in thread_values:
        env = dict(os.environ)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        for cmd in cmds:
            t0 = time.time()
            try:
                proc = subprocess.run([sys.executable, os.path.join(HERE, cmd[0])] + cmd[1:], cwd=ROOT, env=env,
                                      capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(json.dumps({"bench": cmd[0], "args": cmd[1:], "error": "timeout after %ds" % args.timeout}),
                      flush=True)
                failures += 1
                continue
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                print(json.dumps({"bench": cmd[0], "args": cmd[1:], "error": "exit %d" % proc.returncode,
                                  "stderr_tail": tail}), flush=True)
                failures += 1
                continue
            for line in lines:
                record = json.loads(line)
                record["process_s"] = round(time.time() - t0, 2)
                print(json.dumps(record), flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
