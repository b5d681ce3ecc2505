"""GGUF files (llama.cpp's format) in and out: ``load_gguf`` and ``save_gguf`` through the Hugging Face registry.

A GGUF file is read as if it were a Hugging Face checkpoint: its metadata becomes a ``config.json`` dict and its
tensors get their Hugging Face names (through ``gguf``'s own tensor-name map), with what llama.cpp's converter
changed undone -- the q/k row permutation of ``llama`` files, the ``+1`` folded into Gemma's norm weights,
GPT-2's transposed ``Conv1D`` matrices, GPT-NeoX's q/k/v un-interleaved. The registry's family then makes the
``Config`` and ``interop.hf.fill_params`` the parameters, exactly as ``load_hf`` does. The header is read by
``interop.gguf_file`` (not ``gguf``'s reader, which parses the whole vocabulary through numpy), names and
shapes are checked against the family's slots, and only then is each tensor read, as its parameter fills:
quantized ones dequantized by ``gguf.quants.dequantize`` (ggml's reference, so bit for bit what transformers'
GGUF loader gets), F32 / F16 / BF16 ones views of the copy-on-write memory map (no copy until a value changes).

``save_gguf`` writes the reverse: the family's Hugging Face tensors renamed, re-permuted and quantized by
``gguf.quants.quantize``, with the metadata llama.cpp reads.
"""

import mmap
import os
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from ftransformer import tree
from ftransformer.config import Config
from ftransformer.interop.gguf_file import TensorInfo, read_gguf_header
from ftransformer.interop.hf import Deferred
from ftransformer.interop.registry import FAMILIES, Family, family_for

# GGUF ``general.architecture`` -> Hugging Face ``model_type`` (Mistral and SmolLM are written as ``llama``).
ARCHITECTURES = {
    "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "olmo2": "olmo2", "gemma": "gemma",
    "gemma2": "gemma2", "gemma3": "gemma3_text", "gptneox": "gpt_neox", "gpt2": "gpt2",
}
WRITTEN_AS = {**{v: k for k, v in ARCHITECTURES.items()}, "mistral": "llama"}  # model_type -> GGUF architecture
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # what gguf.quants.quantize writes
DEQUANTIZE_CHUNK = 2**18  # float32 values dequantized per run of rows (1 MiB: fits the cache)
GEMMA3_FULL_EVERY = 6  # llama.cpp's Gemma 3: every sixth layer attends globally, the others in a window
GEMMA3_LOCAL_BASE = 10000.0  # llama.cpp's Gemma 3 rotary base for the windowed layers
_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
_GPT2_TRANSPOSED = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")


def _gguf():
    """The ``gguf`` package (imported when a file is read or written, not with ftransformer)."""
    import gguf

    return gguf


# ---------------------------------------------------------------- metadata -> config.json


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, TensorInfo]]:
    """A model file's metadata (the tokenizer's long arrays stepped over) and tensor infos; a bad file refused."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file (expected a GGUF model file)")
    try:
        return read_gguf_header(path, keep=lambda key: key not in _TOKENIZER_ARRAYS)
    except ValueError as e:
        raise ValueError(f"{path} is not a readable GGUF file ({e})") from None


def _architecture(meta: dict) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    return arch


def hf_config(meta: dict, shapes: dict[str, tuple[int, ...]]) -> dict:
    """The Hugging Face ``config.json`` a GGUF file's metadata and tensor shapes (``{name: shape}``) describe."""
    arch = _architecture(meta)
    a = arch + "."
    keys = {"context_length": "max_position_embeddings", "embedding_length": "hidden_size",
            "block_count": "num_hidden_layers", "feed_forward_length": "intermediate_size",
            "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
            "attention.layer_norm_rms_epsilon": "rms_norm_eps", "attention.layer_norm_epsilon": "layer_norm_eps",
            "rope.freq_base": "rope_theta", "attention.key_length": "head_dim",
            "attention.sliding_window": "sliding_window", "attn_logit_softcapping": "attn_logit_softcapping",
            "final_logit_softcapping": "final_logit_softcapping", "use_parallel_residual": "use_parallel_residual"}
    hf = {"model_type": ARCHITECTURES[arch], **{hf_key: meta[a + k] for k, hf_key in keys.items() if a + k in meta}}
    missing = [a + k for k in ("embedding_length", "block_count", "attention.head_count") if a + k not in meta]
    if missing or "token_embd.weight" not in shapes:
        raise ValueError(f"GGUF file lacks {missing or ['tensor token_embd.weight']}, which every {arch} model has")
    hf["vocab_size"] = shapes["token_embd.weight"][0]
    hf["tie_word_embeddings"] = "output.weight" not in shapes
    hf.setdefault("num_key_value_heads", hf["num_attention_heads"])
    hf.setdefault("intermediate_size", 4 * hf["hidden_size"])
    head_dim = hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    rope = _rope(meta, a, hf.pop("rope_theta", 10000.0), meta.get(a + "rope.dimension_count", head_dim) / head_dim)
    if "rope_freqs.weight" in shapes:
        raise ValueError("GGUF file holds rope_freqs.weight (per-frequency rope factors, e.g. Llama 3.1's); "
                         "supported: rope scaling none or linear")
    return _family_fixups(arch, hf, rope, head_dim)


