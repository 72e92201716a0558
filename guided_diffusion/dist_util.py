"""
Helpers for distributed training and sampling, on Jittor's own MPI support.

Launch several processes with ``mpirun -np N python script.py ...`` (OpenMPI). Jittor then runs one rank per
process: optimizers average gradients across ranks on every step, and this module provides the rest
(parameter broadcast, gathering numpy results, barriers). With a single process every helper is a cheap no-op,
so scripts are written once for both cases.

Checkpoints are read by every rank from the (shared or local) file system rather than read once and
broadcast as the reference does for blob storage: one read per rank is simple and equally correct when the
file is reachable from every node.
"""

from typing import Iterable, List

import jittor as jt
import numpy as np

from . import checkpoint

# Matches the reference's constant; Jittor assigns GPUs to local ranks itself.
GPUS_PER_NODE = 8


def setup_dist() -> None:
    """Prepare the process for (possibly distributed) work: CUDA when available, MPI rank from mpirun."""
    if jt.has_cuda and not jt.flags.use_cuda:
        jt.flags.use_cuda = 1


def dev() -> str:
    """The device this process computes on ("cuda" or "cpu"); Jittor places Vars itself."""
    return "cuda" if jt.flags.use_cuda else "cpu"


def get_rank() -> int:
    """This process's MPI rank (0 without mpirun)."""
    return int(jt.rank) if jt.in_mpi else 0


def get_world_size() -> int:
    """Number of MPI ranks (1 without mpirun)."""
    return int(jt.world_size) if jt.in_mpi else 1


def is_main_process() -> bool:
    """True on the rank that logs and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait until every rank reaches this point."""
    if get_world_size() > 1:
        jt.mpi.mpi_barrier()


def load_state_dict(path: str, **kwargs):
    """Read a checkpoint (torch .pt, zip or legacy) as numpy arrays; kwargs such as map_location are ignored."""
    return checkpoint.load_file(path)


def _broadcast_numpy(arr: np.ndarray, root: int) -> np.ndarray:
    arr = np.ascontiguousarray(arr)
    jt.mpi.broadcast(arr, root)
    return arr


def broadcast_array(arr: np.ndarray, root: int = 0) -> np.ndarray:
    """Every rank receives rank `root`'s array (any shape and dtype; other ranks' inputs are ignored)."""
    if get_world_size() == 1:
        return np.asarray(arr)
    header = np.zeros(34, dtype=np.int64)
    if get_rank() == root:
        arr = np.asarray(arr)
        dtype_code = np.frombuffer(arr.dtype.str.encode("ascii").ljust(16, b" "), dtype=np.int64)
        header[0] = arr.ndim
        header[1:1 + arr.ndim] = arr.shape
        header[32:34] = dtype_code
    header = _broadcast_numpy(header, root)
    ndim = int(header[0])
    shape = tuple(int(s) for s in header[1:1 + ndim])
    dtype = np.dtype(header[32:34].tobytes().decode("ascii").strip())
    buf = np.ascontiguousarray(arr, dtype=dtype) if get_rank() == root else np.empty(shape, dtype=dtype)
    if buf.size == 0:
        return buf
    flat = buf.reshape(-1).view(np.uint8)
    return _broadcast_numpy(flat, root).view(dtype).reshape(shape)


def all_gather_array(arr: np.ndarray) -> List[np.ndarray]:
    """One array per rank, in rank order (shapes may differ between ranks)."""
    arr = np.asarray(arr)
    if get_world_size() == 1:
        return [arr]
    return [broadcast_array(arr, root=r) for r in range(get_world_size())]


def all_reduce_mean_array(arr: np.ndarray) -> np.ndarray:
    """The mean over ranks of an array of the same shape on every rank."""
    parts = all_gather_array(np.asarray(arr, dtype=np.float64))
    return np.mean(np.stack(parts), axis=0)


def all_reduce_sum_array(arr: np.ndarray) -> np.ndarray:
    """The sum over ranks of a small numeric array of the same shape on every rank (one all-reduce)."""
    arr = np.asarray(arr)
    if get_world_size() == 1:
        return arr
    return jt.array(arr.astype(np.float64)).mpi_all_reduce("add").numpy().astype(arr.dtype)


def sync_params(params: Iterable[jt.Var]) -> None:
    """Make every rank hold rank 0's values (Jittor ranks start from different random weights)."""
    if get_world_size() == 1:
        return
    for p in params:
        value = broadcast_array(p.numpy(), root=0)
        p.assign(jt.array(value))
