"""Where tensors go when they leave the device: one family of storage tiers, keyed by name, shared by ``offload``
(saved activations: one key per tensor, taken back once in backward) and ``offload_states`` (parameters, gradients
and optimizer state: rewritten in place, read back in pieces).

- DiskTier: one file per key in a temporary folder (removed on close, also when the run fails);
- HostTier: pinned CPU memory (for a CUDA device);
- FakeTier: under fake tensors (estimate) the bytes leave by definition; nothing is stored.

Every tier counts the bytes written to it and read back from it.
"""

from __future__ import annotations

import ctypes
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

from memopt.core.errors import MemoptError


def _memory(t: torch.Tensor) -> Any:
    """The bytes of a contiguous CPU tensor as a writable buffer. Not ``.numpy()``: that makes the storage
    unresizable, and a released parameter is a storage resized to 0."""
    return (ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())


class Tier:
    """Where offloaded tensors live, by key; counts the bytes moved each way."""

    def __init__(self) -> None:
        self.written = 0
        self.read = 0

    def put(self, key: str, t: torch.Tensor) -> None:
        """Store a copy of ``t`` under ``key`` (replacing what was there)."""
        raise NotImplementedError

    def read_into(self, key: str, t: torch.Tensor, offset: int = 0) -> None:
        """Fill ``t`` with the bytes stored under ``key``, from byte ``offset``."""
        raise NotImplementedError

    def write_at(self, key: str, t: torch.Tensor, offset: int) -> None:
        """Write ``t`` into the tensor stored under ``key`` at byte ``offset`` (created if need be)."""
        raise NotImplementedError

    def reserve(self, key: str, shape: torch.Size, dtype: torch.dtype) -> None:
        """Make room under ``key`` for a tensor that ``write_at`` fills in pieces (files grow as written)."""

    def take(self, key: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The tensor stored under ``key``, brought back to ``device``; the tier forgets it."""
        t = torch.empty(shape, dtype=dtype, device=device)
        self.read_into(key, t)
        self.forget(key)
        return t

    def forget(self, key: str) -> None:
        """Drop what is stored under ``key``."""

    def close(self) -> None:
        """Forget everything (and remove any files)."""


class DiskTier(Tier):
    """One file per key, rewritten in place; read straight into the device tensor's storage. ``owner`` names the
    strategy option that chose the folder, for the error when it cannot be written."""

    def __init__(self, owner: str, prefix: str, parent: str | None = None):
        super().__init__()
        self.owner = owner
        try:
            self.folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        except OSError as exc:
            raise MemoptError(f"{owner}.folder: cannot create a folder in {parent or tempfile.gettempdir()}:"
                              f" {exc.strerror or exc}") from None
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.folder, True)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.bin"

    def _write(self, key: str, t: torch.Tensor, offset: int | None) -> None:
        path = self._path(key)
        data = t.detach().contiguous()  # held here: _memory's buffer does not keep a temporary copy alive
        try:
            with open(path, "r+b" if offset is not None and path.exists() else "wb") as fh:
                fh.seek(offset or 0)
                fh.write(_memory(data))
        except OSError as exc:
            self.close()
            raise MemoptError(f"{self.owner}: writing to {self.folder} failed: {exc.strerror or exc} (the "
                              f"folder was removed; choose another with {self.owner}.folder)") from None
        self.written += t.numel() * t.element_size()

    def put(self, key: str, t: torch.Tensor) -> None:
        self._write(key, t, None)

    def write_at(self, key: str, t: torch.Tensor, offset: int) -> None:
        self._write(key, t, offset)

    def read_into(self, key: str, t: torch.Tensor, offset: int = 0) -> None:
        assert t.is_contiguous()
        with open(self._path(key), "rb") as fh:
            fh.seek(offset)
            fh.readinto(_memory(t))
        self.read += t.numel() * t.element_size()

    def forget(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def close(self) -> None:
        self._cleanup()


class HostTier(Tier):
    """Pinned CPU tensors (for a CUDA device)."""

    def __init__(self) -> None:
        super().__init__()
        self.host: dict[str, torch.Tensor] = {}

    def put(self, key: str, t: torch.Tensor) -> None:
        home = self.host.get(key)
        if home is None or home.shape != t.shape or home.dtype != t.dtype:
            home = self.host[key] = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        home.copy_(t.detach(), non_blocking=True)
        self.written += t.numel() * t.element_size()

    def reserve(self, key: str, shape: torch.Size, dtype: torch.dtype) -> None:
        if key not in self.host:
            self.host[key] = torch.zeros(shape, dtype=dtype, device="cpu", pin_memory=True)

    def read_into(self, key: str, t: torch.Tensor, offset: int = 0) -> None:
        source = self.host[key].view(-1)[offset // t.element_size():][:t.numel()].view(t.shape)
        t.detach().copy_(source)  # synchronous: a released storage must not be refilled while a copy is in flight
        self.read += t.numel() * t.element_size()

    def write_at(self, key: str, t: torch.Tensor, offset: int) -> None:
        self.host[key].view(-1)[offset // t.element_size():][:t.numel()].copy_(t.detach().view(-1))
        self.written += t.numel() * t.element_size()

    def take(self, key: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        host = self.host.pop(key)
        self.read += host.numel() * host.element_size()
        return host.to(device, non_blocking=True)

    def forget(self, key: str) -> None:
        self.host.pop(key, None)

    def close(self) -> None:
        self.host.clear()


class FakeTier(Tier):
    """Under fake tensors (estimate): the bytes move by definition; nothing is stored, readback allocates again."""

    def put(self, key: str, t: torch.Tensor) -> None:
        self.written += t.numel() * t.element_size()

    def read_into(self, key: str, t: torch.Tensor, offset: int = 0) -> None:
        self.read += t.numel() * t.element_size()

    def write_at(self, key: str, t: torch.Tensor, offset: int) -> None:
        self.put(key, t)
