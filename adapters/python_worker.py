"""A `type: python` worker: one process that loads one model and runs the batches sent to it.

The sidecar runs this file as a script with whichever interpreter the backend names
(`python: /venv/bin/python`), so it must stand alone: the standard library and numpy
(1 or 2) only, nothing from Coalesce, and Python 3.8 or later (annotations are never
evaluated). The sidecar imports the same file for the helpers both ends share
(`Region`, `frame`, `read_frame`).

Why shared memory: a batch's tensors are written into a file mapped by both
processes (a memfd, unlinked from birth, so nothing is left behind even after
`kill -9`), and only a small header crosses the control socket. Pickling arrays
through a pipe costs a serialisation, a kernel copy each way and a deserialisation
per tensor; here each side does one memcpy. Measured (benchmarks/python_workers.py):
the same from about 64 KiB down, 8x faster at 1 MiB, 17-19x at 16-64 MiB.

Control socket protocol, length-prefixed pickles of builtins only (never numpy
objects, so the two ends may run different numpy versions):

    sidecar -> worker   {"model", "args"}                                   once
    worker  -> sidecar  {"ok": True, "pid", "inputs", "outputs", "max_batch_size"}
                        | {"ok": False, "error": last traceback line, "traceback"}
    sidecar -> worker   {"tensors": [...], "end": first free byte}          per batch
    worker  -> sidecar  {"ok": True, "tensors": [...]}
                        | {"ok": False, "kind", "message", "invalid": bool}

A tensor is [name, dtype, shape, offset] into the region, or, for object (BYTES)
arrays, which have no fixed-size layout, [name, "O", shape, list of items].
"""

from __future__ import annotations

import ctypes
import importlib
import mmap
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import traceback
from typing import Any

try:
    import numpy as np
except ImportError:  # main() reports it to the sidecar as a start-up failure
    np = None  # type: ignore[assignment]

ALIGN = 64
MIN_REGION = 1 << 20
_LENGTH = struct.Struct("<I")
_PICKLE_PROTOCOL = 4
_PR_SET_PDEATHSIG = 1


