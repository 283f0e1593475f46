"""Broken GGUF files: one line naming the file (and tensor), exit code 2, no traceback."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from tandem.cli import main

gguf = pytest.importorskip("gguf")


def _tiny(path, extra=None):
    w = gguf.GGUFWriter(path, "llama")
    for k, v in dict(block_count=1, embedding_length=32, feed_forward_length=64, context_length=64).items():
        w.add_uint32(f"llama.{k}", v)
    w.add_uint32("llama.attention.head_count", 2)
    w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    if extra:
        extra(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _run(path, capsys) -> str:
    code = main(["run", str(path), "--prompt", "hi", "--max-new-tokens", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    return err[0]


def test_wrong_magic(tmp_path, capsys):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGML" + bytes(100))
    assert f"{p}: not a GGUF file" in _run(p, capsys)


def test_truncated_file(tmp_path, capsys):
    p = _tiny(tmp_path / "m.gguf")
    p.write_bytes(p.read_bytes()[:-100])
    msg = _run(p, capsys)
    assert str(p) in msg and "output_norm.weight" in msg and "truncated" in msg


def test_truncated_header(tmp_path, capsys):
    p = _tiny(tmp_path / "m.gguf")
    p.write_bytes(p.read_bytes()[:60])
    assert f"{p}: truncated GGUF header" in _run(p, capsys)


def test_unknown_type(tmp_path, capsys):
    p = _tiny(tmp_path / "m.gguf")
    data = bytearray(p.read_bytes())
    # output_norm.weight's directory entry: name, n_dims u32, dims u64, then its type u32 (F32 = 0)
    at = data.index(b"output_norm.weight") + len("output_norm.weight") + 4 + 8
    assert struct.unpack_from("<I", data, at)[0] == 0
    struct.pack_into("<I", data, at, 99)
    p.write_bytes(bytes(data))
    msg = _run(p, capsys)
    assert str(p) in msg and "output_norm.weight" in msg and "ggml type 99" in msg


def test_missing_tensor(tmp_path, capsys):
    p = _tiny(tmp_path / "m.gguf")  # no attention or MLP tensors for its one layer
    msg = _run(p, capsys)
    assert msg.startswith(f"tandem: error: {p}: tensor model.layers.0.") and "missing" in msg


def test_unknown_architecture(tmp_path, capsys):
    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(p, "mamba")
    w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "GGUF architecture 'mamba' is not supported" in _run(p, capsys)
