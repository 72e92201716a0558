"""
Run free_train.py or classifier_train.py (unchanged, with all their flags) on the demo digits: horizontal flips off
(guided_diffusion.digits.apply_digit_training_settings).

    python scripts/demo/train.py free_train.py --data_dir ... [flags]
    python scripts/demo/train.py classifier_train.py --data_dir ... [flags]
"""

import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from guided_diffusion.digits import apply_digit_training_settings  # noqa: E402
from guided_diffusion.errors import UserError, run_cli  # noqa: E402

SCRIPTS = ("free_train.py", "classifier_train.py")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in SCRIPTS:
        raise UserError("usage: python scripts/demo/train.py {%s} [flags of that script]" % ",".join(SCRIPTS))
    script = os.path.join(ROOT, sys.argv[1])
    apply_digit_training_settings()
    sys.argv = [script] + sys.argv[2:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    run_cli(main)