def _rope(meta: dict, a: str, theta: float, fraction: float) -> dict:
    """``rope_parameters`` from the rope metadata: type (none -> default, linear, or refused later by name)."""
    kind = meta.get(a + "rope.scaling.type", "none")
    rope = {"rope_type": "default" if kind == "none" else kind, "rope_theta": float(theta)}
    if kind != "none":
        rope["factor"] = float(meta.get(a + "rope.scaling.factor", 1.0))
    if fraction != 1:
        rope["partial_rotary_factor"] = fraction
    return rope


def _family_fixups(arch: str, hf: dict, rope: dict, head_dim: int) -> dict:
    """What each architecture's llama.cpp graph fixes rather than reads (activations, query scale, layer kinds)."""
    hf["rope_parameters"] = rope
    if arch.startswith("gemma"):
        hf["hidden_activation"] = "gelu_pytorch_tanh"
        hf["query_pre_attn_scalar"] = head_dim  # llama.cpp scales queries by head_dim ** -0.5 (but for Gemma-2 27B)
    if arch == "gemma3":
        full = [(i + 1) % GEMMA3_FULL_EVERY == 0 for i in range(hf["num_hidden_layers"])]
        hf["layer_types"] = ["full_attention" if f else "sliding_attention" for f in full]
        hf["rope_parameters"] = {"full_attention": rope,
                                 "sliding_attention": {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_BASE}}
    if arch == "gpt2":
        hf = {"model_type": "gpt2", "vocab_size": hf["vocab_size"], "n_embd": hf["hidden_size"],
              "n_layer": hf["num_hidden_layers"], "n_head": hf["num_attention_heads"],
              "n_positions": hf.get("max_position_embeddings", 1024), "n_inner": hf["intermediate_size"],
              "layer_norm_epsilon": hf.get("layer_norm_eps", 1e-5), "tie_word_embeddings": True}
    if arch == "gptneox":
        hf["hidden_act"] = "gelu"
    return hf


# ---------------------------------------------------------------- tensors -> Hugging Face names


def gguf_names(family: Family, cfg: Config, arch: str) -> dict[str, str]:
    """``{Hugging Face name: GGUF name}`` for every tensor of ``family``'s checkpoint for ``cfg``."""
    gguf = _gguf()
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, cfg.n_layers)
    out = {}
    for slot in family.slots(cfg):
        stem, _, suffix = slot.hf_key.rpartition(".")
        name = names.get_name(stem)
        if name is None and slot.tied:
            continue  # a tied head the architecture has no tensor for (Gemma's): the embedding serves
        if name is None:
            raise ValueError(f"{slot.hf_key} has no GGUF name for architecture {arch}")
        out[slot.hf_key] = f"{name}.{suffix}"
    return out


def _types(infos: dict[str, TensorInfo]) -> dict[str, str]:
    """Each tensor's ggml type name; a type outside ``TYPES`` refused by name, before any data is read."""
    T = _gguf().GGMLQuantizationType
    known = {int(t): t.name for t in T}
    types = {name: known.get(info.ggml_type, f"type {info.ggml_type}") for name, info in infos.items()}
    bad = sorted({f"{name} ({kind})" for name, kind in types.items() if kind not in TYPES})
    if bad:
        raise ValueError(f"GGUF tensor type(s) not supported: {', '.join(bad[:5])}; supported: {', '.join(TYPES)}")
    return types


