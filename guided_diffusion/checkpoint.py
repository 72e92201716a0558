"""
The one checkpoint reader/writer of the project.

* Reads PyTorch ``.pt`` files without PyTorch: the zip container (torch >= 1.6, the released OpenAI and DiT
  checkpoints) and the legacy pickled container. Tensors come back as numpy arrays with their exact dtype
  and shape.
* Writes the same zip container, so our checkpoints are loadable by ``torch.load`` as well, atomically
  (temporary file, then rename).

Copying state dicts into and out of Jittor modules is ``state_dicts``.
"""

import argparse
import builtins
import collections
import copyreg
import contextlib
import io
import os
import pickle
import struct
import tempfile
import zipfile
from typing import Any, Dict, IO, Iterator, List, Optional, Tuple

import numpy as np

from .errors import CheckpointError

# torch storage class name <-> numpy dtype
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_DTYPE_STORAGES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "_reconstruct"): np.core.multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): np.core.multiarray.scalar,
    ("numpy._core.multiarray", "_reconstruct"): np.core.multiarray._reconstruct,
    ("numpy._core.multiarray", "scalar"): np.core.multiarray.scalar,
    ("copyreg", "_reconstructor"): copyreg._reconstructor,
}
_SAFE_BUILTINS = ("dict", "list", "tuple", "int", "float", "str", "bytes", "bool", "object", "set", "frozenset",
                  "slice", "complex")


class _StorageType:
    """Stands for a torch storage class (e.g. torch.FloatStorage) inside a pickle."""

    def __init__(self, name: str):
        self.name = name

    def dtype(self):
        if self.name not in _STORAGE_DTYPES:
            raise CheckpointError("unsupported tensor storage type torch.%s in checkpoint" % self.name)
        return _STORAGE_DTYPES[self.name]


