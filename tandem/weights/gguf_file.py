"""The GGUF container (v2 and v3): metadata and tensor directory, read from a memory mapping, split files joined.

Layout: magic "GGUF", u32 version, u64 tensor count, u64 metadata count, the metadata (key, type, value), the
tensor directory (name, dims innermost first, ggml type, offset), then the data, aligned to general.alignment.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tandem.weights.gguf_quants import TYPES
from tandem.weights.safetensors import WeightError

MAGIC = b"GGUF"
SPLIT = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")

# metadata value types: id -> (struct code, numpy dtype); 7 bool, 8 string, 9 array are special
SCALARS = {0: ("B", np.uint8), 1: ("b", np.int8), 2: ("H", np.uint16), 3: ("h", np.int16), 4: ("I", np.uint32),
           5: ("i", np.int32), 6: ("f", np.float32), 10: ("Q", np.uint64), 11: ("q", np.int64),
           12: ("d", np.float64)}
BOOL, STRING, ARRAY = 7, 8, 9


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """One tensor as stored: `shape` in PyTorch order (outermost first), bytes at `offset` of `file`."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    file: Path
    offset: int  # absolute
    nbytes: int


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise WeightError(f"{self.path}: truncated GGUF header (needs byte {self.pos + n}, has {len(self.buf)})")

    def scalar(self, code: str):
        n = struct.calcsize(code)
        self.need(n)
        (v,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += n
        return v

    def string(self) -> str:
        n = self.scalar("Q")
        self.need(n)
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int, key: str):
        if vtype == 6:  # float32: its shortest decimal (1e-05, not 9.999999747378752e-06)
            return float(str(np.float32(self.scalar("f"))))
        if vtype in SCALARS:
            return self.scalar(SCALARS[vtype][0])
        if vtype == BOOL:
            return bool(self.scalar("B"))
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, n = self.scalar("I"), self.scalar("Q")
            if etype in SCALARS:  # numeric arrays in one read
                dt = np.dtype(SCALARS[etype][1]).newbyteorder("<")
                self.need(n * dt.itemsize)
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).copy()
                self.pos += n * dt.itemsize
                return arr.tolist()
            return [self.value(etype, key) for _ in range(n)]
        raise WeightError(f"{self.path}: metadata {key} has unknown value type {vtype}")


class GGUFFile:
    """One .gguf file: `metadata` (key -> Python value) and `tensors` (GGUF name -> GGUFTensor)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = f.seek(0, 2)
                if size < 24:
                    raise WeightError(f"{path}: not a GGUF file (only {size} bytes)")
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as e:
            raise WeightError(f"{path}: cannot read ({e.strerror})") from None
        if self.map[:4] != MAGIC:
            raise WeightError(f"{path}: not a GGUF file (magic {bytes(self.map[:4])!r}, expected b'GGUF')")
        c = _Cursor(self.map, path)
        c.pos = 4
        self.version = c.scalar("I")
        if self.version not in (2, 3):
            raise WeightError(f"{path}: GGUF version {self.version} is not supported (2 or 3)")
        n_tensors, n_kv = c.scalar("Q"), c.scalar("Q")
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = c.string()
            self.metadata[key] = c.value(c.scalar("I"), key)
        entries = []
        for _ in range(n_tensors):
            name = c.string()
            dims = [c.scalar("Q") for _ in range(c.scalar("I"))]
            entries.append((name, tuple(reversed(dims)), c.scalar("I"), c.scalar("Q")))
        align = int(self.metadata.get("general.alignment", 32))
        start = (c.pos + align - 1) // align * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, shape, gtype, off in entries:
            if gtype not in TYPES:
                raise WeightError(f"{path}: tensor {name} has ggml type {gtype}, which tandem cannot read")
            qt = TYPES[gtype]
            if shape and shape[-1] % qt.block:
                raise WeightError(f"{path}: tensor {name} row of {shape[-1]} is not whole {qt.name} blocks")
            n = int(np.prod(shape, dtype=np.int64)) if shape else 1
            nbytes = n // qt.block * qt.bytes
            if start + off + nbytes > size:
                raise WeightError(f"{path}: tensor {name} runs past the end of the file (truncated download?)")
            self.tensors[name] = GGUFTensor(name, shape, gtype, path, start + off, nbytes)


def split_files(path: Path) -> list[Path]:
    """All parts of a split model given any one of them (model-00001-of-00003.gguf), else [path]."""
    m = SPLIT.match(path.name)
    if not m:
        return [path]
    n = int(m["n"])
    files = [path.with_name(f"{m['stem']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise WeightError(f"{path}: split model part {missing[0].name} is missing")
    return files


def open_gguf(path: str | Path) -> list[GGUFFile]:
    """Every part of a GGUF model; metadata lives in the first."""
    return [GGUFFile(p) for p in split_files(Path(path))]
