"""GPU benchmarks of issue #21, ours (Jittor) beside the PyTorch reference code, one measurement per process.

    python bench/gpu_bench.py --side ours --bench adm256_ddim       # ADM-256 (released flags), fp16, DDIM-25, batch 16
    python bench/gpu_bench.py --side ref  --bench adm256_ddim       # the same with openai/guided-diffusion's code
    python bench/gpu_bench.py --side ours --bench dit_cfg           # DiT-XL/2 256, CFG 4.0, 50 DDPM steps, batch 16
    python bench/gpu_bench.py --side ours --bench adm64_train       # ADM-64 (released flags), fp16, one step, batch 32
    python bench/gpu_bench.py --summarize OUT_DIR                   # gpu_summary.json from what gpu_check.sh wrote

Each run prints one JSON line (and appends it to --out): the first call (Jittor compiles its kernels there; cached
on disk afterwards) apart from the steady state (median of --repeats warm calls), and images/s. `--side ref` needs
the reference sources in bench/reference_src/ (bench/fetch_reference.sh) and a Python with torch (timm for DiT); it
never imports this package, so it runs in the GPU machine's own Python. `--tiny` shrinks every model so the whole
harness runs on a CPU in seconds (a rehearsal: figures from it mean nothing).

Both sides start from their framework's default initialisation of the same architecture, with every parameter that
the reference initialises to exactly zero (zero_module, adaLN, final layers) filled with N(0, 0.02^2) instead, so no
layer multiplies by zeros; the noise and labels are the same seeded arrays on both sides. DiT runs with TF32 matrix
products on both sides (DiT's sample.py sets torch.backends.cuda.matmul.allow_tf32; ours: jt.flags.use_tensorcore=1);
the ADM benchmarks keep each framework's defaults. The VAE decode is not timed (the reference's needs diffusers).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
import xml.etree.ElementTree as ET

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REF_SRC = os.path.join(HERE, "reference_src")

# The released model flags (guided-diffusion README), as in bench/configs.py; fp16 as the GPU commands use it.
ADM256 = dict(attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, image_size=256, learn_sigma=True,
              noise_schedule="linear", num_channels=256, num_head_channels=64, num_res_blocks=2, resblock_updown=True,
              use_fp16=True, use_scale_shift_norm=True)
ADM64 = dict(attention_resolutions="32,16,8", class_cond=True, diffusion_steps=1000, dropout=0.1, image_size=64,
             learn_sigma=True, noise_schedule="cosine", num_channels=192, num_head_channels=64, num_res_blocks=3,
             resblock_updown=True, use_new_attention_order=True, use_fp16=True, use_scale_shift_norm=True)
# --tiny: the same code paths on models small enough for a CPU.
TINY_ADM = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="16",
                num_head_channels=16)

BENCHES = {
    # name: (batch, repeats, tiny batch)
    "adm256_ddim": (16, 2, 2),
    "dit_cfg": (16, 2, 2),
    "adm64_train": (32, 5, 2),
}


def _bench_settings(name, args):
    """Batch, repeats and the bench's own sizes for a run (--tiny shrinks them)."""
    batch, repeats, tiny_batch = BENCHES[name]
    s = {"batch": args.batch or (tiny_batch if args.tiny else batch),
         "repeats": args.repeats or (1 if args.tiny else repeats)}
    if name == "adm256_ddim":
        s["steps"] = 2 if args.tiny else 25
        s["flags"] = dict(ADM256, **(TINY_ADM if args.tiny else {}), timestep_respacing="ddim%d" % s["steps"])
    elif name == "dit_cfg":
        s.update(model="DiT-S/8" if args.tiny else "DiT-XL/2", latent=16 if args.tiny else 32,
                 steps=2 if args.tiny else 50, cfg_scale=4.0)
    elif name == "adm64_train":
        s["flags"] = dict(ADM64, **(TINY_ADM if args.tiny else {}))
    return s


