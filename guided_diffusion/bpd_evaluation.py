"""
Bits/dim of a diffusion model on dataset images (image_nll.py's loop).
"""

import os
from typing import Dict, List

import jittor as jt
import numpy as np
from tqdm.auto import tqdm

from . import dist_util, logger
from .checkpoint import atomic_write
from .sampling import label_var


def run_bpd_evaluation(model, diffusion, data, num_samples: int, clip_denoised: bool) -> Dict[str, np.ndarray]:
    """image_nll.py's loop: bits/dim of `num_samples` dataset images (all ranks together) with calc_bpd_loop.

    Logs the running mean bpd; rank 0 writes {vb,mse,xstart_mse}_terms.npz (arr_0: the per-timestep mean) into
    the log dir. Returns those mean terms plus "total_bpd" (the mean over batches).
    """
    world = dist_util.get_world_size()
    all_bpd: List[float] = []
    all_metrics: Dict[str, List[np.ndarray]] = {"vb": [], "mse": [], "xstart_mse": []}
    num_complete = 0
    bar = tqdm(total=num_samples, desc="bits/dim", unit="img", disable=dist_util.get_rank() != 0)
    while num_complete < num_samples:
        batch, extra = next(data)
        batch = jt.array(np.asarray(batch, dtype=np.float32))
        model_kwargs = {k: label_var(v) if k == "y" else jt.array(v) for k, v in extra.items()}
        metrics = diffusion.calc_bpd_loop(model, batch, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        for key, term_list in all_metrics.items():
            terms = metrics[key].mean(dim=0).numpy()
            term_list.append(dist_util.all_reduce_mean_array(terms))
        total_bpd = dist_util.all_reduce_mean_array(np.array(metrics["total_bpd"].mean().numpy()).reshape(()))
        all_bpd.append(float(total_bpd))
        num_complete += world * batch.shape[0]
        bar.update(world * batch.shape[0])
        logger.log(f"done {num_complete} samples: bpd={np.mean(all_bpd)}")
        jt.gc()
    bar.close()

    means = {name: np.mean(np.stack(terms), axis=0) for name, terms in all_metrics.items()}
    if dist_util.get_rank() == 0:
        for name, terms in means.items():
            out_path = os.path.join(logger.get_dir(), f"{name}_terms.npz")
            logger.log(f"saving {name} terms to {out_path}")
            with atomic_write(out_path, "wb") as f:
                np.savez(f, terms)
    dist_util.barrier()
    means["total_bpd"] = np.array(np.mean(all_bpd))
    return means
