"""Constant tensors.

A :class:`Tensor` holds constant data either as the original ``TensorProto`` (decoded lazily,
so an untouched weight is written back byte-identical) or as a numpy array. Tensors stored as
ONNX external data are memory-mapped from their file on first use, after checking that the
file lies inside the model's directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from graphopt.errors import ExternalDataError, InvalidModelError

_PACKED_4BIT = {
    getattr(TensorProto, n)
    for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(TensorProto, n)
}

_TYPED_FIELD = {
    TensorProto.FLOAT: "float_data",
    TensorProto.DOUBLE: "double_data",
    TensorProto.INT64: "int64_data",
    TensorProto.UINT64: "uint64_data",
    TensorProto.STRING: "string_data",
    TensorProto.COMPLEX64: "float_data",
    TensorProto.COMPLEX128: "double_data",
    TensorProto.UINT32: "uint64_data",
}


def np_dtype(elem_type: int) -> np.dtype:
    """numpy dtype of an ONNX element type (ml_dtypes types for bfloat16/float8/int4)."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def onnx_dtype(dtype: Any) -> int:
    """ONNX element type of a numpy dtype."""
    return int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


def dtype_name(elem_type: int | None) -> str:
    """Readable name of an ONNX element type (``float32``...)."""
    if elem_type is None or elem_type == 0:
        return "?"
    try:
        return str(np_dtype(elem_type))
    except Exception:  # noqa: BLE001 - exotic/unknown types
        return TensorProto.DataType.Name(elem_type).lower()


def safe_external_path(base_dir: str | os.PathLike[str] | None, location: str, tensor: str) -> Path:
    """Resolve an external-data location, refusing anything outside ``base_dir``.

    Absolute paths, ``..`` components and symlinks that lead out of the model's directory are
    refused: a model file must not be able to make graphopt read arbitrary files.
    """
    if base_dir is None:
        raise ExternalDataError(
            "tensor uses external data but the model was not loaded from a file", field=f"tensor {tensor!r}"
        )
    if not location:
        raise ExternalDataError("external data has no location", field=f"tensor {tensor!r}")
    p = Path(location)
    if p.is_absolute() or p.drive or location.startswith(("/", "\\")):
        raise ExternalDataError(
            f"external data location {location!r} is an absolute path", field=f"tensor {tensor!r}"
        )
    if ".." in Path(location.replace("\\", "/")).parts:
        raise ExternalDataError(
            f"external data location {location!r} leaves the model directory", field=f"tensor {tensor!r}"
        )
    base = Path(base_dir).resolve()
    full = (base / p).resolve()
    if not full.is_relative_to(base):
        raise ExternalDataError(
            f"external data location {location!r} resolves outside the model directory (symlink?)",
            field=f"tensor {tensor!r}",
        )
    if not full.is_file():
        raise ExternalDataError(f"external data file {location!r} is missing", field=f"tensor {tensor!r}")
    return full


def _external_info(proto: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in proto.external_data}