def _inputs(shape, n_classes, seed=0):
    """The seeded noise and labels both sides use."""
    rng = np.random.RandomState(seed)
    return rng.randn(*shape).astype(np.float32), rng.randint(0, n_classes, size=(shape[0],)).astype(np.int64)


DEADLINE = [0.0]  # --deadline: wall-clock time (time.time()) by which the process must have printed its record


def _timed(run, sync, repeats, capture=None):
    """First call apart from the median of up to `repeats` warm calls (wall seconds, device work included).

    Warm calls stop early when the next one would end past --deadline; `capture` (a context manager with a `.text`
    after exit) collects what the warm calls print, to count kernels compiled after the first call.
    """
    t0 = time.perf_counter()
    run()
    sync()
    first = time.perf_counter() - t0
    times, last = [], first
    import contextlib
    with (capture or contextlib.nullcontext()) as captured:
        for _ in range(repeats):
            if DEADLINE[0] and time.time() + 1.2 * last + 5 > DEADLINE[0]:
                break
            t0 = time.perf_counter()
            run()
            sync()
            last = time.perf_counter() - t0
            times.append(last)
    out = {"first_call_s": round(first, 4), "repeats": len(times), "repeats_asked": repeats}
    if times:
        median = statistics.median(times)
        out.update(compile_s=round(max(first - median, 0.0), 4), steady_median_s=round(median, 4),
                   steady_min_s=round(min(times), 4))
    else:
        out["note"] = "no warm call fitted in the time budget: first call only"
    if capture is not None:
        out["compiles_in_steady"] = captured.text.count("Compiling Operators")
    return out


# ---------------------------------------------------------------------------------------------------------------
# ours (Jittor)
# ---------------------------------------------------------------------------------------------------------------

def _ours_setup(device):
    """Import this package (which prepares Jittor) and put it on the requested device."""
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    import guided_diffusion  # noqa: F401  (Jittor's environment first)
    import jittor as jt
    if device == "cuda":
        if not jt.has_cuda:
            raise SystemExit("gpu_bench: error: --device cuda but Jittor has no CUDA (see README, 'CUDA machines')")
        jt.flags.use_cuda = 1
    else:
        jt.flags.use_cuda = 0
    return jt


def _ours_fill_zero_params(jt, model, seed=1):
    """Fill every all-zero parameter with N(0, 0.02^2) (see the module docstring)."""
    rng = np.random.RandomState(seed)
    filled = 0
    for p in model.parameters():
        a = p.numpy()
        if a.size and not a.any():
            p.assign(jt.array(rng.normal(0.0, 0.02, a.shape).astype(a.dtype)))
            filled += 1
    return filled


def _ours_measure(jt, run, repeats):
    """_timed with Jittor's synchronisation, counting the kernels compiled during the warm calls."""
    from timing import _StderrCapture
    return _timed(run, lambda: jt.sync_all(True), repeats, capture=_StderrCapture())


def ours_adm256_ddim(s, device):
    """ADM-256 DDIM sampling through our SpacedDiffusion.ddim_sample_loop."""
    jt = _ours_setup(device)
    from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
    flags = model_and_diffusion_defaults()
    flags.update(s["flags"])
    model, diffusion = create_model_and_diffusion(**flags)
    filled = _ours_fill_zero_params(jt, model)
    if flags["use_fp16"]:
        model.convert_to_fp16()
    model.eval()
    size = flags["image_size"]
    shape = (s["batch"], 3, size, size)
    noise, labels = _inputs(shape, 1000)
    noise, labels = jt.array(noise), jt.array(labels.astype(np.int32))

    def run():
        with jt.no_grad():
            return diffusion.ddim_sample_loop(model, shape, noise=noise, clip_denoised=True,
                                              model_kwargs={"y": labels})

    out = _ours_measure(jt, run, s["repeats"])
    out.update(fp16=model.dtype == "float16", filled_zero_params=filled, use_tensorcore=int(jt.flags.use_tensorcore))
    return out


