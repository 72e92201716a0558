"""
The one downloader of the Jittor side (released checkpoints, CIFAR-10, DiT weights), and the table of the released
guided-diffusion checkpoints that scripts/download_models.py fetches by name.

Files are streamed to a temporary sibling and renamed only when complete, so an interrupted download never
leaves a truncated file that later looks valid. Without network access the error names the URL and where
to put the file by hand.
"""

import os
from typing import Dict, List, Sequence

import requests
from tqdm.auto import tqdm

from .checkpoint import atomic_write
from .errors import DownloadError, UserError

CHUNK = 1 << 20


def download_file(url: str, dest: str, *, what: str, place_hint: str = "", timeout: float = 30.0) -> str:
    """Return `dest`, downloading `url` there first if it does not exist yet."""
    if os.path.exists(dest):
        return dest
    hint = place_hint or "download it by hand and save it as %s" % os.path.abspath(dest)
    try:
        with requests.get(url, stream=True, timeout=timeout) as resp:
            resp.raise_for_status()
            total = int(resp.headers.get("content-length", 0)) or None
            with atomic_write(dest) as f, tqdm(total=total, unit="B", unit_scale=True,
                                               desc="downloading %s" % os.path.basename(dest)) as bar:
                for chunk in resp.iter_content(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (requests.RequestException, OSError) as exc:
        raise DownloadError(
            "could not download %s from %s (%s: %s).\n"
            "  This machine may be offline. To continue, %s." % (what, url, type(exc).__name__, exc, hint)
        ) from exc
    return dest


RELEASED_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/{file}"

#: The released checkpoints and what they are (README of openai/guided-diffusion).
RELEASED_CHECKPOINTS: Dict[str, str] = {
    "64x64_classifier.pt": "ImageNet 64x64 noisy classifier",
    "64x64_diffusion.pt": "ImageNet 64x64 class-conditional diffusion model",
    "128x128_classifier.pt": "ImageNet 128x128 noisy classifier",
    "128x128_diffusion.pt": "ImageNet 128x128 class-conditional diffusion model",
    "256x256_classifier.pt": "ImageNet 256x256 noisy classifier",
    "256x256_diffusion.pt": "ImageNet 256x256 class-conditional diffusion model",
    "256x256_diffusion_uncond.pt": "ImageNet 256x256 unconditional diffusion model",
    "512x512_classifier.pt": "ImageNet 512x512 noisy classifier",
    "512x512_diffusion.pt": "ImageNet 512x512 class-conditional diffusion model",
    "64_256_upsampler.pt": "ImageNet 64->256 super-resolution model",
    "128_512_upsampler.pt": "ImageNet 128->512 super-resolution model",
    "lsun_bedroom.pt": "LSUN bedroom unconditional diffusion model",
    "lsun_cat.pt": "LSUN cat unconditional diffusion model",
    "lsun_horse.pt": "LSUN horse unconditional diffusion model",
    "lsun_horse_nodropout.pt": "LSUN horse unconditional diffusion model (trained without dropout)",
}


def released_checkpoint_summary() -> List[str]:
    """One line per released checkpoint: name and description."""
    return ["%-28s %s" % (name[:-3], what) for name, what in RELEASED_CHECKPOINTS.items()]


def download_released_checkpoints(names: Sequence[str], models_dir: str) -> List[str]:
    """Download released checkpoints by name ("256x256_diffusion", "... .pt" or "all") into models_dir."""
    files: List[str] = []
    for name in names:
        if name == "all":
            files.extend(RELEASED_CHECKPOINTS)
            continue
        file = name if name.endswith(".pt") else name + ".pt"
        if file not in RELEASED_CHECKPOINTS:
            raise UserError("unknown checkpoint %r; the released ones are: %s" % (
                name, ", ".join(n[:-3] for n in RELEASED_CHECKPOINTS)))
        files.append(file)
    paths = []
    for file in dict.fromkeys(files):  # keep order, drop repeats
        url = RELEASED_URL.format(file=file)
        dest = os.path.join(models_dir, file)
        paths.append(download_file(url, dest, what="the %s (%s)" % (RELEASED_CHECKPOINTS[file], file),
                                   place_hint="download %s in a browser and save it as %s"
                                              % (url, os.path.abspath(dest))))
    return paths
