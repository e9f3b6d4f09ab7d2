"""Weights in and out of our networks: our safetensors files, the released PanGu-Draw `.ckpt`, diffusers files.

Naming contract: a network's parameter names (as `cell.parameters_and_names()` gives them) are the released
names minus the component prefix of `RELEASED_PREFIXES`. Every reader returns plain `{name: numpy array}`
dicts in our names, and `load_state` puts such a dict into a cell with full name and shape checks.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import mindspore as ms
import numpy as np
from mindspore import nn

from diffusion.config import UNetConfig, VAEConfig
from schemas.errors import UserError

logger = logging.getLogger(__name__)

RELEASED_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder_1": "conditioner.embedders.0.",
    "text_encoder_2": "conditioner.embedders.1.",
}

# The released files name text encoder 1's token table under encoder 2's prefix with a doubled dot.
GARBLED_TOKEN_TABLE = "conditioner.embedders.1.model.token_embedding..embedding_table"
TOKEN_TABLE_1 = "transformer.text_model.embeddings.token_embedding.embedding_table"

_MS_TO_NP = {ms.float32: np.float32, ms.float16: np.float16, ms.float64: np.float64, ms.int32: np.int32,
             ms.int64: np.int64, ms.int8: np.int8, ms.uint8: np.uint8, ms.bool_: np.bool_}

# How many names an error message lists before it says "and N more".
_NAMES_SHOWN = 8


class CheckpointError(UserError):
    """A weights file does not fit the network: missing, unexpected or mis-shaped parameters, or a bad file."""


# ---------------------------------------------------------------- cells <-> numpy dicts

def state_dict(cell: nn.Cell) -> dict[str, np.ndarray]:
    """The cell's parameters as NumPy arrays, by our names (bfloat16 comes back as float32)."""
    out = {}
    for name, param in cell.parameters_and_names():
        if param.dtype == ms.bfloat16:
            out[name] = param.astype(ms.float32).asnumpy()
        else:
            out[name] = param.asnumpy()
    return out


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