def ours_dit_cfg(s, device):
    """DiT classifier-free-guided DDPM sampling through our p_sample_loop and forward_with_cfg."""
    jt = _ours_setup(device)
    sys.path.insert(0, os.path.join(ROOT, "DiT"))
    from diffusion import create_diffusion
    from models import DiT_models
    jt.flags.use_tensorcore = 1 if device == "cuda" else 0  # TF32, as DiT's sample.py allows it in the reference
    model = DiT_models[s["model"]](input_size=s["latent"])
    filled = _ours_fill_zero_params(jt, model)
    model.eval()
    diffusion = create_diffusion(str(s["steps"]))
    n = s["batch"]
    z, y = _inputs((n, 4, s["latent"], s["latent"]), 1000)
    z2 = jt.array(np.concatenate([z, z], 0))
    y2 = jt.array(np.concatenate([y, np.full(n, 1000)], 0).astype(np.int32))

    def run():
        with jt.no_grad():
            return diffusion.p_sample_loop(model.forward_with_cfg, tuple(z2.shape), z2, clip_denoised=False,
                                           model_kwargs=dict(y=y2, cfg_scale=s["cfg_scale"]))

    out = _ours_measure(jt, run, s["repeats"])
    out.update(filled_zero_params=filled, use_tensorcore=int(jt.flags.use_tensorcore))
    return out


