"""
Functions for downloading pre-trained DiT models (DiT ``download.py``), without torch.

The released checkpoints are raw state dicts fetched from https://dl.fbaipublicfiles.com/DiT/models/ into
``pretrained_models/``; offline, the error says which file to place where. A checkpoint written by train.py holds
``{"model", "ema", "opt", "args"}`` and its EMA weights are returned, as in the reference.
"""

import os
import sys
from typing import Any, Dict

if __name__ == "__main__":  # run as an entry script: DiT's folder, then the repository root, as in sample.py
    DIT_DIR = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [DIT_DIR, os.path.dirname(DIT_DIR)]

import guided_diffusion  # noqa: F401,E402  (prepares Jittor's environment)
from guided_diffusion.checkpoint import load_file  # noqa: E402
from guided_diffusion.download import download_file  # noqa: E402
from guided_diffusion.errors import CheckpointError  # noqa: E402

pretrained_models = {"DiT-XL-2-512x512.pt", "DiT-XL-2-256x256.pt"}
URL_BASE = "https://dl.fbaipublicfiles.com/DiT/models/"


def find_model(model_name: str) -> Dict[str, Any]:
    """A DiT state dict: a released name (downloaded if needed) or a local .pt file (a train.py one gives "ema")."""
    if model_name in pretrained_models:
        return download_model(model_name)
    if not os.path.isfile(model_name):
        base = os.path.basename(model_name)
        if base in pretrained_models:  # e.g. ./pretrained_models/DiT-XL-2-256x256.pt as in the README
            _fetch(base, model_name)
        else:
            raise CheckpointError("could not find DiT checkpoint at %s: check --ckpt (a released name such as "
                                  "DiT-XL-2-256x256.pt, or a .pt file written by train.py)" % model_name)
    checkpoint = load_file(model_name)
    if isinstance(checkpoint, dict) and "ema" in checkpoint:  # supports checkpoints from train.py
        checkpoint = checkpoint["ema"]
    return checkpoint


def download_model(model_name: str) -> Dict[str, Any]:
    """Download (if needed) a released DiT checkpoint into pretrained_models/ and load it."""
    assert model_name in pretrained_models
    local_path = os.path.join("pretrained_models", model_name)
    _fetch(model_name, local_path)
    return load_file(local_path)


def _fetch(model_name: str, local_path: str) -> str:
    if os.path.isfile(local_path):
        return local_path
    os.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)
    url = URL_BASE + model_name
    return download_file(
        url, local_path, what="DiT checkpoint %s" % model_name,
        place_hint="download %s by hand (e.g. on another machine) and save it as %s"
                   % (url, os.path.abspath(local_path)),
    )


if __name__ == "__main__":
    # Download all DiT checkpoints
    from guided_diffusion.errors import run_cli

    def main() -> None:
        for name in sorted(pretrained_models):
            download_model(name)
        print("Done.")

    run_cli(main)