def _nbytes(info: TensorInfo, kind: str) -> int:
    """The bytes of a tensor of ggml type ``kind`` (whole blocks of its rows)."""
    gguf = _gguf()
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    if info.shape[-1] % block:
        raise ValueError(f"tensor {info.name} has rows of {info.shape[-1]}, not whole {kind} blocks of {block}")
    return _rows(info.shape) * (info.shape[-1] // block) * size


def _mapped(path: Path, infos: dict[str, TensorInfo], types: dict[str, str]) -> mmap.mmap:
    """The file memory-mapped copy-on-write (views of it are writable, the file is not), every tensor inside it."""
    size = path.stat().st_size
    for name, info in infos.items():
        if info.start + _nbytes(info, types[name]) > size:
            raise ValueError(f"{path} is truncated: tensor {name} ends at byte {info.start + _nbytes(info, types[name])} "
                             f"of a {size}-byte file")
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def _file_tensor(data: mmap.mmap, info: TensorInfo, kind: str, order: np.ndarray | None) -> Tensor:
    """One file tensor, its rows taken in ``order`` (None: as stored): a view of the map for F32 / F16 / BF16
    (a copy when reordered), ``gguf.quants.dequantize``'s float32 otherwise (the quantized rows reordered first).
    The map's pages of a tensor that was copied are then dropped from memory (read again if ever needed)."""
    n = _nbytes(info, kind)
    raw = np.frombuffer(data, np.uint8, n, info.start)
    floating = {"F32": np.float32, "F16": np.float16, "BF16": np.int16}.get(kind)
    if order is not None:  # each first-axis row is whole bytes (a quantized row of one axis is not reordered)
        raw = raw.reshape(info.shape[0], -1)[order]
    if floating is not None:
        t = torch.from_numpy(raw.view(floating).reshape(info.shape))
        t = t.view(torch.bfloat16) if kind == "BF16" else t
    else:
        t = dequantize(raw.reshape(-1, n // _rows(info.shape)), kind).reshape(info.shape)
    if floating is None or order is not None:
        _release(data, info.start, n)
    return t


def _release(data: mmap.mmap, start: int, n: int) -> None:
    """Drop the pages lying wholly inside bytes ``start:start + n`` of the map (already copied out) from memory."""
    lo, hi = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, (start + n) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo and hasattr(mmap, "MADV_DONTNEED"):
        data.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _rows(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[:-1], dtype=np.int64))


def dequantize(rows: np.ndarray, kind: str) -> Tensor:
    """``[n, row bytes]`` of ggml type ``kind`` as ``[n, row]`` float32, bit for bit ``gguf.quants.dequantize``.

    The same per-block arithmetic (the type's own ``dequantize_rows``), over runs of rows of ~1 MiB (twice
    as fast as ``gguf``'s groups of 16 rows; the temporaries stay that small), into memory torch allocates
    (numpy asks for huge pages, whose first touch costs several times more on a busy machine).
    """
    quant = getattr(_gguf().quants, kind)
    quant.init_grid()
    width = rows.shape[1] // quant.type_size * quant.block_size
    out = torch.empty(rows.shape[0], width, dtype=torch.float32)
    values = out.numpy()
    step = max(1, DEQUANTIZE_CHUNK // width)
    for start in range(0, rows.shape[0], step):
        values[start:start + step] = quant.dequantize_rows(rows[start:start + step])
    return out


def _deferred(data: mmap.mmap, info: TensorInfo, kind: str, arch: str, heads: tuple[int, int]) -> Deferred:
    """A file tensor read, dequantized and converted (``row_order``, ``_convert``) only when its parameter fills."""
    dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(kind, torch.float32)
    shape = _convert(torch.empty(info.shape, dtype=dtype, device="meta"), info.name, arch).shape
    order = row_order(info.name, arch, heads, info.shape[0])
    return Deferred(tuple(shape), dtype, lambda: _convert(_file_tensor(data, info, kind, order), info.name, arch))


def row_order(name: str, arch: str, heads: tuple[int, int], n_rows: int) -> np.ndarray | None:
    """For each Hugging Face row of the tensor ``name`` of an ``arch`` file, the file's row it is (None: the same).

    ``heads``: (query heads, key/value heads). llama.cpp permutes the q/k rows of ``llama`` files so each
    head's rotary pairs interleave, and stores GPT-NeoX's fused q/k/v as ``[q; k; v]`` (HF interleaves them
    per head). Loading takes the rows in this order (quantized rows before they are dequantized: bytes, not
    floats, are moved); saving puts them back (``numpy.argsort`` of it).
    """
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
        n = heads[0] if ".attn_q." in name else heads[1]
        return rearrange(np.arange(n_rows), "(heads half pair) -> (heads pair half)", heads=n, pair=2)
    if arch == "gptneox" and ".attn_qkv." in name:
        return rearrange(np.arange(n_rows), "(qkv heads head_dim) -> (heads qkv head_dim)", qkv=3, heads=heads[0])
    return None


def _convert(w: Tensor, name: str, arch: str, *, to_gguf: bool = False) -> Tensor:
    """Undo the value changes llama.cpp's converter made to the tensor ``name`` of an ``arch`` file (``to_gguf``:
    make them): Gemma's norms stored as ``1 + w``, GPT-2's ``Conv1D`` matrices as ``[d_out, d_in]``."""
    if arch.startswith("gemma") and name.endswith("norm.weight"):
        return w + 1 if to_gguf else w - 1
    if arch == "gpt2" and name.endswith(_GPT2_TRANSPOSED):
        return w.T  # HF's GPT-2 Conv1D stores [d_in, d_out]
    return w


# ---------------------------------------------------------------- load


def config_from_gguf(path: str | os.PathLike) -> tuple[Config, dict]:
    """``(cfg, metadata)`` of a GGUF file from its header alone (metadata and tensor shapes; no tensor is read)."""
    meta, infos = read_header(path)
    return _config(meta, infos)[2], meta


def _config(meta: dict, infos: dict[str, TensorInfo]) -> tuple[dict, Family, Config]:
    """The ``config.json`` dict, the family and the ``Config`` a file's metadata and tensor shapes describe."""
    hf = hf_config(meta, {name: info.shape for name, info in infos.items()})
    family = FAMILIES[hf["model_type"]]
    return hf, family, family.config_in(hf)


def load_gguf(path: str | os.PathLike, dtype: torch.dtype | None = None, *, int8: bool = False) -> tuple[Config, dict]:
    """``(cfg, params)`` from a GGUF file of any architecture in ``ARCHITECTURES``, like ``load_hf``.

    Args:
        dtype: the parameters' dtype (None: float32, what llama.cpp and transformers compute GGUF models in).
        int8: every projection matrix stored as Q8_0 becomes an ``Int8Weight``. Q8_0 has one scale per 32
            weights of a row, ``Int8Weight`` one per output channel, which cannot hold them all: the matrix is
            dequantized exactly, then re-quantized per channel with the smallest scale that covers it
            (``quantize_matrix``: within ``scale / 2`` of the Q8_0 values; exact where a row's blocks share one
            scale). Other types and matrices stay float.

    Tensor types outside ``TYPES``, architectures outside ``ARCHITECTURES`` and missing or unexpected tensors
    each raise one ``ValueError`` naming them, before any tensor is read. The file is memory-mapped
    copy-on-write and read tensor by tensor as the parameters fill (``interop.hf.Deferred``): a float tensor
    needing no change is a view of the map, a quantized one is dequantized just then, so the peak memory is
    the parameters plus one tensor.
    """
    from ftransformer.interop.hf import fill_params

    meta, infos = read_header(path)
    arch = _architecture(meta)
    types = _types(infos)
    hf, family, cfg = _config(meta, infos)
    heads = (hf.get("num_attention_heads", hf.get("n_head")), hf.get("num_key_value_heads", hf.get("n_head")))
    names = _matched(gguf_names(family, cfg, arch), infos, family, cfg)
    data = _mapped(Path(path), infos, types)
    stored = {key: _deferred(data, infos[name], types[name], arch, heads) for key, name in names.items()}
    params = fill_params(stored, family, cfg, dtype=torch.float32 if dtype is None else dtype)
    return cfg, _q8_as_int8(params, family, cfg, {key: types[name] for key, name in names.items()}) if int8 else params


def _matched(names: dict[str, str], tensors: dict, family: Family, cfg: Config) -> dict[str, str]:
    """``{HF name: GGUF name}`` of the file's tensors, after checking none is missing and none is left over."""
    tied = {s.hf_key for s in family.slots(cfg) if s.tied}
    missing = [f"{g} ({h})" for h, g in names.items() if g not in tensors and h not in tied]
    extra = sorted(set(tensors) - set(names.values()))
    sizes = f"(n_layers={cfg.n_layers}, d_model={cfg.d_model}, tie_embeddings={cfg.embeddings.tie})"
    if missing:
        raise ValueError(f"GGUF file is missing {len(missing)} tensor(s) the config {sizes} needs: {', '.join(missing[:5])}")
    if extra:
        raise ValueError(f"GGUF file has {len(extra)} tensor(s) the config {sizes} has no place for: {', '.join(extra[:5])}")
    return {h: g for h, g in names.items() if g in tensors}


def _q8_as_int8(params: dict, family: Family, cfg: Config, types: dict[str, str]) -> dict:
    """``params`` with every projection matrix whose stored tensors are all Q8_0 as an ``Int8Weight``."""
    from ftransformer.layers.int8 import fbgemm_available, quantize_matrix
    from ftransformer.quantization import MATRICES

    sources: dict[str, list[str]] = {}
    for slot in family.slots(cfg):
        if not slot.tied:
            sources.setdefault(slot.path, []).append(types[slot.hf_key])
    fbgemm_available()  # probe the fast product eagerly, as quantize does
    flat = tree.flatten_with_paths(params)
    for path, kinds in sources.items():
        if (path.rsplit(".", 1)[-1] in MATRICES or path == "unembed.w") and set(kinds) == {"Q8_0"}:
            flat[path] = quantize_matrix(flat[path])
    return tree.unflatten_paths(flat)


# ---------------------------------------------------------------- save


def save_gguf(
    params: dict, cfg: Config, path: str | os.PathLike, *, tokenizer=None, quant: str = "f16"
) -> Path:
    """Write ``params`` as a GGUF file llama.cpp runs (and ``load_gguf`` / transformers read back). Returns the path.

    ``quant``: the matrices' type, one of ``QUANTS`` (``gguf.quants.quantize``); 1-D tensors (norms, biases)
    stay F32 as llama.cpp keeps them, and a matrix whose rows do not split into the type's blocks is written
    F16 (llama.cpp's converter does the same). ``tokenizer``: its vocabulary, merges, special tokens and chat
    template are written too (``interop.gguf_tokenizer.add_tokenizer``); None writes no tokenizer (llama.cpp
    then needs one given separately). A config the GGUF architecture cannot express raises ``ValueError``
    naming the fields it would lose.
    """
    from ftransformer.interop.hf import hf_state_dict
    from ftransformer.io import replacing

    if quant not in QUANTS:
        raise ValueError(f"unknown GGUF quant {quant!r}; supported: {', '.join(QUANTS)}")
    family = family_for(cfg)
    if family.model_type not in WRITTEN_AS:
        raise ValueError(f"{family.model_type} has no GGUF architecture; supported: {', '.join(WRITTEN_AS)}")
    arch, hf = WRITTEN_AS[family.model_type], family.config_json(cfg)
    names = gguf_names(family, cfg, arch)
    tied = {s.hf_key for s in family.slots(cfg) if s.tied}
    tensors = {names[k]: v for k, v in hf_state_dict(params, cfg, family.model_type).items() if k not in tied}
    meta = _gguf_metadata(arch, cfg, hf)
    file_type = _gguf().LlamaFileType["ALL_F32" if quant == "f32" else f"MOSTLY_{quant.upper()}"]
    meta.update({"general.file_type": int(file_type), "general.quantization_version": _gguf().GGML_QUANT_VERSION})
    _check_expressible(family, hf, meta, {n: tuple(t.shape) for n, t in tensors.items()})
    with replacing(path) as tmp:
        writer = _gguf().GGUFWriter(tmp, arch)
        for key, value in meta.items():
            _add_value(writer, key, value)
        _add_tokenizer(writer, tokenizer, arch, cfg.vocab_size)
        heads = (cfg.n_heads, cfg.n_kv_heads or cfg.n_heads)
        for name, t in tensors.items():
            order = row_order(name, arch, heads, t.shape[0])
            t = t.detach() if order is None else t.detach()[torch.from_numpy(np.argsort(order))]
            _add_tensor(writer, name, _convert(t, name, arch, to_gguf=True), quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)


def _gguf_metadata(arch: str, cfg: Config, hf: dict) -> dict:
    """The ``{arch}.*`` metadata llama.cpp reads for ``cfg`` (``hf``: its ``config.json``, for the extras)."""
    a = arch + "."
    meta = {"general.architecture": arch, a + "context_length": cfg.max_seq_len, a + "embedding_length": cfg.d_model,
            a + "block_count": cfg.n_layers, a + "feed_forward_length": cfg.d_ff, a + "attention.head_count": cfg.n_heads,
            a + "attention.head_count_kv": cfg.n_kv_heads or cfg.n_heads, a + "vocab_size": cfg.vocab_size,
            a + "attention.key_length": cfg.head_dim, a + "attention.value_length": cfg.head_dim}
    rms = cfg.norm.kind == "rmsnorm"
    meta[a + ("attention.layer_norm_rms_epsilon" if rms else "attention.layer_norm_epsilon")] = float(cfg.norm.eps)
    if cfg.positional.kind == "rope":
        meta[a + "rope.freq_base"] = float(cfg.positional.base)
        meta[a + "rope.dimension_count"] = cfg.positional.rotary_dim or cfg.head_dim
        scaling = cfg.positional.scaling
        if scaling is not None and scaling.kind != "linear":
            raise ValueError(f"GGUF metadata holds rope scaling 'linear' only; got {scaling.kind!r}")
        if scaling is not None:
            meta[a + "rope.scaling.type"], meta[a + "rope.scaling.factor"] = "linear", float(scaling.factor)
    for hf_key, key in (("sliding_window", "attention.sliding_window"), ("attn_logit_softcapping", "attn_logit_softcapping"),
                        ("final_logit_softcapping", "final_logit_softcapping")):
        if hf.get(hf_key) is not None:
            meta[a + key] = hf[hf_key]
    if arch == "gptneox":
        meta[a + "use_parallel_residual"] = bool(hf.get("use_parallel_residual", True))
    return meta


def _check_expressible(family: Family, hf: dict, meta: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse, naming the fields, a config that reads back from the GGUF metadata as another config."""
    import dataclasses

    expected = family.config_in(hf)
    back = FAMILIES[ARCHITECTURES[meta["general.architecture"]]].config_in(hf_config(meta, shapes))
    lost = [f"{f.name} (expected {getattr(expected, f.name)!r}, the file says {getattr(back, f.name)!r})"
            for f in dataclasses.fields(Config) if getattr(expected, f.name) != getattr(back, f.name)]
    if lost:
        raise ValueError(f"GGUF architecture {meta['general.architecture']!r} cannot express this config: {'; '.join(lost)}")


def _add_value(writer, key: str, value) -> None:
    """One metadata entry, typed as llama.cpp reads it (bool, uint32, float32, string)."""
    if key == "general.architecture":
        return  # GGUFWriter wrote it
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, str(value))


def _add_tokenizer(writer, tokenizer, arch: str, vocab_size: int) -> None:
    """The tokenizer's metadata (``interop.gguf_tokenizer.add_tokenizer``), or ``none`` (no vocabulary) for None.

    Without a tokenizer, a ``gpt2`` file still lists ``vocab_size`` placeholder tokens: transformers reads
    GPT-2's vocabulary size from the token count alone (llama.cpp reads no tokens of a ``none`` vocabulary).
    """
    if tokenizer is None:
        writer.add_tokenizer_model("none")  # llama.cpp loads a model without a vocabulary from ids
        if arch == "gpt2":
            writer.add_token_list([f"<unnamed_{i}>" for i in range(vocab_size)])
        return
    size = getattr(tokenizer, "vocab_size", vocab_size)
    if size != vocab_size:
        raise ValueError(f"the tokenizer has {size} tokens but the model's vocab_size is {vocab_size}; "
                         "llama.cpp needs one token per embedding row")
    from ftransformer.interop.gguf_tokenizer import add_tokenizer

    add_tokenizer(writer, tokenizer)


def _add_tensor(writer, name: str, t: Tensor, quant: str) -> None:
    """One tensor in ``quant`` (1-D ones in F32; F16 where the rows do not split into the type's blocks)."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    data = t.to(torch.float32).contiguous().numpy()
    qtype = T.F32 if t.ndim == 1 or quant == "f32" else T[quant.upper()]
    if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = T.F16
    out = gguf.quants.quantize(data, qtype)
    writer.add_tensor(name, out, raw_dtype=qtype if out.dtype == np.uint8 else None)
