"""
The one downloader of the Jittor side (released checkpoints, CIFAR-10, DiT weights).

Files are streamed to a temporary sibling and renamed only when complete, so an interrupted download never
leaves a truncated file that later looks valid. Without network access the error names the URL and where
to put the file by hand.
"""

import os

import requests
from tqdm.auto import tqdm

from .checkpoint import atomic_write
from .errors import DownloadError

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
