"""
The training core shared by every trainer (ADM's TrainLoop and ClassifierTrainLoop, DiT's train.py):

* ``loop.py``: the one loop skeleton, seed -> step -> optimize -> EMA -> log -> save / stop;
* ``checkpoints.py``: the checkpoint object (named states written as one atomic set on rank 0, the newest complete
  set found again, the run guard's stop/non-finite/disk-full hooks), with a layout adapter per file family;
* ``ema.py``: weight averages behind one interface (the references' multi-rate EMA, EDM2's power-function EMA);
* ``phema.py``: the power-function EMA's mathematics and the post-hoc reconstruction's least squares (numpy);
* ``reconstruct.py``: post-hoc EMA from a run's snapshot files (scripts/reconstruct_ema.py);
* ``optim.py``: AdamW with a torch-style state dict, and the learning-rate schedules.
"""