def _expected_count(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


class Tensor:
    """Constant data of a value: an initializer or the payload of a ``Constant`` node.

    Args:
        array: numpy data (owned by the tensor once given).
        proto: the original ``TensorProto``; decoded only when :meth:`numpy` is first called.
        base_dir: directory that external-data locations are relative to.
    """

    __slots__ = ("_array", "_base_dir", "_proto", "doc_string", "dtype", "shape")

    def __init__(
        self,
        array: np.ndarray | None = None,
        *,
        proto: TensorProto | None = None,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if array is None and proto is None:
            raise ValueError("Tensor needs an array or a proto")
        self._array: np.ndarray | None = None
        self._proto = proto
        self._base_dir = base_dir
        self.doc_string = ""
        if proto is not None:
            self.dtype: int = int(proto.data_type)
            self.shape: tuple[int, ...] = tuple(int(d) for d in proto.dims)
            self.doc_string = proto.doc_string
        if array is not None:
            arr = np.asarray(array)
            self._array = arr
            self._proto = None
            self.dtype = onnx_dtype(arr.dtype)
            self.shape = tuple(int(d) for d in arr.shape)

    # -- properties ---------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of elements."""
        return _expected_count(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the data in bytes (4-bit types counted packed)."""
        if self.dtype in _PACKED_4BIT:
            return (self.size + 1) // 2
        if self.dtype == TensorProto.STRING:
            return sum(len(s) for s in self.numpy().reshape(-1))
        return self.size * np_dtype(self.dtype).itemsize

    @property
    def is_external(self) -> bool:
        """True when the data lives in an external file that has not been read yet."""
        return self._proto is not None and self._proto.data_location == TensorProto.EXTERNAL

    @property
    def proto(self) -> TensorProto | None:
        """The original proto when the tensor is unmodified, else None."""
        return self._proto

    # -- validation -----------------------------------------------------------------------------
    def validate(self, name: str) -> None:
        """Check that the stored data matches the declared dims and type, without decoding it."""
        p = self._proto
        if p is None:
            return
        field = f"tensor {name!r}"
        if p.data_type == TensorProto.UNDEFINED:
            raise InvalidModelError("tensor has no data type", field=field)
        if any(d < 0 for d in self.shape):
            raise InvalidModelError(f"negative dimension in {list(self.shape)}", field=field)
        n = self.size
        if p.data_location == TensorProto.EXTERNAL:
            info = _external_info(p)
            path = safe_external_path(self._base_dir, info.get("location", ""), name)
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else None
            avail = path.stat().st_size - offset
            need = self.nbytes if self.dtype != TensorProto.STRING else 0
            if length is not None and length < need:
                raise ExternalDataError(
                    f"external data length {length} is smaller than the {need} bytes its dims need", field=field
                )
            if avail < need or (length is not None and avail < length):
                raise ExternalDataError(
                    f"external data file {info.get('location')!r} is truncated ({max(avail, 0)} bytes "
                    f"from offset {offset}, {need} needed)",
                    field=field,
                )
            return
        if p.HasField("raw_data"):
            if self.dtype == TensorProto.STRING:
                raise InvalidModelError("string tensor stored as raw_data", field=field)
            need = self.nbytes
            if len(p.raw_data) != need:
                raise InvalidModelError(
                    f"holds {len(p.raw_data)} bytes of data but dims {list(self.shape)} of "
                    f"{dtype_name(self.dtype)} need {need}",
                    field=field,
                )
            return
        fname = _TYPED_FIELD.get(p.data_type, "int32_data")
        have = len(getattr(p, fname))
        if p.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
            have //= 2
        if p.data_type in _PACKED_4BIT:
            need = (n + 1) // 2
        else:
            need = n
        if have != need:
            raise InvalidModelError(
                f"holds {have} elements but dims {list(self.shape)} need {n}", field=field
            )

    # -- data -----------------------------------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """The data as a numpy array (memory-mapped for external data; cached)."""
        if self._array is not None:
            return self._array
        p = self._proto
        assert p is not None
        if p.data_location == TensorProto.EXTERNAL:
            arr = self._load_external(p)
        else:
            arr = numpy_helper.to_array(p)
        self._array = arr
        return arr

    def _load_external(self, p: TensorProto) -> np.ndarray:
        info = _external_info(p)
        path = safe_external_path(self._base_dir, info.get("location", ""), p.name)
        offset = int(info.get("offset", 0) or 0)
        if p.data_type not in _PACKED_4BIT and p.data_type != TensorProto.STRING:
            dt = np_dtype(p.data_type)
            if self.size == 0:
                return np.zeros(self.shape, dtype=dt)
            return np.memmap(path, dtype=dt, mode="r", offset=offset, shape=self.shape)
        length = int(info["length"]) if info.get("length") else None
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read() if length is None else f.read(length)
        q = TensorProto()
        q.CopyFrom(p)
        del q.external_data[:]
        q.data_location = TensorProto.DEFAULT
        q.raw_data = data
        return numpy_helper.to_array(q)

    def raw_bytes(self) -> bytes:
        """Little-endian bytes as ONNX stores them in ``raw_data`` (not for strings)."""
        p = self._proto
        if p is not None and p.HasField("raw_data"):
            return p.raw_data
        if p is not None and p.data_location == TensorProto.EXTERNAL:
            info = _external_info(p)
            path = safe_external_path(self._base_dir, info.get("location", ""), p.name)
            with open(path, "rb") as f:
                f.seek(int(info.get("offset", 0) or 0))
                return f.read(int(info["length"])) if info.get("length") else f.read(self.nbytes)
        tp = numpy_helper.from_array(np.require(self.numpy(), requirements="C"))
        return tp.raw_data

    def to_proto(self, name: str, *, inline: bool = False) -> TensorProto:
        """A ``TensorProto`` named ``name``; the original proto when the tensor is unmodified.

        With ``inline=True`` external data is read and embedded as ``raw_data``.
        """
        p = self._proto
        if p is not None and not (inline and p.data_location == TensorProto.EXTERNAL):
            out = TensorProto()
            out.CopyFrom(p)
            out.name = name
            return out
        arr = self.numpy()
        if p is not None and p.data_type in _PACKED_4BIT | {TensorProto.STRING}:
            out = TensorProto()
            out.CopyFrom(p)
            del out.external_data[:]
            out.data_location = TensorProto.DEFAULT
            out.ClearField("raw_data")
            out = numpy_helper.from_array(np.asarray(arr), name)
            out.data_type = p.data_type
            return out
        out = numpy_helper.from_array(np.require(arr, requirements="C"), name)
        if self.dtype != out.data_type:
            out.data_type = self.dtype
        if self.doc_string:
            out.doc_string = self.doc_string
        return out

    def __repr__(self) -> str:
        return f"Tensor({dtype_name(self.dtype)}{list(self.shape)})"
