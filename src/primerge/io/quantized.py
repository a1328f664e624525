"""Quantized checkpoints: FP8 block-scaled weights are dequantized; every other format is refused.

**FP8 with block scales** (DeepSeek-V3 / Qwen3 FP8, transformers' ``FineGrainedFP8``): a linear
weight W (m × n, possibly with leading expert axes) is stored as ``<name>`` in float8 (e4m3) with
``<name>_scale_inv`` (float32, ⌈m/b_m⌉ × ⌈n/b_n⌉), one scale per b_m × b_n block B:

    W[B] = q[B] · s_B                                   (dequantization)
    s_B = max_{B} |W| / 448,  q[B] = round_fp8(W[B] / s_B)   (quantization; s_B = 1 for a zero block)

448 is the largest finite float8_e4m3fn value. The block size is the config's
``quantization_config.weight_block_size`` (else 128 × 128). What the config claims is checked
against what the tensors hold before anything is read (:func:`check_block_size`): every scale must
have the ⌈m/b_m⌉ × ⌈n/b_n⌉ shape of its weight's blocks, and, along each axis where some weight has
more than one block, the block size must divide one such weight's length. The second rule is what
catches a block size that lies while every scale's shape still fits: if the true block b divides a
length m = k·b (k ≥ 2), a claimed b' ≠ b with ⌈m/b'⌉ = k has (k−1)·b' < k·b ≤ k·b', so m/b' lies
strictly between k−1 and k and b' divides no such length (every real FP8 checkpoint has lengths
that are multiples of its block; 128 divides every hidden and MLP width of the FP8 releases). Along
an axis where every weight is one block the block size does not change the values, and
dequantizing and quantizing never allocate more than the weight's own size whatever it claims
(the scales are expanded by indexing, blocks are cut to the weight). Every scale must be finite
and positive (:meth:`Fp8Checkpoint.load`), and a ``quantization_config`` is accepted only where
some tensor is float8.
:func:`open_weights` gives a view of such a checkpoint whose tensors read dequantized in float32
(:class:`Fp8Checkpoint`); the scales are not tensors of the view. The merge then runs in float32
and the output is either cast (``output: {dtype: bfloat16}``) or quantized again with the same
block size (:meth:`Fp8Blocks.encode`, the default).

**Everything else is refused, never merged as raw numbers**: a ``quantization_config`` of another
method (bitsandbytes, GPTQ, AWQ, compressed-tensors, HQQ, MXFP4, ...), tensors that carry another
format's companions (``qweight``/``qzeros``/``g_idx``, ``absmax``/``quant_map``/``SCB``,
``weight_packed``, ``_blocks``/``_scales``, ``weight_scale`` without ``_inv``), FP8 tensors
without block scales, static FP8 activation scales (``input_scale``), and
GGUF files (llama.cpp blocks; the first quantized tensor is named from the file's header). Each
error names the file, the tensor and what to convert the checkpoint with.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from primerge.util.errors import InputError, quoted
from primerge.io.files import kind, load_json, open_regular
from primerge.io.readers import Checkpoint, TensorInfo, open_checkpoint

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
DEFAULT_BLOCK = (128, 128)

#: quantization methods (``quantization_config.quant_method``) -> what to convert them with.
CONVERT_HINTS = {
    "bitsandbytes": "load it with transformers, call model.dequantize() and save_pretrained a bf16 copy",
    "gptq": "merge the unquantized original (GPTQ packs int4 codes; dequantize with gptqmodel first if "
            "there is none)",
    "awq": "merge the unquantized original (AWQ packs int4 codes; dequantize with autoawq/gptqmodel first "
           "if there is none)",
    "compressed-tensors": "decompress it to bf16 with llm-compressor / compressed-tensors, or merge the "
                          "unquantized original",
    "mxfp4": "load it with transformers (quantization_config=Mxfp4Config(dequantize=True)) and "
             "save_pretrained a bf16 copy",
    "hqq": "load it with transformers, call model.dequantize() and save_pretrained a bf16 copy",
    "gguf": "convert it with transformers: AutoModelForCausalLM.from_pretrained(folder, gguf_file=NAME) "
            "dequantizes it (needs the gguf package), then save_pretrained",
    "fp8": "re-export it with block scales (weight_scale_inv) or dequantize it to bf16 first (transformers "
           "loads FP8 checkpoints dequantized on a machine without a GPU; save_pretrained that copy)",
    "static": "its activation scales (input_scale) would not fit the merged weights; dequantize it to bf16 "
              "first (transformers loads FP8 checkpoints dequantized on a machine without a GPU; "
              "save_pretrained that copy)",
}
GENERIC_HINT = "dequantize it to bf16/fp16 with the tool that quantized it, or merge the unquantized original"

#: tensor-name endings of other quantized formats -> the format's name (its first word keys the hint)
COMPANION_SUFFIXES = {
    ".qweight": "gptq/awq", ".qzeros": "gptq/awq", ".g_idx": "gptq", ".scales": "gptq/awq",
    ".absmax": "bitsandbytes", ".quant_map": "bitsandbytes", ".SCB": "bitsandbytes",
    ".nested_absmax": "bitsandbytes", ".weight_format": "bitsandbytes",
    ".weight_packed": "compressed-tensors", ".weight_zero_point": "compressed-tensors",
    ".weight_scale": "per-tensor/per-channel scaled (weight_scale)",
    ".input_scale": "static FP8 activation scales (input_scale)",
}
#: endings of MXFP4 (gpt-oss) tensors, which are uint8
MXFP4_SUFFIXES = ("_blocks", "_scales")


@dataclass(frozen=True)
class Fp8Blocks:
    """FP8 weights with one float32 scale per ``block`` (b_m × b_n) of the last two axes (see the
    module docstring); ``dtype`` is the float8 storage type."""

    block: tuple[int, int]
    dtype: torch.dtype = torch.float8_e4m3fn

    def blocks(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The block of a weight of ``shape`` as it acts: (b_m, b_n) cut to the weight's own
        (m, n) (one block along an axis the block covers; the values are the same), at least 1."""
        (m, n), (bm, bn) = shape[-2:], self.block
        return max(1, min(bm, m)), max(1, min(bn, n))

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the scales of a weight of ``shape``: (..., ⌈m/b_m⌉, ⌈n/b_n⌉)."""
        (m, n), (bm, bn) = shape[-2:], self.block
        return (*shape[:-2], math.ceil(m / bm), math.ceil(n / bn))

    def scale_name(self, name: str) -> str:
        return name + SCALE_SUFFIX

    def stored_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of the quantized weight and its scales."""
        return math.prod(shape) * self.dtype.itemsize + math.prod(self.scale_shape(shape)) * 4

    def _expand(self, scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Each entry's block scale, (..., m, n): indexed, so nothing larger than the weight is made."""
        (m, n), (bm, bn) = shape[-2:], self.blocks(tuple(shape))
        rows = torch.arange(m, device=scale.device) // bm
        cols = torch.arange(n, device=scale.device) // bn
        return scale.index_select(-2, rows).index_select(-1, cols)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """W = q · s_B per block, in float32."""
        return q.to(torch.float32) * self._expand(scale.to(torch.float32), q.shape)

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, s): s_B = max_B |W| / 448 (1 for a zero block), q = round_fp8(W / s_B), on the CPU."""
        weight = weight.to(device="cpu", dtype=torch.float32)
        (m, n), (bm, bn) = weight.shape[-2:], self.blocks(tuple(weight.shape))
        sm, sn = math.ceil(m / bm), math.ceil(n / bn)
        padded = weight.new_zeros((*weight.shape[:-2], sm * bm, sn * bn))
        padded[..., :m, :n] = weight
        blocks = padded.reshape(*weight.shape[:-2], sm, bm, sn, bn)
        amax = blocks.abs().amax(dim=(-3, -1))
        largest = torch.finfo(self.dtype).max
        scale = torch.where(amax > 0, amax / largest, torch.ones_like(amax))
        q = (weight / self._expand(scale, weight.shape)).clamp(-largest, largest).to(self.dtype)
        return q, scale

    def encode(self, name: str, value: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A merged float32 value as the stored weight and its companion scale tensor."""
        q, scale = self.quantize(value)
        return q, {self.scale_name(name): scale}


