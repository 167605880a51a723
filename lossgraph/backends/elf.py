"""Loading a native library safely: a structural check of ELF bytes, and dlopen of verified bytes.

Note [Loading verified bytes]: dlopen maps a file; pages past the end of a truncated file fault
with SIGBUS on first touch, and zeroed code faults with SIGSEGV, in the loading process and in
every later one. So a library is never dlopen'ed from a path another process may change: its
bytes are read into memory, checked (the cache's sha256, and `complete()` below for what a
compiler just wrote), then written to a fresh file in this process's private 0700 folder and
that copy is loaded. The copy is kept until the process exits: glibc recognizes an already
loaded library by its name and by its (device, inode), and a deleted file's inode can be reused
by the next copy, which would then silently resolve to the previous library.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import struct
import tempfile

_LOADED: dict[str, ctypes.CDLL] = {}


def complete(data: bytes) -> bool:
    """True when data is an ELF file whose headers, segments and sections all lie inside it."""
    if len(data) < 52 or data[:4] != b"\x7fELF" or data[4] not in (1, 2) or data[5] not in (1, 2):
        return False
    end = "<" if data[5] == 1 else ">"
    wide = data[4] == 2
    try:
        if wide:
            phoff, shoff = struct.unpack_from(end + "QQ", data, 0x20)
            phsize, phnum, shsize, shnum = struct.unpack_from(end + "HHHH", data, 0x36)
        else:
            phoff, shoff = struct.unpack_from(end + "II", data, 0x1C)
            phsize, phnum, shsize, shnum = struct.unpack_from(end + "HHHH", data, 0x2A)
        if phnum == 0 or phoff + phnum * phsize > len(data) or shoff + shnum * shsize > len(data):
            return False
        for i in range(phnum):
            fmt, at = (end + "QQQQQ", 8) if wide else (end + "IIIII", 4)
            off, _, _, filesz, _ = struct.unpack_from(fmt, data, phoff + i * phsize + at)
            if off + filesz > len(data):
                return False
        for i in range(shnum):
            base = shoff + i * shsize
            (kind,) = struct.unpack_from(end + "I", data, base + 4)
            fmt, at = (end + "QQ", 24) if wide else (end + "II", 16)
            off, size = struct.unpack_from(fmt, data, base + at)
            if kind != 8 and off + size > len(data):   # 8: SHT_NOBITS (.bss) has no file bytes
                return False
    except struct.error:
        return False
    return True


def dlopen(data: bytes) -> ctypes.CDLL:
    """Load a library from verified bytes through a private copy (Note [Loading verified bytes])."""
    key = hashlib.sha256(data).hexdigest()
    lib = _LOADED.get(key)
    if lib is None:
        try:
            lib = _from_private_copy(data, key)
        except OSError as e:
            lib = _from_memfd(data, key, e)
        _LOADED[key] = lib
    return lib


def _from_private_copy(data: bytes, key: str) -> ctypes.CDLL:
    from .. import cache
    fd, path = tempfile.mkstemp(dir=cache.scratch_dir(), prefix=key[:16] + "-", suffix=".so")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return ctypes.CDLL(path)


# Note [Anonymous copy]: a private folder on a noexec mount (a hardened /tmp, a container's
# TMPDIR) cannot be mapped executable, and a full or read-only one cannot take the copy at all;
# then the verified bytes go to an anonymous memory file (memfd_create, Linux) loaded through
# /proc/self/fd. Nobody else can open it, and its descriptor stays open for the life of the
# process, so its inode is never reused under a loaded library (see Note [Loading verified
# bytes]). The file copy stays the first choice: its name in /proc/self/maps says what it is.
_MEMFDS: list[int] = []


def _from_memfd(data: bytes, key: str, cause: OSError) -> ctypes.CDLL:
    make = getattr(os, "memfd_create", None)
    if make is None:
        raise cause
    fd = make(f"lossgraph-{key[:16]}", getattr(os, "MFD_CLOEXEC", 0))
    try:
        rest = memoryview(data)
        while rest:
            rest = rest[os.write(fd, rest):]
        lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
    except OSError:
        os.close(fd)
        raise cause from None
    _MEMFDS.append(fd)
    return lib
