"""The benchmark's synthetic zoo: a LLaMA-style decoder (``embed_tokens``, q/k/v/o with grouped KV
heads, gate/up/down, RMS norms, ``lm_head``) generated once, tensor by tensor, into the cache
(:func:`primerge.util.cache_dirs.cache_root` ``/bench/<key>``, the key naming every setting). Its task vectors
have the structure of real fine-tunes: a few strong directions shared by all tasks (with
task-specific weights), a few task-specific ones, a decaying tail and noise.

Two settings make the *realistic* zoo of gap-free spectra: ``hidden_size`` gives LLaMA's shapes at
that width (head dimension 64, a quarter as many KV heads as heads, intermediate 256·⌈8h/3/256⌉:
2816 at 1024, 11008 at 4096, a 32,000-token vocabulary), and ``noise_floor`` f replaces the tail
by an i.i.d. Gaussian noise floor holding the share f of every matrix task vector's energy, the
strong directions the rest. A Gaussian m × n floor has the flat Marchenko–Pastur top edge: at
PRIME's 1% rank the cut falls inside it (six strong directions, r = 10 at hidden 1024), the
hard case for a truncated SVD.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from primerge.util.cache_dirs import cache_root
from primerge.util.seeding import generator

#: Bumped whenever the generated tensors change, so stale caches are never reused.
GENERATOR_VERSION = 1
#: Element RMS of the base weights (LLaMA's initializer_range) and of every task vector.
BASE_STD = 0.02
TAU_RMS = 1e-3
#: Strong directions per matrix: shared by every task (task-weighted) and task-specific.
SHARED_DIRECTIONS = (1.0, 0.8, 0.6)
SPECIFIC_DIRECTIONS = (1.0, 0.8, 0.6)
#: Energy (squared Frobenius norm) fractions of a matrix task vector.
ENERGY = {"shared": 0.30, "specific": 0.25, "tail": 0.35, "noise": 0.10}
#: The tail has rank r_full // TAIL_DIVISOR and singular values ∝ j^-TAIL_DECAY.
TAIL_DIVISOR = 4
TAIL_DECAY = 0.7
#: Head dimension of the LLaMA-shaped zoo (``hidden_size``).
HEAD_DIM = 64


@dataclass(frozen=True)
class ZooSpec:
    """A LLaMA-style decoder zoo: base + ``tasks`` fine-tunes, bf16.

    ``scale`` 1.0 gives hidden 768, intermediate 2048, 12 query / 4 KV heads and a
    32,000-token vocabulary: about 100M parameters with 8 layers. The vocabulary scales with the
    width unless ``vocab_rows`` fixes it.
    """

    layers: int = 8
    scale: float = 1.0
    tasks: int = 8
    seed: int = 0
    vocab_rows: int | None = None
    hidden_size: int | None = None  # LLaMA's shapes at this width (``scale`` then plays no part)
    noise_floor: float | None = None  # energy share of a Gaussian noise floor (None: the power-law tail)

    def __post_init__(self) -> None:
        if self.hidden_size is not None and (self.hidden_size < HEAD_DIM or self.hidden_size % HEAD_DIM):
            raise ValueError(f"hidden size {self.hidden_size} is not a positive multiple of {HEAD_DIM}")
        if self.noise_floor is not None and not 0 <= self.noise_floor < 1:
            raise ValueError(f"noise floor {self.noise_floor} must lie in [0, 1)")

    @property
    def heads(self) -> int:
        return 12 if self.hidden_size is None else self.hidden_size // HEAD_DIM

    @property
    def kv_heads(self) -> int:
        return 4 if self.hidden_size is None else max(1, self.heads // 4)

    @property
    def hidden(self) -> int:
        return self.hidden_size or self.heads * max(1, round(64 * self.scale))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def intermediate(self) -> int:
        if self.hidden_size is not None:
            return 256 * math.ceil(self.hidden_size * 8 / 3 / 256)
        return 32 * max(1, round(self.hidden * 8 / 3 / 32))

    @property
    def vocab(self) -> int:
        return self.vocab_rows or (32000 if self.hidden_size else max(64, round(32000 * self.scale)))

    @property
    def key(self) -> str:
        vocab = f"-V{self.vocab_rows}" if self.vocab_rows else ""
        width = f"h{self.hidden_size}" if self.hidden_size else f"s{self.scale:g}"
        floor = f"-nf{self.noise_floor:g}" if self.noise_floor is not None else ""
        return f"llama-L{self.layers}-{width}{vocab}{floor}-T{self.tasks}-seed{self.seed}-v{GENERATOR_VERSION}"

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, in the order of a Hugging Face LlamaForCausalLM."""
        h, kv, f = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (f, h)),
                (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def parameters(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def config(self) -> dict:
        """A Hugging Face ``config.json`` for the architecture."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "max_position_embeddings": 2048, "tie_word_embeddings": False,
        }


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp_min(1e-30)


def _directions(m: int, n: int, weights: Sequence[float], g: torch.Generator) -> torch.Tensor:
    """Σ_j w_j u_j v_jᵀ with orthonormal u (m) and v (n), unit Frobenius norm."""
    k = len(weights)
    U = torch.linalg.qr(torch.randn(m, k, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g))[0]
    return _unit((U * torch.tensor(weights)) @ V.T)


def base_tensor(spec: ZooSpec, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """θ₀ in float32: RMS norms are ones, every other weight N(0, 0.02²)."""
    if len(shape) == 1:
        return torch.ones(shape)
    return BASE_STD * torch.randn(shape, generator=generator(spec.seed, name, "base"))


def task_vector(spec: ZooSpec, name: str, shape: tuple[int, ...], task: int) -> torch.Tensor:
    """τ_t in float32 with element RMS ``TAU_RMS``, seeded by (seed, name, task).

    A matrix gets shared directions (the same u, v for all tasks, task-perturbed weights),
    task-specific directions, a Gaussian-factor tail of rank r_full/4 with singular
    values ∝ j^-0.7, and i.i.d. noise, in the energy shares of ``ENERGY``; with ``noise_floor`` f,
    the strong directions share 1 − f in the proportions of ``ENERGY`` and i.i.d. noise holds f.
    A vector gets noise.
    """
    g = generator(spec.seed, name, "task", task)
    if len(shape) == 1:
        return TAU_RMS * torch.randn(shape, generator=g)
    m, n = shape
    shared_weights = [w * (1.0 + 0.25 * float(torch.randn((), generator=g))) for w in SHARED_DIRECTIONS]
    shared = _directions(m, n, shared_weights, generator(spec.seed, name, "shared"))
    specific = _directions(m, n, SPECIFIC_DIRECTIONS, g)
    if spec.noise_floor is not None:
        strong = ENERGY["shared"] + ENERGY["specific"]
        share = {"shared": (1 - spec.noise_floor) * ENERGY["shared"] / strong,
                 "specific": (1 - spec.noise_floor) * ENERGY["specific"] / strong, "noise": spec.noise_floor}
        tau = (math.sqrt(share["shared"]) * shared + math.sqrt(share["specific"]) * specific
               + math.sqrt(share["noise"]) * _unit(torch.randn(m, n, generator=g)))
        return tau * (TAU_RMS * math.sqrt(m * n))
    rank = max(1, min(m, n) // TAIL_DIVISOR)
    decay = torch.arange(1, rank + 1, dtype=torch.float32).pow(-TAIL_DECAY)
    tail = _unit((torch.randn(m, rank, generator=g) * decay) @ torch.randn(rank, n, generator=g))
    noise = _unit(torch.randn(m, n, generator=g))
    tau = (math.sqrt(ENERGY["shared"]) * shared + math.sqrt(ENERGY["specific"]) * specific
           + math.sqrt(ENERGY["tail"]) * tail + math.sqrt(ENERGY["noise"]) * noise)
    return tau * (TAU_RMS * math.sqrt(m * n))


class StreamingSafetensors:
    """Write one safetensors file tensor by tensor: the header is planned from the shapes,
    so only the tensor being written is ever held in memory."""

    def __init__(self, path: Path, tensors: Iterable[tuple[str, tuple[int, ...]]],
                 dtype: torch.dtype = torch.bfloat16):
        codes = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
        size = torch.empty((), dtype=dtype).element_size()
        header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
        self._order: list[tuple[str, tuple[int, ...]]] = []
        offset = 0
        for name, shape in tensors:
            nbytes = math.prod(shape) * size
            header[name] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, tuple(shape)))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.dtype = dtype
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, shape = self._order[self._next]
        if name != expected or tuple(tensor.shape) != shape or tensor.dtype != self.dtype:
            raise ValueError(f"expected {expected} {shape} {self.dtype}, got {name} "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
        self._file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"only {self._next} of {len(self._order)} tensors were written")
        self._file.close()


def model_names(spec: ZooSpec) -> list[str]:
    return ["base"] + [f"ft-{t}" for t in range(spec.tasks)]


def zoo_folder(spec: ZooSpec, cache: str | Path | None = None) -> Path:
    return cache_root(cache) / "bench" / spec.key


def build_zoo(spec: ZooSpec, cache: str | Path | None = None,
              log: Callable[[str], None] = print) -> Path:
    """The zoo's folder (``base/``, ``ft-0/`` ...), generated on first use and then reused.

    Generation streams: each tensor of the base and of every fine-tune is made, cast to
    bf16 and written before the next one is made. The folder appears atomically.
    """
    folder = zoo_folder(spec, cache)
    if (folder / "zoo.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{spec.key}-", dir=folder.parent))
    try:
        start = time.perf_counter()
        tensors = spec.tensors()
        writers = {}
        for label in model_names(spec):
            (temp / label).mkdir()
            (temp / label / "config.json").write_text(json.dumps(spec.config(), indent=2) + "\n")
            writers[label] = StreamingSafetensors(temp / label / "model.safetensors", tensors)
        for name, shape in tensors:
            base = base_tensor(spec, name, shape).to(torch.bfloat16)
            writers["base"].write(name, base)
            base32 = base.float()
            for t in range(spec.tasks):
                tuned = (base32 + task_vector(spec, name, shape, t)).to(torch.bfloat16)
                writers[f"ft-{t}"].write(name, tuned)
        for w in writers.values():
            w.close()
        info = {**asdict(spec), "key": spec.key, "parameters": spec.parameters(),
                "generator_version": GENERATOR_VERSION, "config": spec.config()}
        (temp / "zoo.json").write_text(json.dumps(info, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(temp, folder)
        log(f"generated zoo {spec.key} ({spec.parameters() / 1e6:.1f}M parameters x "
            f"{spec.tasks + 1} checkpoints) in {time.perf_counter() - start:.1f}s -> {folder}")
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return folder


