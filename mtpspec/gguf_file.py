"""Reading GGUF files without trusting them: metadata, the tensor table and dequantized tensors.

GGUF (llama.cpp's model format) is a header of typed key/value metadata, a table of tensors (name,
shape, block type, offset) and the aligned tensor data. ``read_gguf_metadata`` walks the header with
``struct`` (``gguf.GGUFReader`` parses every field into numpy views and takes seconds on a
262k-token vocabulary); ``read_gguf_tensors`` dequantizes every tensor to float32 through the
``gguf`` package's block decoders, for the block types in ``SUPPORTED_TENSOR_TYPES``.

Every read is bounds-checked: a truncated or corrupt file raises ``GGUFError`` (a ``ValueError``)
with one line saying what is wrong, never a crash further down. Must not: know about models.
"""
from __future__ import annotations

import mmap
import os
import struct

from mtpspec import progress

SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K",
                          "Q5_K", "Q6_K")


class GGUFError(ValueError):
    """A GGUF file that cannot be read: bad magic, unsupported version, truncated, corrupt."""


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, object]:
    """All key/value metadata of a GGUF file (arrays as lists), without the tensor table."""
    return read_gguf_header(path)[0]


def read_gguf_header(path: str | os.PathLike) -> tuple[dict[str, object], list[str]]:
    """The metadata and the names of the tensors a GGUF file holds (no tensor data is read)."""
    metadata, table = _read_header(path)
    return metadata, [name for name, _ in table]


def _read_header(path: str | os.PathLike) -> tuple[dict[str, object], list[tuple[str, int]]]:
    """The metadata and the (name, block type id) of every tensor in the table."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise GGUFError(f"{path} is not a GGUF file (bad magic bytes)")
            version, tensor_count, kv_count = struct.unpack_from("<IQQ", buf, 4)
            if version not in (2, 3):
                raise GGUFError(f"{path} is GGUF version {version}; only versions 2 and 3 are supported")
            pos, metadata = 24, {}
            for _ in range(kv_count):
                key, pos = _read_string(buf, pos)
                (value_type,) = struct.unpack_from("<I", buf, pos)
                metadata[key], pos = _read_value(buf, pos + 4, value_type)
            table = []
            for _ in range(tensor_count):
                name, pos = _read_string(buf, pos)
                (dims,) = struct.unpack_from("<I", buf, pos)
                pos += 4 + 8 * dims  # shape
                (block_type,) = struct.unpack_from("<I", buf, pos)
                pos += 4 + 8  # block type, offset
                table.append((name, block_type))
            if pos > len(buf):
                raise struct.error("the tensor table runs past the end of the file")
    except (struct.error, UnicodeDecodeError, OverflowError, MemoryError) as err:
        raise GGUFError(f"{path}: truncated or corrupt GGUF header ({err})") from err
    except ValueError as err:  # mmap of an empty file
        if isinstance(err, GGUFError):
            raise
        raise GGUFError(f"{path}: not a readable GGUF file ({err})") from err
    return metadata, table


def _read_string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    pos += 8
    if pos + length > len(buf):
        raise struct.error(f"string of {length} bytes runs past the end of the file")
    return buf[pos : pos + length].decode("utf-8"), pos + length


def _read_value(buf: mmap.mmap, pos: int, value_type: int) -> tuple[object, int]:
    if value_type in _SCALAR:
        fmt = _SCALAR[value_type]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if value_type == _STRING:
        return _read_string(buf, pos)
    if value_type != _ARRAY:
        raise struct.error(f"unknown GGUF value type {value_type}")
    item_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if count > len(buf) - pos:  # every item takes at least one byte
        raise struct.error(f"array of {count} items runs past the end of the file")
    if item_type in _SCALAR:
        fmt = _SCALAR[item_type]
        values = list(struct.unpack_from(f"<{count}{fmt[1]}", buf, pos))
        return values, pos + count * struct.calcsize(fmt)
    values = []
    for _ in range(count):
        value, pos = _read_value(buf, pos, item_type)
        values.append(value)
    return values, pos


def read_gguf_tensors(path: str | os.PathLike,
                      quiet: bool = False) -> dict[str, "numpy.ndarray"]:  # noqa: F821
    """Every tensor of a GGUF file dequantized to float32 ``[rows, cols]`` (llama.cpp's ne1, ne0),
    under the file's own names, with a progress bar on a terminal unless ``quiet``. Raises
    ``GGUFError`` naming an unsupported block type or a truncated file."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    for name, block_type in _read_header(path)[1]:  # before GGUFReader, which refuses unknown ids
        try:
            kind = GGMLQuantizationType(block_type).name
        except ValueError:
            kind = f"id {block_type} (unknown)"
        if kind not in SUPPORTED_TENSOR_TYPES:
            raise GGUFError(f"{path}: tensor {name} has block type {kind}, which is not "
                            f"supported (supported: {', '.join(SUPPORTED_TENSOR_TYPES)})")
    try:
        with progress.waiting(f"reading {os.path.basename(path)}", quiet):  # its metadata: slow
            reader = GGUFReader(str(path))
    except (ValueError, IndexError, struct.error, OSError) as err:
        raise GGUFError(f"{path}: truncated or corrupt GGUF file ({err})") from err
    size = os.path.getsize(path)
    tensors = {}
    for tensor in progress.track(reader.tensors, len(reader.tensors),
                                 f"dequantizing {os.path.basename(path)}", "tensor", quiet):
        if tensor.data_offset + tensor.n_bytes > size:
            raise GGUFError(f"{path}: tensor {tensor.name} runs past the end of the file (truncated)")
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except (ValueError, IndexError) as err:
            raise GGUFError(f"{path}: tensor {tensor.name} cannot be decoded ({err})") from err
        shape = [int(n) for n in reversed(tensor.shape.tolist())]  # [ne1, ne0] for a matrix
        tensors[tensor.name] = np.array(array, dtype=np.float32).reshape(shape)  # a writable copy
    return tensors
