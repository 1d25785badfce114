"""The input files of a conversion (a local path or an fsspec URL): text, JSON, folders, and large
``.npy`` arrays read row by row. Every failure is a :class:`~.plan.ConversionError` naming the file."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from xray_match.data.convert.plan import ConversionError
from xray_match.data.io import filesystem, isdir, open_url


def read_bytes(path: str) -> bytes:
    try:
        with open_url(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None


def read_text(path: str) -> str:
    data = read_bytes(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path}: not UTF-8 text ({e})") from None


def read_lines(path: str) -> list[str]:
    """Lines split on ``\\n`` only (``str.splitlines`` would also split inside captions on
    characters such as U+2028 and shift every later caption), ``\\r`` removed, the empty tail after
    a final newline dropped."""
    text = read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln.rstrip("\r") for ln in lines]


def read_json(path: str) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def require_dir(path: str, what: str) -> None:
    if not isdir(path):
        raise ConversionError(f"{path}: {what} not found (no such folder)")


def field_of(obj: Any, key: str, where: str) -> Any:
    """``obj[key]`` or an error naming the file and the missing field."""
    if not isinstance(obj, dict) or key not in obj:
        raise ConversionError(f"{where}: missing field {key!r}")
    return obj[key]


class NpyRows:
    """Rows of a C-ordered ``.npy`` array read by offset (local path or fsspec URL), so a
    33 GB ``train_ims.npy`` is never loaded whole. Picklable: it reopens the file lazily."""

    def __init__(self, path: str):
        self.path = path
        fs, p = filesystem(path)
        try:
            with fs.open(p, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
                else:
                    shape, fortran, dtype = np.lib.format._read_array_header(fh, version)  # (3, 0)
                self.offset = fh.tell()
        except FileNotFoundError:
            raise ConversionError(f"{path}: no such file") from None
        except ValueError as e:
            raise ConversionError(f"{path}: not a .npy array ({e})") from None
        if fortran and len(shape) > 1:
            raise ConversionError(f"{path}: Fortran-ordered array; save it C-ordered (np.ascontiguousarray)")
        if dtype.hasobject:
            raise ConversionError(f"{path}: holds Python objects (pickled); expected a numeric array")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype = dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize if shape else 0
        self._fh = None

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_fh"} | {"_fh": None}

    def row(self, i: int) -> np.ndarray:
        if self._fh is None:
            fs, p = filesystem(self.path)
            self._fh = fs.open(p, "rb")
        self._fh.seek(self.offset + i * self.row_bytes)
        buf = self._fh.read(self.row_bytes)
        if len(buf) != self.row_bytes:
            raise ConversionError(f"{self.path}: truncated (row {i} of {len(self)} is incomplete)")
        return np.frombuffer(buf, dtype=self.dtype).reshape(self.shape[1:]).copy()
