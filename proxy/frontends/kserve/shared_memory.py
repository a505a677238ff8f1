"""System shared memory, Triton's extension: callers register POSIX shared-memory
regions (/dev/shm) and name them in a request instead of sending the tensor's bytes.

A sidecar shares the pod's /dev/shm with its callers, so large tensors skip the
socket. The regions are read and written with pread/pwrite on a descriptor rather
than through a mapping: a caller that truncates its region while Coalesce reads it
would make a mapped read fault (SIGBUS, the whole sidecar); a short pread is only
an error for that request. Inputs are copied out at decode time, so requests whose
tensors come from shared memory batch with every other request.

Registrations belong to one serving process (with `workers` > 1, a caller's
connection stays with the worker it registered on). One registry serves the gRPC
and REST front ends.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import grpc
from coalesce.errors import CoalesceError, InvalidArgument, NotFound

SHM_DIR = "/dev/shm"
MAX_REGIONS = 1024  # each holds a descriptor open
_KEY = re.compile(r"/?[A-Za-z0-9._-]{1,255}")


class AlreadyExists(CoalesceError):
    code = grpc.StatusCode.ALREADY_EXISTS


@dataclass(frozen=True)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int


class SharedMemory:
    """The registered regions, by name."""

    def __init__(self, directory: str = SHM_DIR) -> None:
        self._directory = directory
        self.regions: dict[str, Region] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise InvalidArgument("name: a shared memory region needs a name")
        if name in self.regions:
            raise AlreadyExists(f"shared memory region '{name}' is already registered")
        if len(self.regions) >= MAX_REGIONS:
            raise InvalidArgument(f"at most {MAX_REGIONS} shared memory regions may be registered")
        if _KEY.fullmatch(key) is None or key.strip("/") in (".", ".."):
            raise InvalidArgument(
                f"key: {key!r:.80} is not a shared memory key (a name in {self._directory})"
            )
        if offset < 0 or byte_size <= 0:
            raise InvalidArgument(f"region '{name}': offset and byte_size must be positive")
        path = os.path.join(self._directory, key.lstrip("/"))
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidArgument(
                f"region '{name}': cannot open shared memory key '{key}': {exc.strerror}"
            ) from None
        size = os.fstat(fd).st_size
        if offset + byte_size > size:
            os.close(fd)
            raise InvalidArgument(
                f"region '{name}': offset {offset} + byte_size {byte_size} is beyond the "
                f"{size} bytes of '{key}'"
            )
        self.regions[name] = Region(name, key, offset, byte_size, fd)

    def unregister(self, name: str = "") -> None:
        """Unregister one region, or every one when `name` is empty (as Triton does)."""
        names = [name] if name else list(self.regions)
        for each in names:
            region = self.regions.pop(each, None)
            if region is not None:
                os.close(region.fd)

    def status(self, name: str = "") -> list[Region]:
        if not name:
            return list(self.regions.values())
        if name not in self.regions:
            raise NotFound(f"no shared memory region '{name}' is registered")
        return [self.regions[name]]

    def _span(self, name: str, offset: int, size: int, tensor: str) -> Region:
        region = self.regions.get(name)
        if region is None:
            raise InvalidArgument(f"tensor '{tensor}': no shared memory region '{name}'")
        if offset < 0 or size < 0 or offset + size > region.byte_size:
            raise InvalidArgument(
                f"tensor '{tensor}': offset {offset} + byte_size {size} is beyond the "
                f"{region.byte_size} bytes of shared memory region '{name}'"
            )
        return region

    def read(self, name: str, offset: int, size: int, tensor: str) -> bytes:
        region = self._span(name, offset, size, tensor)
        data = os.pread(region.fd, size, region.offset + offset)
        if len(data) != size:
            raise InvalidArgument(
                f"tensor '{tensor}': shared memory region '{name}' holds fewer bytes than "
                "registered (it was truncated)"
            )
        return data

    def write(self, name: str, offset: int, size: int, data: bytes, tensor: str) -> None:
        region = self._span(name, offset, size, tensor)
        if len(data) > size:
            raise InvalidArgument(
                f"output '{tensor}': {len(data)} bytes do not fit the {size} bytes given in "
                f"shared memory region '{name}'"
            )
        os.pwrite(region.fd, data, region.offset + offset)

    def close(self) -> None:
        self.unregister()