class Fp8Checkpoint(Checkpoint):
    """A checkpoint with FP8 block-scaled weights, read dequantized: ``names`` and :meth:`info` list
    the weights (stored dtype float8) but not their scales; :meth:`load` returns W in float32;
    :meth:`stored` the weight and its scale as stored. ``schemes`` maps each FP8 weight to its
    :class:`Fp8Blocks`."""

    def __init__(self, inner: Checkpoint, schemes: dict[str, Fp8Blocks]):
        scales = {s.scale_name(n) for n, s in schemes.items()}
        infos = {n: inner.info(n) for n in inner.names if n not in scales}
        super().__init__(inner.path, inner.folder, infos, inner.support)
        self.inner = inner
        self.schemes = schemes

    def load(self, name: str) -> torch.Tensor:
        scheme = self.schemes.get(name)
        if scheme is None:
            return self.inner.load(name)
        scale_name = scheme.scale_name(name)
        scale = self.inner.load(scale_name).to(torch.float32)
        if scale.numel() and not bool((scale > 0).all() and torch.isfinite(scale).all()):
            raise InputError(f"{self.inner.info(scale_name).file}: tensor '{scale_name}' holds scales that are zero, "
                             f"negative or not finite (smallest {scale.min().item():g}); a block scale is "
                             f"max|W|/448 > 0. Re-export the checkpoint.")
        return scheme.dequantize(self.inner.load(name), scale)

    def stored(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors ``name`` is stored as (an FP8 weight and its scales, else the tensor)."""
        scheme = self.schemes.get(name)
        names = [name] if scheme is None else [name, scheme.scale_name(name)]
        return {n: self.inner.load(n) for n in names}

    def close(self) -> None:
        self.inner.close()


def scheme_of(checkpoint: Checkpoint, name: str) -> Fp8Blocks | None:
    """How tensor ``name`` of ``checkpoint`` is quantized (``None``: stored as it reads)."""
    return checkpoint.schemes.get(name) if isinstance(checkpoint, Fp8Checkpoint) else None


def read_config(folder: Path | None) -> dict:
    """``folder/config.json`` as a dict (empty for a bare file or a folder without one)."""
    if folder is None or kind(folder / "config.json") is None:
        return {}
    config = load_json(folder / "config.json", "config.json")
    return config if isinstance(config, dict) else {}


def refusal(where: object, tensor: str | None, fmt: str) -> InputError:
    """The error for a checkpoint in quantized format ``fmt``: file, tensor and what to convert with."""
    hint = CONVERT_HINTS.get(fmt.split("/")[0].split()[0].lower(), GENERIC_HINT)
    what = f"tensor '{tensor}' is" if tensor else "the weights are"
    return InputError(f"{where}: {what} stored in {fmt} quantized form; primerge merges only float weights "
                      f"and FP8 with block scales (weight_scale_inv), never quantized codes as numbers. "
                      f"Fix: {hint}.")


def _block_size(config: dict, path: Path) -> tuple[int, int]:
    quant = config.get("quantization_config") or {}
    block = quant.get("weight_block_size") or DEFAULT_BLOCK
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(type(b) is int and b > 0 for b in block)):
        raise InputError(f"{path}: quantization_config.weight_block_size {quoted(block)} is not two positive integers.")
    return (block[0], block[1])


def _check_method(config: dict, checkpoint: Checkpoint) -> None:
    quant = config.get("quantization_config") or config.get("compression_config")
    if not quant:
        return
    if not isinstance(quant, dict):
        raise InputError(f"{checkpoint.folder / 'config.json'}: quantization_config is not an object; repair it.")
    method = str(quant.get("quant_method", "unknown")).lower()
    if method != "fp8":
        raise refusal(checkpoint.folder / "config.json", None, method)
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        raise refusal(checkpoint.folder / "config.json", None, "static FP8 activation scales (input_scale)")


def _check_tensor(checkpoint: Checkpoint, name: str) -> None:
    """Refuse a tensor of another quantized format, known by its name's ending. (Integer tensors
    without such companions are never merged: like every non-floating tensor, they are copied.)"""
    info = checkpoint.info(name)
    for suffix, fmt in COMPANION_SUFFIXES.items():
        if name.endswith(suffix):
            raise refusal(info.file, name, fmt)
    if info.dtype == torch.uint8 and name.endswith(MXFP4_SUFFIXES):
        raise refusal(info.file, name, "mxfp4")


def _fp8_schemes(checkpoint: Checkpoint, block: tuple[int, int]) -> dict[str, Fp8Blocks]:
    """Every FP8 weight with its scheme; refuses FP8 without scales and scales of the wrong shape."""
    schemes = {}
    for name in checkpoint.names:
        info = checkpoint.info(name)
        if info.dtype not in FP8_DTYPES:
            continue
        scheme = Fp8Blocks(block, info.dtype)
        scale = scheme.scale_name(name)
        if scale not in checkpoint:
            raise refusal(info.file, name, "FP8 without block scales (no weight_scale_inv)")
        if len(info.shape) < 2:
            raise InputError(f"{info.file}: tensor '{name}' {list(info.shape)} is float8 with block scales, but "
                             f"block scales need a matrix (2 axes or more); re-export the checkpoint.")
        if checkpoint.info(scale).shape != scheme.scale_shape(info.shape):
            raise InputError(f"{info.file}: tensor '{scale}' has shape {list(checkpoint.info(scale).shape)}, "
                             f"not the {list(scheme.scale_shape(info.shape))} of {block[0]}x{block[1]} blocks "
                             f"of '{name}' {list(info.shape)}; set quantization_config.weight_block_size.")
        schemes[name] = scheme
    return schemes


def check_block_size(checkpoint: Checkpoint, schemes: dict[str, Fp8Blocks], where: object) -> None:
    """Refuse a block size that divides no length of its axis among the weights with more than one
    block along it (the rule and why it holds: the module docstring)."""
    for axis, label in ((-2, "rows"), (-1, "columns")):
        block = next(iter(schemes.values())).block[axis]
        lengths = sorted({checkpoint.info(n).shape[axis] for n in schemes if checkpoint.info(n).shape[axis] > block})
        if lengths and all(length % block for length in lengths):
            raise InputError(f"{where}: quantization_config.weight_block_size gives blocks of {block} {label}, "
                             f"which divides none of the FP8 weights' {label} ({', '.join(map(str, lengths[:6]))}); "
                             f"the scales were made with another block size. Set the one the checkpoint was "
                             f"quantized with (its quantizer's weight_block_size).")


def dequantized(checkpoint: Checkpoint, config: dict) -> Checkpoint:
    """``checkpoint`` itself, an :class:`Fp8Checkpoint` view of it, or an :class:`InputError`."""
    _check_method(config, checkpoint)
    scales = {n for n in checkpoint.names if n.endswith(SCALE_SUFFIX)}
    for name in checkpoint.names:
        if name not in scales:
            _check_tensor(checkpoint, name)
    schemes = _fp8_schemes(checkpoint, _block_size(config, checkpoint.path))
    orphans = sorted(scales - {s.scale_name(n) for n, s in schemes.items()})
    if orphans:
        raise InputError(f"{checkpoint.info(orphans[0]).file}: tensor '{orphans[0]}' scales no FP8 weight "
                         f"(no '{orphans[0].removesuffix(SCALE_SUFFIX)}' in float8); re-export the checkpoint.")
    if config.get("quantization_config") and not schemes:
        raise InputError(f"{checkpoint.folder / 'config.json'}: quantization_config says the weights are FP8, but no "
                         f"tensor of {checkpoint.path} is float8; an output would carry a false config. Remove "
                         f"quantization_config from config.json (the weights are not quantized).")
    if schemes:
        check_block_size(checkpoint, schemes, checkpoint.folder / "config.json" if checkpoint.folder else checkpoint.path)
    return Fp8Checkpoint(checkpoint, schemes) if schemes else checkpoint


def open_weights(path: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    """:func:`~primerge.io.readers.open_checkpoint`, with quantized formats dequantized or refused."""
    path = Path(path).expanduser()
    refuse_gguf(path)
    checkpoint = open_checkpoint(path, allow_pickle=allow_pickle)
    return dequantized(checkpoint, read_config(checkpoint.folder))


# ---------------------------------------------------------------------------------------- GGUF

GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
              11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
              18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8",
              25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16"}
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class _Reader:
    """Little-endian reads from a GGUF header, every count and length checked against the bytes
    the file has left (a header claiming 2^60 strings or a 2^60-byte string is refused, not read)."""

    def __init__(self, handle, size: int):
        self.handle = handle
        self.size = size

    def _left(self) -> int:
        return self.size - self.handle.tell()

    def scalar(self, code: str):
        size = struct.calcsize("<" + code)
        data = self.handle.read(size)
        if len(data) != size:
            raise EOFError
        return struct.unpack("<" + code, data)[0]

    def count(self, code: str, each: int = 1) -> int:
        """A count of items of at least ``each`` bytes, no more than the file can hold."""
        n = self.scalar(code)
        if n * each > self._left():
            raise ValueError(f"a count of {n} at byte {self.handle.tell()} exceeds the file")
        return n

    def string(self) -> str:
        return self.handle.read(self.count("Q")).decode("utf-8", "replace")

    def value(self, kind: int) -> None:
        if kind == 8:
            self.string()
        elif kind == 9:
            item = self.scalar("I")
            for _ in range(self.count("Q", struct.calcsize(_SCALARS.get(item, "Q")))):
                self.value(item)
        elif kind in _SCALARS:
            self.scalar(_SCALARS[kind])
        else:
            raise ValueError(f"unknown metadata type {kind}")


def gguf_tensors(file: Path) -> list[tuple[str, str]]:
    """(name, GGML type) of every tensor listed in a GGUF file's header."""
    with open_regular(file, "GGUF file") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError("no GGUF magic")
        reader = _Reader(handle, os.fstat(handle.fileno()).st_size)
        count_code = "I" if reader.scalar("I") == 1 else "Q"
        tensors, metadata = reader.count(count_code, 8), reader.count(count_code, 8)
        for _ in range(metadata):
            reader.string()
            reader.value(reader.scalar("I"))
        found = []
        for _ in range(tensors):
            name = reader.string()
            for _ in range(reader.count("I", 8)):
                reader.scalar("Q")
            code = reader.scalar("I")
            reader.scalar("Q")
            found.append((name, GGML_TYPES.get(code, f"type {code}")))
    return found


def refuse_gguf(path: Path) -> None:
    """Refuse a GGUF file, or a folder whose only weights are GGUF files, naming a quantized tensor."""
    files = [path] if path.suffix == ".gguf" else []
    if path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        files = sorted(path.glob("*.gguf"))
    if not files or kind(files[0]) is None:
        return
    try:
        tensors = gguf_tensors(files[0])
    except (OSError, ValueError, EOFError, struct.error, RecursionError) as exc:
        raise InputError(f"{files[0]}: a .gguf file primerge cannot parse ({exc}); GGUF is not read. "
                         f"Fix: {CONVERT_HINTS['gguf']}.") from None
    quantized = [(n, t) for n, t in tensors if t not in ("F32", "F16", "BF16", "F64")]
    name, ggml_type = (quantized or tensors or [(None, "")])[0]
    raise refusal(files[0], name, f"GGUF {ggml_type}".rstrip())


def describe(info: TensorInfo, scheme: Fp8Blocks | None) -> str:
    """How a tensor is stored, for reports: ``float8_e4m3fn (128x128 blocks)`` or its dtype."""
    dtype = str(info.dtype).removeprefix("torch.")
    return f"{dtype} ({scheme.block[0]}x{scheme.block[1]} blocks)" if scheme else dtype