def check_state(expected: dict[str, tuple[int, ...]], state: dict[str, np.ndarray], *, source: str,
                strict: bool = True) -> None:
    """Raise CheckpointError unless `state` has every expected name with its shape (and, if strict, nothing else)."""
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected]
    if missing and strict:
        raise CheckpointError(f"{source}: {len(missing)} parameter(s) missing: {_listing(missing)}")
    if unexpected and strict:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected parameter(s): {_listing(unexpected)}")
    for name, shape in expected.items():
        if name in state and tuple(state[name].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: parameter {name} has shape {tuple(state[name].shape)}, expected {tuple(shape)}")


def load_state(cell: nn.Cell, state: dict[str, np.ndarray], *, source: str, strict: bool = True) -> None:
    """Copy `state` into the cell's parameters, cast to each parameter's dtype.

    Checks names and shapes first, so a bad file changes nothing. `strict=False` allows missing and extra names
    (the missing ones keep their values); shapes must match either way.
    """
    params = dict(cell.parameters_and_names())
    check_state({n: tuple(p.shape) for n, p in params.items()}, state, source=source, strict=strict)
    loaded = 0
    for name, param in params.items():
        if name not in state:
            continue
        value = np.asarray(state[name], order="C")  # (ascontiguousarray would turn a scalar into shape (1,))
        if param.dtype == ms.bfloat16:
            tensor = ms.Tensor(value.astype(np.float32, copy=False)).astype(ms.bfloat16)
        else:
            target = _MS_TO_NP.get(param.dtype, np.float32)
            tensor = ms.Tensor.from_numpy(value.astype(target, copy=False))
        param.set_data(tensor)
        loaded += 1
    logger.debug("loaded %d of %d parameters from %s", loaded, len(params), source)


# ---------------------------------------------------------------- our safetensors files

# How a model directory may store its weights: float32 (what training writes), or float16, half the bytes; loading
# casts every tensor to its parameter's dtype, so a float16 file runs in float32 with weights rounded to float16.
WEIGHT_DTYPES = {"float32": np.float32, "float16": np.float16}
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def cast_state(state: dict[str, np.ndarray], dtype: str, *, source: str) -> dict[str, np.ndarray]:
    """Floating-point tensors of `state` as `dtype` ("float32" or "float16"); other tensors as they are.

    A tensor that float16 cannot hold (a value beyond +-65504, or not finite) raises CheckpointError naming it:
    rounding never turns a weight into infinity silently.
    """
    if dtype not in WEIGHT_DTYPES:
        raise CheckpointError(f"{source}: weights dtype {dtype!r}, expected one of {', '.join(WEIGHT_DTYPES)}")
    target = WEIGHT_DTYPES[dtype]
    out = {}
    for name, value in state.items():
        value = np.asarray(value)
        if not np.issubdtype(value.dtype, np.floating):
            out[name] = value
            continue
        if target is np.float16 and value.size:
            if not np.all(np.isfinite(value)):
                raise CheckpointError(f"{source}: parameter {name} has values that are not finite")
            peak = float(np.abs(value).max())
            if peak > _FLOAT16_MAX:
                raise CheckpointError(f"{source}: parameter {name} reaches {peak:.6g}, beyond float16's "
                                      f"{_FLOAT16_MAX:.0f}; store this model as float32")
        out[name] = value.astype(target)
    return out


def write_weights(state: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write named tensors to a safetensors file (atomically: a temporary file, then a rename)."""
    from safetensors.numpy import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) if np.ndim(v) else v for k, v in state.items()}, str(tmp),
              metadata={"format": "np"})
    os.replace(tmp, path)


def save_weights(cell: nn.Cell, path: str | os.PathLike, *, dtype: str = "float32") -> None:
    """Write the cell's parameters to a safetensors file as `dtype` (`WEIGHT_DTYPES`), atomically."""
    write_weights(cast_state(state_dict(cell), dtype, source=str(path)), path)


def read_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file, by name."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


def load_weights(cell: nn.Cell, path: str | os.PathLike, *, strict: bool = True) -> None:
    """Load a safetensors file written by `save_weights` (or any file in our names) into the cell."""
    load_state(cell, read_weights(path), source=str(path), strict=strict)


def weights_hash(path: str | os.PathLike, length: int = 16) -> str:
    """sha256 of the file's bytes, hex, first `length` characters: the identity of a set of weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


# ---------------------------------------------------------------- MindSpore .ckpt, streamed
#
# A .ckpt is a protobuf `Checkpoint { repeated Value value = 1; }` with `Value { string tag = 1; TensorProto
# tensor = 2; }` and `TensorProto { repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3; }`,
# written as one serialized message per record; a tensor over 512 MB is split into several records with the
# same tag, each holding a slice of the bytes. The released files exceed protobuf's 2 GB message limit, so this
# reader walks the records itself, seeks over the ones it does not need, and reads wanted tensor bytes straight
# into their final arrays: memory holds one copy of the selected parameters, nothing else.

_CKPT_DTYPES = {
    "Float32": np.float32, "Float16": np.float16, "Float64": np.float64, "BFloat16": np.uint16,
    "Int8": np.int8, "UInt8": np.uint8, "Int16": np.int16, "UInt16": np.uint16, "Int32": np.int32,
    "UInt32": np.uint32, "Int64": np.int64, "UInt64": np.uint64, "Bool": np.bool_,
}
_NP_TO_CKPT = {np.dtype(v): k for k, v in _CKPT_DTYPES.items() if k not in ("BFloat16", "UInt16")}
_NP_TO_CKPT[np.dtype(np.uint16)] = "UInt16"
# MindSpore's writer splits tensors above this many bytes into several records.
_SLICE_BYTES = 512 * 1024 * 1024
_CRC_TRAILER = b"crc_num"


def _read_varint(f: BinaryIO) -> int | None:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            if shift:
                raise EOFError("truncated varint")
            return None
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7


def _varint_from(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class _Record:
    """One record's header: its tag, dims, dtype name, and where its tensor bytes lie in the file."""

    __slots__ = ("tag", "dims", "tensor_type", "offset", "length")

    def __init__(self, tag: str, dims: list[int], tensor_type: str, offset: int, length: int):
        self.tag, self.dims, self.tensor_type, self.offset, self.length = tag, dims, tensor_type, offset, length


def _parse_tensor_header(f: BinaryIO, end: int) -> tuple[list[int], str, int, int]:
    """Parse a TensorProto that ends at file offset `end`, seeking over its content bytes."""
    dims: list[int] = []
    tensor_type = ""
    offset = length = -1
    while f.tell() < end:
        key = _read_varint(f)
        field, wire = key >> 3, key & 7
        if field == 1 and wire == 0:
            dims.append(_read_varint(f))
        elif field == 1 and wire == 2:  # packed dims
            packed = f.read(_read_varint(f))
            pos = 0
            while pos < len(packed):
                value, pos = _varint_from(packed, pos)
                dims.append(value)
        elif field == 2 and wire == 2:
            tensor_type = f.read(_read_varint(f)).decode()
        elif field == 3 and wire == 2:
            length = _read_varint(f)
            offset = f.tell()
            f.seek(length, os.SEEK_CUR)
        else:
            _skip_field(f, wire)
    return dims, tensor_type, offset, length


def _skip_field(f: BinaryIO, wire: int) -> None:
    if wire == 0:
        _read_varint(f)
    elif wire == 1:
        f.seek(8, os.SEEK_CUR)
    elif wire == 2:
        f.seek(_read_varint(f), os.SEEK_CUR)
    elif wire == 5:
        f.seek(4, os.SEEK_CUR)
    else:
        raise ValueError(f"unsupported protobuf wire type {wire}")


def _iter_records(f: BinaryIO, size: int) -> Iterator[_Record]:
    while f.tell() < size:
        start = f.tell()
        if size - start == len(_CRC_TRAILER) + 10 and f.read(len(_CRC_TRAILER)) == _CRC_TRAILER:
            return
        f.seek(start)
        key = _read_varint(f)
        if key != (1 << 3 | 2):
            raise ValueError(f"unexpected protobuf field key {key} at byte {start}")
        end = _read_varint(f) + f.tell()
        tag, tensor = "", None
        while f.tell() < end:
            vkey = _read_varint(f)
            field, wire = vkey >> 3, vkey & 7
            if field == 1 and wire == 2:
                tag = f.read(_read_varint(f)).decode()
            elif field == 2 and wire == 2:
                tensor_end = _read_varint(f) + f.tell()
                tensor = _parse_tensor_header(f, tensor_end)
            else:  # map tensors and unknown fields: not used by model weights
                _skip_field(f, wire)
        if f.tell() != end or end > size:
            raise ValueError(f"record at byte {start} overruns its length")
        if tensor is not None:
            dims, tensor_type, offset, length = tensor
            yield _Record(tag, dims, tensor_type, offset, length)


def _bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_ckpt(path: str | os.PathLike, keep=lambda name: True) -> dict[str, np.ndarray]:
    """Stream a MindSpore `.ckpt`: the tensors whose name passes `keep`, by their names in the file.

    Split tensors are reassembled; bfloat16 is returned as float32. Only the kept tensors are read.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    out: dict[str, np.ndarray] = {}
    filled: dict[str, int] = {}
    types: dict[str, str] = {}
    size = path.stat().st_size
    try:
        with open(path, "rb", buffering=0) as f:
            for rec in _iter_records(f, size):
                if not keep(rec.tag):
                    continue
                if rec.tensor_type not in _CKPT_DTYPES:
                    raise CheckpointError(f"{path}: parameter {rec.tag} has unsupported type {rec.tensor_type!r}")
                if rec.tag not in out:
                    dims = rec.dims
                    itemsize = np.dtype(_CKPT_DTYPES[rec.tensor_type]).itemsize
                    # MindSpore writes a scalar with dims [0]; its content still holds one element.
                    if dims == [0] and rec.length == itemsize:
                        dims = []
                    out[rec.tag] = np.empty(dims, dtype=_CKPT_DTYPES[rec.tensor_type])
                    filled[rec.tag] = 0
                    types[rec.tag] = rec.tensor_type
                target = out[rec.tag].reshape(-1).view(np.uint8)
                done = filled[rec.tag]
                if done + rec.length > target.nbytes:
                    raise CheckpointError(f"{path}: parameter {rec.tag} has more bytes than its shape {rec.dims} holds")
                f.seek(rec.offset)
                view = memoryview(target[done:done + rec.length])
                got = 0
                while got < rec.length:
                    n = f.readinto(view[got:])
                    if not n:
                        raise CheckpointError(f"{path}: file ends inside parameter {rec.tag}")
                    got += n
                filled[rec.tag] = done + rec.length
    except (ValueError, EOFError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable MindSpore checkpoint ({err})") from err
    for name, arr in out.items():
        if filled[name] != arr.nbytes:
            raise CheckpointError(f"{path}: parameter {name} is incomplete ({filled[name]} of {arr.nbytes} bytes)")
        if types[name] == "BFloat16":
            out[name] = _bfloat16_bits_to_float32(arr)
    return out


def write_ckpt(path: str | os.PathLike, tensors: dict[str, np.ndarray]) -> None:
    """Write tensors as a MindSpore `.ckpt` (the record layout `mindspore.load_checkpoint` reads)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for name, value in tensors.items():
            arr = np.asarray(value, order="C")  # (ascontiguousarray would turn a scalar into shape (1,))
            if arr.dtype not in _NP_TO_CKPT:
                raise CheckpointError(f"{path}: parameter {name} has unsupported dtype {arr.dtype}")
            raw = arr.reshape(-1).view(np.uint8)
            dims = b"".join(b"\x08" + _encode_varint(d) for d in arr.shape)
            type_name = _NP_TO_CKPT[arr.dtype].encode()
            tag = name.encode()
            starts = range(0, raw.nbytes, _SLICE_BYTES) or [0]
            for start in starts:
                chunk = raw[start:start + _SLICE_BYTES]
                tensor_head = dims + b"\x12" + _encode_varint(len(type_name)) + type_name
                tensor_head += b"\x1a" + _encode_varint(chunk.nbytes)
                tensor_len = len(tensor_head) + chunk.nbytes
                value_head = b"\x0a" + _encode_varint(len(tag)) + tag + b"\x12" + _encode_varint(tensor_len)
                record_len = len(value_head) + tensor_len
                f.write(b"\x0a" + _encode_varint(record_len) + value_head + tensor_head)
                f.write(memoryview(chunk))
    os.replace(tmp, path)


# ---------------------------------------------------------------- released PanGu-Draw v3 checkpoints

def _component_of(name: str, wanted: set[str]) -> tuple[str, str] | None:
    if name == GARBLED_TOKEN_TABLE:
        return ("text_encoder_1", TOKEN_TABLE_1) if "text_encoder_1" in wanted else None
    for component in wanted:
        prefix = RELEASED_PREFIXES[component]
        if name.startswith(prefix):
            return component, name[len(prefix):]
    return None


def read_released(path: str | os.PathLike, components: Iterable[str]) -> dict[str, dict[str, np.ndarray]]:
    """Read the named components (keys of RELEASED_PREFIXES) from a released PanGu-Draw `.ckpt`.

    Returns {component: {our name: array}}; only those components' tensors are read. Text encoder 1's token
    table is accepted under its proper name or the release's garbled alias (GARBLED_TOKEN_TABLE).
    """
    wanted = set(components)
    unknown = wanted - set(RELEASED_PREFIXES)
    if unknown:
        raise CheckpointError(f"{path}: unknown component(s) {sorted(unknown)}; known: {sorted(RELEASED_PREFIXES)}")
    raw = read_ckpt(path, keep=lambda name: _component_of(name, wanted) is not None)
    states: dict[str, dict[str, np.ndarray]] = {c: {} for c in wanted}
    for name in list(raw):
        component, ours = _component_of(name, wanted)
        if ours in states[component] and name == GARBLED_TOKEN_TABLE:
            raw.pop(name)  # the properly named table wins
            continue
        states[component][ours] = raw.pop(name)
    for component, state in states.items():
        if not state:
            raise CheckpointError(
                f"{path}: no parameters of {component} (prefix {RELEASED_PREFIXES[component]!r}) in this checkpoint")
    logger.info("read %s from %s", {c: len(s) for c, s in states.items()}, path)
    return states


def write_released(path: str | os.PathLike, states: dict[str, dict[str, np.ndarray]], *,
                   garbled_token_table: bool = True) -> None:
    """Write components {name: {our name: array}} as a `.ckpt` with the released names.

    As in the release, text encoder 1's token table goes under GARBLED_TOKEN_TABLE unless
    `garbled_token_table` is False.
    """
    unknown = set(states) - set(RELEASED_PREFIXES)
    if unknown:
        raise CheckpointError(f"{path}: unknown component(s) {sorted(unknown)}; known: {sorted(RELEASED_PREFIXES)}")
    tensors: dict[str, np.ndarray] = {}
    for component, state in states.items():
        for name, value in state.items():
            if component == "text_encoder_1" and name == TOKEN_TABLE_1 and garbled_token_table:
                tensors[GARBLED_TOKEN_TABLE] = value
            else:
                tensors[RELEASED_PREFIXES[component] + name] = value
    write_ckpt(path, tensors)


# ---------------------------------------------------------------- diffusers-format safetensors

def _norm_leaf(leaf: str) -> str:
    return {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)


def _expected_shapes(cell_factory) -> dict[str, tuple[int, ...]]:
    from mindspore.nn.utils import no_init_parameters

    # Lazy parameters: only names and shapes are needed, so a full-size net costs no weight memory here.
    with no_init_parameters():
        cell = cell_factory()
    return {name: tuple(p.shape) for name, p in cell.parameters_and_names()}


def diffusers_unet_prefixes(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """(our prefix, diffusers prefix, kind) for every block of the UNet; kind is resnet, attention or plain."""
    blocks = [
        ("time_embed.0.", "time_embedding.linear_1.", "plain"),
        ("time_embed.2.", "time_embedding.linear_2.", "plain"),
        ("label_emb.0.0.", "add_embedding.linear_1.", "plain"),
        ("label_emb.0.2.", "add_embedding.linear_2.", "plain"),
        ("input_blocks.0.0.", "conv_in.", "plain"),
        ("out.0.", "conv_norm_out.", "plain"),
        ("out.2.", "conv_out.", "plain"),
    ]
    levels = len(cfg.channel_mult)
    index = 1
    for level in range(levels):
        attn = cfg.transformer_depth[level] > 0
        for j in range(cfg.num_res_blocks):
            blocks.append((f"input_blocks.{index}.0.", f"down_blocks.{level}.resnets.{j}.", "resnet"))
            if attn:
                blocks.append((f"input_blocks.{index}.1.", f"down_blocks.{level}.attentions.{j}.", "attention"))
            index += 1
        if level != levels - 1:
            blocks.append((f"input_blocks.{index}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", "plain"))
            index += 1
    mid_attn = cfg.transformer_depth_middle > 0
    blocks.append(("middle_block.0.", "mid_block.resnets.0.", "resnet"))
    if mid_attn:
        blocks.append(("middle_block.1.", "mid_block.attentions.0.", "attention"))
    blocks.append((f"middle_block.{2 if mid_attn else 1}.", "mid_block.resnets.1.", "resnet"))
    index = 0
    for up, level in enumerate(range(levels - 1, -1, -1)):
        attn = cfg.transformer_depth[level] > 0
        for j in range(cfg.num_res_blocks + 1):
            blocks.append((f"output_blocks.{index}.0.", f"up_blocks.{up}.resnets.{j}.", "resnet"))
            if attn:
                blocks.append((f"output_blocks.{index}.1.", f"up_blocks.{up}.attentions.{j}.", "attention"))
            if level != 0 and j == cfg.num_res_blocks:
                blocks.append((f"output_blocks.{index}.{2 if attn else 1}.conv.",
                               f"up_blocks.{up}.upsamplers.0.conv.", "plain"))
            index += 1
    return blocks


_UNET_RESNET_LEAVES = {
    "in_layers.0.": "norm1.", "in_layers.2.": "conv1.", "emb_layers.1.": "time_emb_proj.",
    "out_layers.0.": "norm2.", "out_layers.3.": "conv2.", "skip_connection.": "conv_shortcut.",
}


def _split_leaf(rest: str) -> tuple[str, str]:
    head, _, leaf = rest.rpartition(".")
    return (head + "." if head else ""), leaf


def diffusers_unet_name_map(cfg: UNetConfig) -> dict[str, str]:
    """Our UNet parameter name -> diffusers `UNet2DConditionModel` name, for every parameter of `UNet(cfg)`."""
    from diffusion.nets.unet import UNet

    blocks = sorted(diffusers_unet_prefixes(cfg), key=lambda b: -len(b[0]))
    mapping = {}
    for name in _expected_shapes(lambda: UNet(cfg)):
        for ours, theirs, kind in blocks:
            if name.startswith(ours):
                middle, leaf = _split_leaf(name[len(ours):])
                if kind == "resnet":
                    middle = _UNET_RESNET_LEAVES[middle]
                mapping[name] = theirs + middle + _norm_leaf(leaf)
                break
        else:
            raise AssertionError(f"no diffusers block for UNet parameter {name}")
    return mapping


def diffusers_vae_name_map(cfg: VAEConfig, *, legacy_attention: bool = False) -> dict[str, str]:
    """Our VAE parameter name -> diffusers `AutoencoderKL` name (`legacy_attention`: query/key/value/proj_attn)."""
    from diffusion.nets.vae import AutoencoderKL

    levels = len(cfg.ch_mult)
    blocks: list[tuple[str, str]] = [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    attn_leaves = {"norm.": "group_norm.", "q.": "query.", "k.": "key.", "v.": "value.", "proj_out.": "proj_attn."} \
        if legacy_attention else \
        {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}
    for part in ("encoder", "decoder"):
        blocks += [(f"{part}.conv_in.", f"{part}.conv_in."), (f"{part}.conv_out.", f"{part}.conv_out."),
                   (f"{part}.norm_out.", f"{part}.conv_norm_out."),
                   (f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0."),
                   (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.")]
        blocks += [(f"{part}.mid.attn_1.{o}", f"{part}.mid_block.attentions.0.{t}") for o, t in attn_leaves.items()]
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            blocks.append((f"encoder.down.{level}.block.{j}.", f"encoder.down_blocks.{level}.resnets.{j}."))
        if level != levels - 1:
            blocks.append((f"encoder.down.{level}.downsample.conv.", f"encoder.down_blocks.{level}.downsamplers.0.conv."))
        up = levels - 1 - level
        for j in range(cfg.num_res_blocks + 1):
            blocks.append((f"decoder.up.{level}.block.{j}.", f"decoder.up_blocks.{up}.resnets.{j}."))
        if level != 0:
            blocks.append((f"decoder.up.{level}.upsample.conv.", f"decoder.up_blocks.{up}.upsamplers.0.conv."))
    blocks.sort(key=lambda b: -len(b[0]))
    mapping = {}
    for name in _expected_shapes(lambda: AutoencoderKL(cfg)):
        for ours, theirs in blocks:
            if name.startswith(ours):
                middle, leaf = _split_leaf(name[len(ours):])
                middle = {"nin_shortcut.": "conv_shortcut."}.get(middle, middle)
                mapping[name] = theirs + middle + _norm_leaf(leaf)
                break
        else:
            raise AssertionError(f"no diffusers block for VAE parameter {name}")
    return mapping


def _fit_shape(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear <-> 1x1 convolution weights hold the same numbers; anything else must match exactly."""
    if value.shape == shape:
        return value
    if value.ndim + 2 == len(shape) and shape[2:] == (1, 1) and value.shape == shape[:2]:
        return value.reshape(shape)
    if value.ndim == len(shape) + 2 and value.shape[2:] == (1, 1) and value.shape[:2] == shape:
        return value.reshape(shape)
    return value


def _read_diffusers(path, mapping: dict[str, str], expected: dict[str, tuple[int, ...]],
                    alternatives: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    raw = read_weights(path)
    state, used = {}, set()
    missing = []
    for ours, theirs in mapping.items():
        name = theirs
        if name not in raw and alternatives and ours in alternatives:
            name = alternatives[ours]
        if name not in raw:
            missing.append(theirs)
            continue
        used.add(name)
        value = _fit_shape(raw[name], expected[ours])
        if value.shape != expected[ours]:
            raise CheckpointError(
                f"{path}: parameter {name} (ours {ours}) has shape {tuple(raw[name].shape)}, expected {expected[ours]}")
        state[ours] = value
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} parameter(s) missing: {_listing(missing)}")
    extra = sorted(set(raw) - used)
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} unexpected parameter(s): {_listing(extra)}")
    return state


def read_diffusers_unet(path: str | os.PathLike, cfg: UNetConfig) -> dict[str, np.ndarray]:
    """A diffusers `UNet2DConditionModel` safetensors file (SDXL family) as our UNet state, names and shapes checked."""
    from diffusion.nets.unet import UNet

    expected = _expected_shapes(lambda: UNet(cfg))
    return _read_diffusers(path, diffusers_unet_name_map(cfg), expected)


def read_diffusers_vae(path: str | os.PathLike, cfg: VAEConfig) -> dict[str, np.ndarray]:
    """A diffusers `AutoencoderKL` safetensors file as our VAE state; accepts old (query/key/value) attention names."""
    from diffusion.nets.vae import AutoencoderKL

    expected = _expected_shapes(lambda: AutoencoderKL(cfg))
    legacy = diffusers_vae_name_map(cfg, legacy_attention=True)
    return _read_diffusers(path, diffusers_vae_name_map(cfg), expected, alternatives=legacy)


def write_diffusers(path: str | os.PathLike, state: dict[str, np.ndarray], mapping: dict[str, str]) -> None:
    """Write our state in diffusers names (the inverse of the readers; 1x1 attention convs become linear weights)."""
    from safetensors.numpy import save_file

    out = {}
    for ours, value in state.items():
        theirs = mapping[ours]
        if ".mid_block.attentions." in theirs and value.ndim == 4:
            value = value.reshape(value.shape[:2])
        out[theirs] = np.ascontiguousarray(value)
    save_file(out, str(path))


__all__ = [
    "RELEASED_PREFIXES", "GARBLED_TOKEN_TABLE", "CheckpointError", "state_dict", "check_state", "load_state",
    "save_weights", "read_weights", "load_weights", "weights_hash", "read_ckpt", "write_ckpt", "read_released",
    "write_released", "diffusers_unet_prefixes", "diffusers_unet_name_map", "diffusers_vae_name_map",
    "read_diffusers_unet", "read_diffusers_vae", "write_diffusers",
]