def ours_adm64_train(s, device):
    """One ADM-64 training step (forward, backward, AdamW, EMA, logging) through our TrainLoop.run_step."""
    jt = _ours_setup(device)
    import tempfile
    from guided_diffusion import logger
    from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
    from guided_diffusion.train_util import TrainLoop
    flags = model_and_diffusion_defaults()
    flags.update(s["flags"])
    with tempfile.TemporaryDirectory() as log_dir:
        logger.configure(dir=log_dir, format_strs=[])
        model, diffusion = create_model_and_diffusion(**flags)
        filled = _ours_fill_zero_params(jt, model)
        size = flags["image_size"]
        x, y = _inputs((s["batch"], 3, size, size), 1000)
        x = np.clip(x, -1, 1)
        loop = TrainLoop(model=model, diffusion=diffusion, data=None, batch_size=s["batch"], microbatch=-1,
                         lr=1e-4, ema_rate="0.9999", log_interval=10 ** 9, save_interval=10 ** 9,
                         resume_checkpoint="", use_fp16=flags["use_fp16"], fp16_scale_growth=1e-3)

        def run():
            loop.run_step(x, {"y": y})
            loop.step += 1

        out = _ours_measure(jt, run, s["repeats"])
        out.update(fp16=bool(loop.mp_trainer.use_fp16), filled_zero_params=filled,
                   lg_loss_scale=float(getattr(loop.mp_trainer, "lg_loss_scale", 0.0)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# ref (PyTorch reference code from bench/reference_src)
# ---------------------------------------------------------------------------------------------------------------

def _ref_setup(device, subdir):
    """Put one reference tree first on sys.path and import torch."""
    src = os.path.join(REF_SRC, subdir)
    if not os.path.isdir(src):
        raise SystemExit("gpu_bench: error: %s is missing: run bench/fetch_reference.sh first" % src)
    sys.path.insert(0, src)
    try:
        import torch
    except ImportError:
        raise SystemExit("gpu_bench: error: --side ref needs PyTorch in this Python (%s)" % sys.executable)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: error: --device cuda but torch.cuda.is_available() is false")
    return torch, torch.device(device)


def _ref_fill_zero_params(torch, model, seed=1):
    """Fill every all-zero parameter with N(0, 0.02^2) (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    filled = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
                filled += 1
    return filled


def _ref_sync(torch, device):
    """A synchronize function for the device."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _ref_extra(torch, device):
    """Peak device memory and the TF32 settings in force."""
    out = {"allow_tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
           "allow_tf32_cudnn": bool(torch.backends.cudnn.allow_tf32)}
    if device.type == "cuda":
        out["peak_device_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
    return out


def ref_adm256_ddim(s, device):
    """ADM-256 DDIM sampling with guided-diffusion's script_util / ddim_sample_loop."""
    torch, dev = _ref_setup(device, "guided-diffusion")
    from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
    flags = model_and_diffusion_defaults()
    flags.update(s["flags"])
    fp16 = flags["use_fp16"] and dev.type == "cuda"  # the reference's fp16 is a CUDA path
    flags["use_fp16"] = fp16
    model, diffusion = create_model_and_diffusion(**flags)
    filled = _ref_fill_zero_params(torch, model)
    model.to(dev)
    if fp16:
        model.convert_to_fp16()
    model.eval()
    size = flags["image_size"]
    shape = (s["batch"], 3, size, size)
    noise, labels = _inputs(shape, 1000)
    noise, labels = torch.from_numpy(noise).to(dev), torch.from_numpy(labels).to(dev)

    def run():
        with torch.no_grad():
            return diffusion.ddim_sample_loop(model, shape, noise=noise, clip_denoised=True,
                                              model_kwargs={"y": labels}, device=dev, progress=False)

    out = _timed(run, _ref_sync(torch, dev), s["repeats"])
    out.update(fp16=fp16, filled_zero_params=filled, **_ref_extra(torch, dev))
    return out


def ref_dit_cfg(s, device):
    """DiT classifier-free-guided DDPM sampling as DiT's sample.py does it."""
    torch, dev = _ref_setup(device, "DiT")
    torch.backends.cuda.matmul.allow_tf32 = True  # as DiT's sample.py
    torch.backends.cudnn.allow_tf32 = True
    try:
        from models import DiT_models
    except ImportError as e:
        raise SystemExit("gpu_bench: error: the reference DiT needs timm (%s)" % e)
    from diffusion import create_diffusion
    model = DiT_models[s["model"]](input_size=s["latent"])
    filled = _ref_fill_zero_params(torch, model)
    model.to(dev).eval()
    diffusion = create_diffusion(str(s["steps"]))
    n = s["batch"]
    z, y = _inputs((n, 4, s["latent"], s["latent"]), 1000)
    z2 = torch.from_numpy(np.concatenate([z, z], 0)).to(dev)
    y2 = torch.from_numpy(np.concatenate([y, np.full(n, 1000)], 0)).to(dev)

    def run():
        with torch.no_grad():
            return diffusion.p_sample_loop(model.forward_with_cfg, z2.shape, z2, clip_denoised=False,
                                           model_kwargs=dict(y=y2, cfg_scale=s["cfg_scale"]), progress=False,
                                           device=dev)

    out = _timed(run, _ref_sync(torch, dev), s["repeats"])
    import timm
    out.update(filled_zero_params=filled, timm=timm.__version__, **_ref_extra(torch, dev))
    return out


def ref_adm64_train(s, device):
    """One ADM-64 training step with the reference's MixedPrecisionTrainer, AdamW and EMA, in TrainLoop's order."""
    torch, dev = _ref_setup(device, "guided-diffusion")
    import copy
    import tempfile
    from guided_diffusion import logger
    from guided_diffusion.fp16_util import MixedPrecisionTrainer
    from guided_diffusion.nn import update_ema
    from guided_diffusion.resample import UniformSampler
    from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults
    flags = model_and_diffusion_defaults()
    flags.update(s["flags"])
    fp16 = flags["use_fp16"] and dev.type == "cuda"
    flags["use_fp16"] = fp16
    with tempfile.TemporaryDirectory() as log_dir:
        logger.configure(dir=log_dir, format_strs=[])
        model, diffusion = create_model_and_diffusion(**flags)
        filled = _ref_fill_zero_params(torch, model)
        model.to(dev)
        sampler = UniformSampler(diffusion)
        mp = MixedPrecisionTrainer(model=model, use_fp16=fp16, fp16_scale_growth=1e-3)
        opt = torch.optim.AdamW(mp.master_params, lr=1e-4, weight_decay=0.0)
        ema = copy.deepcopy(mp.master_params)
        size = flags["image_size"]
        x, y = _inputs((s["batch"], 3, size, size), 1000)
        x = torch.from_numpy(np.clip(x, -1, 1)).to(dev)
        y = torch.from_numpy(y).to(dev)
        state = {"step": 0}

        def run():
            # TrainLoop.run_step without DDP (one process): forward_backward, optimize, EMA, log_step.
            mp.zero_grad()
            t, weights = sampler.sample(x.shape[0], dev)
            losses = diffusion.training_losses(model, x, t, model_kwargs={"y": y})
            loss = (losses["loss"] * weights).mean()
            for key, values in losses.items():  # what log_loss_dict logs: the mean and each timestep quartile
                values = values * weights
                logger.logkv_mean(key, values.mean().item())
                for sub_t, sub_loss in zip(t.cpu().numpy(), values.detach().cpu().numpy()):
                    logger.logkv_mean("%s_q%d" % (key, int(4 * sub_t / diffusion.num_timesteps)), sub_loss)
            mp.backward(loss)
            if mp.optimize(opt):
                update_ema(ema, mp.master_params, rate=0.9999)
            logger.logkv("step", state["step"])
            logger.logkv("samples", (state["step"] + 1) * x.shape[0])
            state["step"] += 1

        out = _timed(run, _ref_sync(torch, dev), s["repeats"])
        out.update(fp16=fp16, filled_zero_params=filled, lg_loss_scale=float(mp.lg_loss_scale),
                   **_ref_extra(torch, dev))
    return out


# ---------------------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------------------

def _read_jsonl(path):
    """The JSON records of a file, one per line (missing file: none)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    out.append({"unparsed": line[:500]})
    return out


def _junit_summary(path):
    """Counts and failing test names of a pytest --junitxml file."""
    if not os.path.exists(path):
        return {"ran": False}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"ran": True, "tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time_s": 0.0, "failed": [],
           "skipped_names": [], "passed_names": []}
    for suite in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            out[key] += int(suite.get(key, 0))
        out["time_s"] += float(suite.get("time", 0.0))
        for case in suite.iter("testcase"):
            name = "%s::%s" % (case.get("classname", ""), case.get("name", ""))
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            printed = case.find("system-out")
            text = "\n".join(line for line in (printed.text or "").splitlines() if line.strip()
                              and not line.startswith("-----")) if printed is not None else ""
            if text:
                out.setdefault("printed", {})[name] = text[-600:]
            if bad is not None:
                out["failed"].append({"test": name, "message": (bad.get("message") or "")[:400]})
            elif case.find("skipped") is not None:
                out["skipped_names"].append(name)
            else:
                out["passed_names"].append(name)
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    out["time_s"] = round(out["time_s"], 2)
    return out


def summarize(out_dir):
    """Write out_dir/gpu_summary.json from the stage, version, test and bench files; print a short table."""
    versions = {}
    if os.path.exists(os.path.join(out_dir, "versions.json")):
        with open(os.path.join(out_dir, "versions.json")) as f:
            versions = json.load(f)
    stages = _read_jsonl(os.path.join(out_dir, "stages.jsonl"))
    records = _read_jsonl(os.path.join(out_dir, "bench.jsonl"))
    tests = _junit_summary(os.path.join(out_dir, "pytest.xml"))
    bench = {}
    for r in records:
        if "bench" in r and "side" in r:
            bench.setdefault(r["bench"], {})[r["side"]] = r
    for name, sides in bench.items():
        ours, ref = sides.get("ours", {}), sides.get("ref", {})
        if ours.get("steady_median_s") and ref.get("steady_median_s"):
            sides["time_ratio_ours_over_ref"] = round(ours["steady_median_s"] / ref["steady_median_s"], 3)
    summary = {"issue": 21, "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "versions": versions, "stages": stages, "tests": tests, "bench": bench}
    with open(os.path.join(out_dir, "gpu_summary.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    print("== gpu_check summary (%s)" % os.path.join(out_dir, "gpu_summary.json"))
    for st in stages:
        print("stage %-8s rc=%-4s %7.1fs  %s" % (st.get("stage"), st.get("rc"), float(st.get("seconds", 0)),
                                                st.get("note", "")))
    if tests.get("ran"):
        print("tests: %d passed, %d failed, %d errors, %d skipped (%.0fs)" % (
            tests["passed"], tests["failures"], tests["errors"], tests["skipped"], tests["time_s"]))
        for f in tests["failed"]:
            print("  FAILED %s: %s" % (f["test"], f["message"][:160].replace("\n", " ")))
        for name, text in sorted(tests.get("printed", {}).items()):
            print("  %s printed: %s" % (name.rsplit("::", 1)[-1], text.strip().splitlines()[-1][:200]))
    print("%-12s %-5s %10s %10s %10s %8s" % ("bench", "side", "first_s", "steady_s", "img/s", "ratio"))
    for name, sides in sorted(bench.items()):
        for side in ("ours", "ref"):
            r = sides.get(side)
            if not r:
                continue
            if "error" in r:
                print("%-12s %-5s error: %s" % (name, side, str(r["error"])[:120]))
                continue
            print("%-12s %-5s %10s %10s %10s %8s" % (name, side, r.get("first_call_s"), r.get("steady_median_s"),
                                                   r.get("images_per_s"),
                                                   sides.get("time_ratio_ours_over_ref", "") if side == "ours" else ""))
    return summary


def main():
    """Run one benchmark side (one JSON line) or summarise a gpu_check.sh output folder."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["ours", "ref"])
    parser.add_argument("--bench", choices=sorted(BENCHES))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--batch", type=int, default=0, help="batch size (default: the issue's)")
    parser.add_argument("--repeats", type=int, default=0, help="warm repeats after the first call")
    parser.add_argument("--tiny", action="store_true", help="tiny models: a CPU rehearsal of the harness")
    parser.add_argument("--out", default="", help="append the JSON line to this file too")
    parser.add_argument("--deadline", type=float, default=0.0,
                        help="time.time() by which to finish: warm repeats that would end later are skipped")
    parser.add_argument("--summarize", metavar="OUT_DIR", help="write OUT_DIR/gpu_summary.json and print a table")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return
    if not args.side or not args.bench:
        parser.error("--side and --bench are required (or --summarize OUT_DIR)")
    DEADLINE[0] = args.deadline
    s = _bench_settings(args.bench, args)
    record = {"bench": args.bench, "side": args.side, "device": args.device, "tiny": args.tiny,
              "batch": s["batch"], "python": platform.python_version()}
    record.update({k: v for k, v in s.items() if k in ("steps", "model", "latent", "cfg_scale")})
    fn = globals()["%s_%s" % (args.side, args.bench)]
    t0 = time.perf_counter()
    try:
        record.update(fn(s, args.device))
        per_call = record.get("steady_median_s") or record["first_call_s"]  # first call only: an upper bound
        record["images_per_s"] = round(s["batch"] / per_call, 3)
        if args.bench == "adm64_train":
            record["steps_per_s"] = round(1.0 / per_call, 3)
    except SystemExit as e:
        record["error"] = str(e)
    except Exception as e:  # noqa: BLE001  (the record must say what broke; gpu_check.sh keeps going)
        import traceback
        record["error"] = "%s: %s" % (type(e).__name__, str(e)[:2000])
        traceback.print_exc()
    record["process_s"] = round(time.perf_counter() - t0, 2)
    line = json.dumps(record, sort_keys=True)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    if "error" in record:
        sys.exit(1)


if __name__ == "__main__":
    main()
