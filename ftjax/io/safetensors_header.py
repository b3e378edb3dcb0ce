"""The header of a safetensors file, read and checked without loading any tensor.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (each tensor's
dtype, shape and byte range, plus `__metadata__`), then the tensor bytes. Reading the header
ourselves lets a truncated or corrupt file fail with one line naming it, what is wrong and the
fix ("header says the file holds N bytes, it has M"), where the safetensors library raises
`SafetensorError: incomplete metadata, file not fully covered` without the file's name.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct

__all__ = ["Header", "WeightsFileError", "read_header"]

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit on the JSON header


class WeightsFileError(ValueError):
    """A weights file that cannot be read: the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class Header:
    """What a safetensors header says: `tensors` maps name -> (dtype, shape)."""
    path: str
    metadata: dict
    tensors: dict


def read_header(path: str, fix: str = "re-download or re-export it") -> Header:
    """The header of safetensors file `path`, after checking that the file holds exactly the
    bytes the header describes. Raises `WeightsFileError` (one line: the file, what is wrong,
    `fix`) for a truncated, padded or corrupt file, and FileNotFoundError for a missing one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    size = os.path.getsize(path)

    def bad(problem: str) -> WeightsFileError:
        return WeightsFileError(f"{path}: {problem}; {fix}")

    if size < 8:
        raise bad(f"not a safetensors file: it has {size} bytes, fewer than the 8-byte header "
                  "length every safetensors file starts with (truncated?)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER:
            raise bad(f"not a safetensors file: its first 8 bytes give a header of {n:,} bytes")
        if 8 + n > size:
            raise bad(f"truncated: its header alone is {8 + n:,} bytes, the file has {size:,}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
        metadata = header.pop("__metadata__", None) or {}
        tensors, end = {}, 0
        for name, info in header.items():
            lo, hi = (int(x) for x in info["data_offsets"])
            tensors[name] = (str(info["dtype"]), tuple(int(d) for d in info["shape"]))
            end = max(end, hi)
            if not 0 <= lo <= hi:
                raise ValueError(f"tensor {name!r} has byte range {lo}..{hi}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise bad(f"corrupt: its header is not a valid safetensors header ({e})") from None
    want = 8 + n + end
    if size < want:
        raise bad(f"truncated: its header says the file holds {want:,} bytes, it has {size:,}")
    if size > want:
        raise bad(f"corrupt: it has {size:,} bytes, {size - want:,} more than the {want:,} its "
                  "header describes")
    return Header(path=path, metadata=dict(metadata), tensors=tensors)