def _as_numpy(raw: bytes, dtype) -> np.ndarray:
    if dtype == "bfloat16":
        bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    return np.frombuffer(raw, dtype=dtype)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> np.ndarray:
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    flat = storage
    if not size:
        return np.array(flat[storage_offset], dtype=flat.dtype)
    if any(s == 0 for s in size):
        return np.zeros(size, dtype=flat.dtype)
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[storage_offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


class _Unpickler(pickle.Unpickler):
    """Unpickler that maps torch's tensor machinery onto numpy and refuses unknown code."""

    def __init__(self, file, load_storage, rebuild_tensor=_rebuild_tensor):
        super().__init__(file)
        self._load_storage = load_storage
        self._rebuild_tensor = rebuild_tensor

    def find_class(self, module, name):
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if module == "torch._utils":
            if name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
                return self._rebuild_tensor
            if name == "_rebuild_parameter":
                return _rebuild_parameter
            if name == "_rebuild_parameter_with_state":
                return _rebuild_parameter_with_state
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "builtins" and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        raise CheckpointError(
            "checkpoint refers to %s.%s, which this loader does not handle (only tensors, dicts, lists, "
            "numbers, strings and argparse.Namespace are supported)" % (module, name)
        )

    def persistent_load(self, pid):
        return self._load_storage(pid)


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise CheckpointError("%s is a zip file but not a PyTorch checkpoint (no data.pkl inside)" % path)
        prefix = pkl[0][: -len("data.pkl")]
        cache: Dict[str, np.ndarray] = {}

        def load_storage(pid):
            kind, storage_type, key, _location, _numel = pid[:5]
            if kind != "storage":
                raise CheckpointError("unexpected persistent id %r in %s" % (kind, path))
            if key not in cache:
                dtype = storage_type.dtype() if isinstance(storage_type, _StorageType) else np.uint8
                cache[key] = _as_numpy(zf.read(prefix + "data/" + str(key)), dtype)
            return cache[key]

        return _Unpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()


class _LegacyStorage:
    """A storage of the legacy format, whose bytes follow the object pickle in the file."""

    def __init__(self, key: str, dtype, view: Optional[tuple]):
        self.key = key
        self.dtype = dtype
        self.view = view
        self.data: Optional[np.ndarray] = None


class _LegacyTensor:
    """A tensor of the legacy format, materialised once its storage bytes have been read."""

    def __init__(self, storage: _LegacyStorage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialise(self) -> np.ndarray:
        flat = self.storage.data
        if self.storage.view is not None:
            _view_key, view_offset, view_size = self.storage.view
            flat = flat[view_offset: view_offset + view_size]
        return _rebuild_tensor(flat, self.offset, self.size, self.stride)


def _materialise(obj):
    if isinstance(obj, _LegacyTensor):
        return obj.materialise()
    if isinstance(obj, collections.OrderedDict):
        fresh = collections.OrderedDict((k, _materialise(v)) for k, v in obj.items())
        fresh.__dict__.update(getattr(obj, "__dict__", {}))
        return fresh
    if isinstance(obj, dict):
        return {k: _materialise(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialise(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v) for v in obj)
    if isinstance(obj, argparse.Namespace):
        return argparse.Namespace(**{k: _materialise(v) for k, v in vars(obj).items()})
    return obj


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        def plain(load_storage=None):
            return _Unpickler(f, load_storage or (lambda pid: None)).load()

        try:
            magic = plain()
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError("%s is not a PyTorch checkpoint" % path) from exc
        if magic != _LEGACY_MAGIC:
            raise CheckpointError("%s is not a PyTorch checkpoint (bad magic number)" % path)
        plain()  # protocol version
        plain()  # sys info
        storages: Dict[str, _LegacyStorage] = {}

        def load_storage(pid):
            if pid[0] != "storage":
                raise CheckpointError("unexpected persistent id %r in %s" % (pid[0], path))
            _, storage_type, root_key, _location, _numel, view_metadata = pid
            root = storages.setdefault(root_key, _LegacyStorage(root_key, storage_type.dtype(), None))
            if view_metadata is None:
                return root
            view = _LegacyStorage(root_key, root.dtype, tuple(view_metadata))
            view.root = root
            return view

        result = _Unpickler(f, load_storage, rebuild_tensor=lambda s, o, size, stride, *r: _LegacyTensor(s, o, size, stride)).load()
        for key in plain():
            st = storages[key]
            (count,) = struct.unpack("<q", f.read(8))
            itemsize = 2 if st.dtype == "bfloat16" else np.dtype(st.dtype).itemsize
            raw = f.read(count * itemsize)
            if len(raw) != count * itemsize:
                raise CheckpointError("checkpoint %s is truncated" % path)
            st.data = _as_numpy(raw, st.dtype)

    def fill_views(obj):
        if isinstance(obj, _LegacyTensor) and obj.storage.data is None and hasattr(obj.storage, "root"):
            obj.storage.data = obj.storage.root.data
        return obj

    def walk_fill(obj):
        if isinstance(obj, dict):
            for v in obj.values():
                walk_fill(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk_fill(v)
        else:
            fill_views(obj)

    walk_fill(result)
    return _materialise(result)


def load_file(path: str) -> Any:
    """Read a PyTorch checkpoint (zip or legacy) into numpy arrays and plain Python containers, without torch."""
    if not os.path.exists(path):
        raise CheckpointError("checkpoint file not found: %s (check the path, or download it first)" % path)
    if os.path.isdir(path):
        raise CheckpointError("%s is a directory, expected a checkpoint file (.pt)" % path)
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        return _load_legacy(path)
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError, ValueError, struct.error,
            IndexError, TypeError, AttributeError, OSError) as exc:
        raise CheckpointError(
            "cannot read checkpoint %s: the file is corrupt, truncated or not a PyTorch checkpoint (%s: %s). "
            "Download or copy it again." % (path, type(exc).__name__, exc)
        ) from exc


# ----------------------------------------------------------------------------------------------- writing


class _TorchGlobal:
    """A reference to a torch global (class or function) written into a pickle without importing torch."""

    def __init__(self, module: str, name: str):
        self.module = module
        self.name = name

    def __call__(self, *args):  # pickle requires reduce functions to be callable; never called here
        raise TypeError("%s.%s is only a reference written into a pickle" % (self.module, self.name))


class _StorageRef:
    def __init__(self, key: str, storage_name: str, numel: int):
        self.key = key
        self.storage_name = storage_name
        self.numel = numel


class _Pickler(pickle._Pickler):  # the pure-Python pickler lets us emit torch globals by name
    def __init__(self, file, storages: List[Tuple[str, np.ndarray]]):
        super().__init__(file, protocol=2)
        self._storages = storages

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", _TorchGlobal("torch", obj.storage_name), obj.key, "cpu", obj.numel)
        return None

    def save_global(self, obj, name=None):
        if isinstance(obj, _TorchGlobal):
            self.write(pickle.GLOBAL + ("%s\n%s\n" % (obj.module, obj.name)).encode("utf-8"))
            self.memoize(obj)
            return
        super().save_global(obj, name)

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _TorchGlobal):
            return self.save_global(obj)
        if type(obj).__module__.startswith("jittor") and hasattr(obj, "numpy"):
            obj = obj.numpy()
        if isinstance(obj, np.generic):
            obj = obj.item()
        if isinstance(obj, np.ndarray):
            return self._save_array(obj)
        return super().save(obj, save_persistent_id)

    def _save_array(self, arr: np.ndarray):
        arr = arr if arr.flags.c_contiguous else arr.copy(order="C")
        if arr.dtype not in _DTYPE_STORAGES:
            raise TypeError("cannot save arrays of dtype %s in a torch checkpoint" % arr.dtype)
        key = str(len(self._storages))
        self._storages.append((key, arr))
        stride = []
        acc = 1
        for s in reversed(arr.shape):
            stride.append(acc)
            acc *= s
        stride = tuple(reversed(stride))
        ref = _StorageRef(key, _DTYPE_STORAGES[arr.dtype], int(arr.size))
        self.save_reduce(
            _TorchGlobal("torch._utils", "_rebuild_tensor_v2"),
            (ref, 0, tuple(int(s) for s in arr.shape), stride, False, collections.OrderedDict()),
        )


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """Write a file through a temporary sibling that replaces `path` only when writing succeeded."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save_file(obj: Any, path: str) -> None:
    """Save nested containers of arrays/Vars/scalars as a torch zip checkpoint, atomically.

    A failed write (disk full, unwritable folder) leaves any earlier file at `path` untouched, removes the partial
    file and raises CheckpointError naming the file and the size being written.
    """
    storages: List[Tuple[str, np.ndarray]] = []
    buf = io.BytesIO()
    _Pickler(buf, storages).dump(obj)
    archive = "archive"
    size = len(buf.getvalue()) + sum(arr.nbytes for _, arr in storages)
    try:
        with atomic_write(path) as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
                zf.writestr(archive + "/data.pkl", buf.getvalue())
                zf.writestr(archive + "/byteorder", "little")
                for key, arr in storages:
                    zf.writestr(archive + "/data/" + key, arr.tobytes())
                zf.writestr(archive + "/version", "3\n")
    except OSError as exc:
        raise CheckpointError(
            "could not write %s (%.1f MB) in %s: %s. The partial file was removed and earlier checkpoints are "
            "intact; free disk space or make the folder writable (or set OPENAI_LOGDIR to another place) and "
            "run again" % (os.path.basename(path), size / 2 ** 20, os.path.dirname(os.path.abspath(path)),
                           exc.strerror or exc)) from None
