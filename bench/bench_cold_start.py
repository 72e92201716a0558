"""First runs on a cold kernel cache, and kill/resume cycles: how often a tiny image_train.py fails.

Each repeat empties the `jit/` kernel folder of the Jittor cache named by --cache-name (its core must have been
compiled once: `cache_name=NAME python -c "import guided_diffusion, jittor"`), then:
* cold1 / cold2: runs the command of issue #25 (1 rank, or `mpirun -np 2`), 4 steps;
* killresume: starts a 24-step run, SIGKILLs it after 8-45 s (seeded), three times, each run continuing the last
  one's checkpoints in the same log folder, then runs it to the end.
One JSON line per repeat (exit status, wall time, assembler errors, kernels compiled); --summary FILE prints the
failure counts per variant. --python/--root choose the interpreter and checkout (e.g. an unpatched Jittor and the
code before the fix, for a before/after comparison).

  python bench/bench_cold_start.py --variant after --kind cold1 --size small --reps 5 --data DIR --out r.jsonl
  python bench/bench_cold_start.py --summary r.jsonl
"""

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "small": "--num_channels 32 --channel_mult 1,2 --num_res_blocks 1 --attention_resolutions 16",
    "medium": "--num_channels 64 --channel_mult 1,2,2 --num_res_blocks 2 --attention_resolutions 16,8 "
              "--num_head_channels 32",
}
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"]


def jittor_cache_path(python: str, cache_name: str) -> str:
    """The cache folder Jittor uses for this interpreter (its path is part of the folder's name) and cache_name."""
    out = subprocess.run([python, "-c", "import guided_diffusion, jittor; print(jittor.flags.cache_path)"],
                         env=dict(os.environ, cache_name=cache_name), capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def train_command(args, steps: int):
    cmd = [args.python, os.path.join(args.root, "image_train.py"), "--data_dir", args.data, "--image_size", "32",
           "--batch_size", "2", "--save_interval", "4", "--lr_anneal_steps", str(steps)] + MODELS[args.size].split()
    return MPIRUN + cmd if args.kind.endswith("2") else cmd


def dump_threads_of_session(session: int, path: str) -> None:
    """Every thread's native backtrace of each process in a hung run's session, for finding where it waits."""
    pids = subprocess.run(["pgrep", "-s", str(session)], capture_output=True, text=True).stdout.split()
    with open(path, "w") as f:
        for pid in pids:
            try:
                with open("/proc/%s/cmdline" % pid) as cmdline:
                    f.write("==== pid %s: %s\n" % (pid, cmdline.read().replace("\0", " ")[:300]))
            except OSError:
                continue
            f.flush()
            subprocess.run(["gdb", "-p", pid, "-batch", "-ex", "thread apply all bt 30"], stdout=f,
                           stderr=subprocess.STDOUT, timeout=120)
    print("hung: backtraces of %d processes in %s" % (len(pids), path), flush=True)


def run_once(args, jit: str, steps: int, logdir: str, kill_after=None, timeout: float = 400.0) -> dict:
    env = dict(os.environ, OPENAI_LOGDIR=logdir, cache_name=args.cache_name)
    started = time.time()
    proc = subprocess.Popen(train_command(args, steps), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    killed = False
    try:
        out, _ = proc.communicate(timeout=kill_after or timeout)
    except subprocess.TimeoutExpired:
        if not kill_after:
            dump_threads_of_session(proc.pid, logdir + ".hang.txt")
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        killed = True
    return {"rc": proc.returncode, "wall": round(time.time() - started, 1), "killed": killed,
            "asm_error": "no such instruction" in out or "Run cmd failed" in out,
            "segfault": "segfault" in out.lower() or "signal 11" in out,
            "kernels_on_disk": len([f for f in os.listdir(jit) if f.endswith(".so")]) if os.path.isdir(jit) else 0,
            "tail": out[-400:] if proc.returncode and not killed else ""}


def measure(args) -> None:
    jit = os.path.join(jittor_cache_path(args.python, args.cache_name), "jit")
    for i in range(args.reps):
        if os.path.exists(jit):
            shutil.rmtree(jit)
        logdir = os.path.join(args.work, "log_%s_%s_%s_%d_%d" % (args.variant, args.kind, args.size, i, os.getpid()))
        shutil.rmtree(logdir, ignore_errors=True)
        rec = {"variant": args.variant, "kind": args.kind, "size": args.size, "i": i}
        if args.kind.startswith("cold"):
            rec.update(run_once(args, jit, 4, logdir, timeout=args.timeout))
            rec["ok"] = rec["rc"] == 0
        else:  # killresume
            rng = random.Random(i)
            cycles = [run_once(args, jit, 24, logdir, kill_after=rng.uniform(8, 45)) for _ in range(3)]
            final = run_once(args, jit, 24, logdir, timeout=args.timeout)
            rec["cycles"] = [{k: c[k] for k in ("rc", "wall", "killed", "asm_error", "segfault")} for c in cycles]
            rec["final"] = final
            rec["ok"] = final["rc"] == 0 and not [c for c in cycles if not c["killed"] and c["rc"] != 0]
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec)[:300], flush=True)


def summary(path: str) -> None:
    """Failures per (variant, kind, size): a cold run that did not exit 0 (a 2-rank run killed at the time limit
    counts as a hang), a kill/resume repeat whose runs died on their own or whose final run failed."""
    groups = collections.defaultdict(list)
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            groups[rec["variant"], rec["kind"], rec["size"]].append(rec)
    print("| variant | kind | size | runs | failed | assembler error | hung (killed at the limit) | median wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for (variant, kind, size), recs in sorted(groups.items()):
        runs = [r.get("final", r) for r in recs]
        asm = sum(1 for r in recs if r.get("asm_error") or any(c["asm_error"] for c in r.get("cycles", [])))
        hung = sum(1 for r in recs if r.get("killed"))
        walls = sorted(r["wall"] for r in runs)
        print("| %s | %s | %s | %d | %d | %d | %d | %.0f |" % (variant, kind, size, len(recs),
                                                             sum(1 for r in recs if not r["ok"]), asm, hung,
                                                             walls[len(walls) // 2]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--summary", default="", help="print the failure table of a results file and stop")
    p.add_argument("--variant", default="after", help="a label written into each record (e.g. before / after)")
    p.add_argument("--kind", default="cold1", choices=["cold1", "cold2", "killresume"])
    p.add_argument("--size", default="small", choices=sorted(MODELS))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--root", default=REPO, help="the checkout whose image_train.py runs")
    p.add_argument("--cache-name", default="bench-cold", help="Jittor cache_name whose jit/ folder is emptied")
    p.add_argument("--data", default="", help="a folder of 32x32 images (issue #25: 16 random PNGs per class)")
    p.add_argument("--work", default="/tmp/bench_cold_start")
    p.add_argument("--timeout", type=float, default=400.0, help="seconds before a run counts as hung")
    p.add_argument("--out", default="/tmp/bench_cold_start/results.jsonl")
    args = p.parse_args()
    if args.summary:
        summary(args.summary)
        return
    if not args.data:
        p.error("--data is required")
    os.makedirs(args.work, exist_ok=True)
    measure(args)


if __name__ == "__main__":
    main()