def frame(message: dict[str, Any]) -> bytes:
    """A message as it goes on the control socket: 4-byte length, then the pickle."""
    data = pickle.dumps(message, protocol=_PICKLE_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def read_frame(sock: socket.socket) -> dict[str, Any] | None:
    """The next message, or None when the other end has closed the socket."""
    head = _read_exact(sock, _LENGTH.size)
    if head is None:
        return None
    body = _read_exact(sock, _LENGTH.unpack(head)[0])
    return None if body is None else pickle.loads(body)


def _read_exact(sock: socket.socket, count: int) -> bytes | None:
    chunks, left = [], count
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _align(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def _dtype_name(dtype: Any) -> Any:
    """A picklable description that rebuilds the dtype (structured ones keep their fields)."""
    return dtype.descr if dtype.names else dtype.str


def _dtype(name: Any) -> Any:
    return np.dtype([tuple(field) for field in name] if isinstance(name, list) else name)


class Region:
    """One worker's shared file, mapped here. Either end grows it; it never shrinks.

    A grown file is mapped afresh and the old map is dropped, not closed: arrays a
    model kept from an earlier batch still point into it.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map: mmap.mmap | None = None
        self._mapped = 0

    def _ensure(self, end: int, grow: bool) -> mmap.mmap:
        if self._map is None or self._mapped < end:
            size = os.fstat(self.fd).st_size
            if size <= end and grow:
                size = max(MIN_REGION, 1 << end.bit_length())
                os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size)
            self._mapped = size
        return self._map

    def write(self, tensors: dict[str, Any], start: int) -> list[list[Any]]:
        """Copy arrays in from `start`; returns their descriptions for the header."""
        layout, end = [], _align(start)
        for name, array in tensors.items():
            if array.dtype.hasobject:
                layout.append([name, "O", list(array.shape), array.reshape(-1).tolist()])
                continue
            layout.append([name, _dtype_name(array.dtype), list(array.shape), end, array])
            end = _align(end + array.nbytes)
        buffer = self._ensure(end, grow=True)
        for entry in layout:
            if len(entry) == 5:
                array = entry.pop()
                target = np.ndarray(array.shape, array.dtype, buffer=buffer, offset=entry[3])
                np.copyto(target, array, casting="no")
        return layout

    def read(self, layout: list[list[Any]], copy: bool) -> dict[str, Any]:
        """Arrays for the descriptions: fresh copies, or read-only views of the region."""
        buffer = self._ensure(end_of(layout), grow=False)
        tensors = {}
        for name, dtype, shape, where in layout:
            if dtype == "O":
                array = np.empty(len(where), dtype=object)
                array[:] = where
                tensors[name] = array.reshape(shape)
                continue
            view = np.frombuffer(buffer, _dtype(dtype), _count(shape), where).reshape(shape)
            if copy:
                view = view.copy()
            else:
                view.flags.writeable = False
            tensors[name] = view
        return tensors


def _count(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def end_of(layout: list[list[Any]]) -> int:
    """The first byte after the last tensor of a layout: where the answer may start."""
    ends = [e[3] + _dtype(e[1]).itemsize * _count(e[2]) for e in layout if e[1] != "O"]
    return max(ends, default=0)


# --- the worker process --------------------------------------------------------------


def _die_with_parent(lifeline: int, parent: int) -> None:
    """Exit when the sidecar does, however it dies (even `kill -9`).

    Linux: the kernel sends SIGKILL at the parent's death (PR_SET_PDEATHSIG),
    even mid-batch. Anywhere: a thread blocks on a pipe only the sidecar holds
    open for writing; end-of-file means the sidecar is gone.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_lifeline, args=(lifeline,), daemon=True).start()


def _watch_lifeline(fd: int) -> None:
    while os.read(fd, 1):
        pass
    os._exit(1)


def _spec(item: Any) -> list[Any]:
    """A tensor declaration as builtins: a TensorSpec-like object or a (name, dtype, shape)."""
    if hasattr(item, "name"):
        return [str(item.name), str(item.datatype), [int(d) for d in item.shape]]
    name, datatype, shape = item
    return [str(name), str(datatype), [int(d) for d in shape]]


def _load(request: dict[str, Any]) -> Any:
    import numpy  # noqa: F401  (a missing numpy is reported like any start-up failure)

    module_name, _, attr = request["model"].partition(":")
    factory: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        factory = getattr(factory, part)
    return factory(**request["args"])


def _hello(model: Any) -> dict[str, Any]:
    limit = getattr(model, "max_batch_size", None)
    return {
        "ok": True,
        "pid": os.getpid(),
        "inputs": [_spec(s) for s in getattr(model, "inputs", ()) or ()],
        "outputs": [_spec(s) for s in getattr(model, "outputs", ()) or ()],
        "max_batch_size": None if limit is None else int(limit),
    }


def _run(model: Any, region: Region, request: dict[str, Any]) -> dict[str, Any]:
    inputs = region.read(request["tensors"], copy=False)
    try:
        outputs = model(inputs)
        if not isinstance(outputs, dict):
            raise TypeError(f"the model returned {type(outputs).__name__}, not a dict")
        arrays = {str(name): np.asarray(value) for name, value in outputs.items()}
        return {"ok": True, "tensors": region.write(arrays, request["end"])}
    except Exception as exc:
        return {
            "ok": False,
            "kind": type(exc).__name__,
            "message": str(exc),
            "invalid": isinstance(exc, (ValueError, KeyError, TypeError)),
        }


def main(argv: list[str]) -> int:
    control, shared, lifeline, parent = (int(a) for a in argv[1:5])
    sys.path[0] = os.getcwd()  # not this script's folder: its local.py would shadow packages
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the sidecar, which stops us
    _die_with_parent(lifeline, parent)
    sock = socket.socket(fileno=control)
    request = read_frame(sock)
    if request is None:
        return 0
    try:
        model = _load(request)
        hello = _hello(model)
    except BaseException as exc:
        text = traceback.format_exc()
        last = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]
        sock.sendall(frame({"ok": False, "error": last, "traceback": text}))
        return 1
    sock.sendall(frame(hello))
    region = Region(shared)
    while True:
        request = read_frame(sock)
        if request is None:  # the sidecar closed us: stop
            return 0
        sock.sendall(frame(_run(model, region, request)))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
