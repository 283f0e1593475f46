"""Safetensors checkpoints (single file or sharded with model.safetensors.index.json), memory-mapped.

Each tensor is copied once, straight from the mapping into its target dtype and device; the mapped pages are
then released (MADV_DONTNEED) so a load never holds the file's pages and the model's copy at the same time.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FP8_BLOCK = 128  # DeepSeek-V3's FP8 checkpoints scale each 128x128 block by weight_scale_inv


class WeightError(ValueError):
    """A checkpoint that cannot be read as the model needs it; the message names the file and tensor."""


class MissingTensorError(WeightError, KeyError):
    """A tensor the model needs is not in the checkpoint at `path` (a KeyError too: a failed lookup by name)."""

    def __init__(self, path: Path | str, tensor: str, detail: str = ""):
        self.path, self.tensor = Path(path), tensor
        super().__init__(f"{path}: tensor {tensor}{detail} is missing from the checkpoint")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int  # absolute byte offset in file
    nbytes: int


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of one .safetensors file and the offset where its data starts."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise WeightError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise WeightError(f"{path}: not a safetensors file (header length {n} is implausible)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise WeightError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightError(f"{path}: not a safetensors file (its header is not JSON)") from None
    return header, 8 + n


class SafetensorsSource:
    """name -> tensor over one or more .safetensors files; `get` materializes a tensor where it is asked."""

    def __init__(self, files: list[Path], path: Path | None = None):
        self.path = path or (files[0] if len(files) == 1 else files[0].parent)  # what the user pointed at
        self.infos: dict[str, TensorInfo] = {}
        self._maps: dict[Path, mmap.mmap] = {}
        for path in files:
            header, start = read_header(path)
            size = path.stat().st_size
            for name, h in header.items():
                if name == "__metadata__":
                    continue
                if h.get("dtype") not in DTYPES:
                    raise WeightError(f"{path}: tensor {name} has unsupported dtype {h.get('dtype')!r}")
                b, e = h["data_offsets"]
                if start + e > size:
                    raise WeightError(f"{path}: tensor {name} runs past the end of the file (truncated download?)")
                self.infos[name] = TensorInfo(name, tuple(h["shape"]), DTYPES[h["dtype"]], path, start + b, e - b)

    @classmethod
    def open(cls, path: str | os.PathLike) -> SafetensorsSource:
        """A directory (sharded with an index, or any *.safetensors in it) or a single file."""
        path = Path(path)
        if path.is_file():
            return cls([path])
        index = path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise WeightError(f"{index}: not a valid index (needs a weight_map object)") from None
            files = sorted({path / f for f in weight_map.values()})
            missing = [f for f in files if not f.exists()]
            if missing:
                raise WeightError(f"{index}: names shard {missing[0].name}, which is not in {path}")
            return cls(files, path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise WeightError(f"{path}: no *.safetensors files")
        return cls(files, path)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def names(self) -> list[str]:
        return list(self.infos)

    def info(self, name: str) -> TensorInfo:
        return self.infos[name]

    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def view(self, name: str) -> torch.Tensor:
        """A zero-copy, read-only-by-contract view of tensor `name` in the mapping; `release` it when done."""
        return self._view(self.infos[name])

    def release(self, name: str) -> None:
        """Drop the mapped pages of tensor `name` from this process's memory (they stay in the page cache)."""
        self._release(self.infos[name])

    def _view(self, info: TensorInfo) -> torch.Tensor:
        mm = self._maps.get(info.file)
        if mm is None:
            with open(info.file, "rb") as f:
                # private mapping: writable for torch.frombuffer, never written, so no page is copied
                mm = self._maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        n = 1
        for s in info.shape:
            n *= s
        if n == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(mm, dtype=info.dtype, count=n, offset=info.offset).view(info.shape)

    def _release(self, info: TensorInfo) -> None:
        mm = self._maps[info.file]
        page = mmap.PAGESIZE
        start = info.offset // page * page
        end = min(len(mm), (info.offset + info.nbytes + page - 1) // page * page)
        if end > start and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Tensor `name` as a fresh tensor in `dtype` (default: as stored) on `device`."""
        if name not in self.infos:
            raise MissingTensorError(self.path, name)
        info = self.infos[name]
        scale_name = name + "_scale_inv"
        if info.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and scale_name in self.infos:
            return self._get_fp8(info, self.infos[scale_name], dtype or torch.bfloat16, device)
        view = self._view(info)
        out = view.to(device=device, dtype=dtype or info.dtype, copy=True)
        self._release(info)
        return out

    def fp8(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An FP8 tensor and its block scales (`name`_scale_inv: w = q * scale) as stored, zero-copy views of the
        mapping (copy them before `release`), or None when `name` is not stored so."""
        info, scale = self.infos.get(name), self.infos.get(name + "_scale_inv")
        if info is None or scale is None or info.dtype != torch.float8_e4m3fn:
            return None
        return self._view(info), self._view(scale)

    def _get_fp8(self, info: TensorInfo, scale: TensorInfo, dtype: torch.dtype, device) -> torch.Tensor:
        w = self._view(info).to(device=device).float()
        s = self._view(scale).to(device=device).float()
        rows, cols = w.shape
        s = s.repeat_interleave(FP8_BLOCK, 0)[:rows].repeat_interleave(FP8_BLOCK, 1)[:, :cols]
        self._release(info)
        return (w * s).to(dtype)

    def close(self) -> None:
        for mm in self._maps.values():
            mm.close()
        self._maps.clear()
