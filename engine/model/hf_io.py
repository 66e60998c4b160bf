"""Hugging Face checkpoint I/O: read a model directory lazily, write one transformers loads unchanged.

Loading builds the model on the meta device (no memory), checks every tensor name and shape
against the safetensors headers (a few KB each: nothing is read yet), reports all problems at
once, and only then allocates the parameters and copies the tensors in, one at a time from the
memory-mapped files. Saving writes config.json, the safetensors shard(s) and their index into a
temporary sibling directory and renames it into place, so a crash never leaves a half-written
model where a complete one is expected.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from packtune.errors import CheckpointError
from packtune.model.causal_lm import CausalLM
from packtune.model.config import ModelArgs
from packtune.model.families import build_model, family_for
from packtune.model.families.family import StoredTensor

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}
_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}
_MAX_LISTED = 20


def load_pretrained(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> CausalLM:
    """Load a Hugging Face model directory (config.json + model.safetensors or a sharded index).

    `dtype` None keeps the checkpoint's stored dtype; `device` None means CPU. A tensor the family
    says is stored in pieces (`StoredTensor`: per-expert matrices, MXFP4 blocks and scales) is
    joined from them as it is read.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face model directory)")
    args = ModelArgs.from_file(path)
    files = _tensor_files(path)
    args = _checkpoint_args(args, files)
    headers = {file: _read_header(file) for file in sorted(set(files.values()))}
    stored = {name: headers[file][name] for name, file in files.items() if name in headers[file]}
    layout = _stored_layout(args, list(stored))

    with torch.device("meta"):
        model = build_model(args)
    expected = _expected_shapes(model)
    _check_tensors(path, expected, stored, layout)

    if dtype is None:
        dtype = _SAFETENSORS_DTYPES.get(stored[layout[model.embedding_name].names[0]][1]) or torch.float32
    model.to(dtype=dtype)
    model.to_empty(device=device or "cpu")
    model.tie_weights()
    params = dict(model.named_parameters())
    with contextlib.ExitStack() as stack, torch.no_grad():
        opened = {file: stack.enter_context(safe_open(file, framework="pt", device="cpu"))
                  for file in sorted({files[n] for name in expected for n in layout[name].names})}
        for name in expected:
            pieces = [opened[files[n]].get_tensor(n) for n in layout[name].names]
            params[name].copy_(layout[name].join(pieces))
    model.source_dir = path
    return model


def save_pretrained(
    model: CausalLM,
    path: str | os.PathLike,
    tokenizer_files: Iterable[str | os.PathLike] = (),
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write `path` as a Hugging Face model directory, atomically; returns the path.

    `state_dict` (full tensors, e.g. gathered from FSDP shards) replaces `model.state_dict()`.
    Tokenizer files are copied from the directory the model was loaded from, then from
    `tokenizer_files`. An existing `path` is replaced only if it is empty or a model directory.
    """
    path = Path(path)
    _check_replaceable(path)
    tensors = dict(state_dict if state_dict is not None else model.state_dict())
    if model.args.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    for name, t in tensors.items():
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            raise CheckpointError(
                f"{name}: {type(t).__name__} is not a full tensor; gather the state dict first"
            )
    if dtype is None:
        dtype = tensors[model.embedding_name].dtype

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_dir(path.parent, f".{path.name}.", ".tmp")
    try:
        _write_shards(tmp, tensors, dtype, max_shard_bytes)
        config = model.args.to_hf_config(dtype=_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")))
        _write_text(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        source = getattr(model, "source_dir", None)
        known = [source / name for name in TOKENIZER_FILES] if source is not None else []
        for file in [*known, *map(Path, tokenizer_files)]:
            if file.is_file():
                shutil.copyfile(file, tmp / file.name)
        # safetensors writes its files 0600; give them the mode a plain new file gets (umask applied)
        mode = stat.S_IMODE((tmp / "config.json").stat().st_mode)
        for file in tmp.iterdir():
            os.chmod(file, mode)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def checkpoint_args(path: str | os.PathLike) -> ModelArgs:
    """The args of a model directory as `load_pretrained` builds its model: config.json, completed by
    what the checkpoint stores where the family says so (T5's tied head). Build a model on the meta
    device from these, not from `ModelArgs.from_file`, when its weights will come from `path`."""
    path = Path(path)
    args = ModelArgs.from_file(path)
    return _checkpoint_args(args, _tensor_files(path))


def _checkpoint_args(args: ModelArgs, files: dict[str, Path]) -> ModelArgs:
    complete = family_for(args.model_type).checkpoint_args
    return args if complete is None else complete(args, files.keys())


def stored_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The dtype a model directory stores its weights in (that of the embeddings), if known."""
    path = Path(path)
    args = ModelArgs.from_file(path)
    files = _tensor_files(path)
    with torch.device("meta"):
        name = build_model(args).embedding_name
    stored = _stored_layout(args, list(files)).get(name)
    if stored is None or stored.names[0] not in files:
        return None
    return _SAFETENSORS_DTYPES.get(_read_header(files[stored.names[0]])[stored.names[0]][1])


def _as_is(name: str) -> StoredTensor:
    return StoredTensor((name,), lambda pieces: pieces[0], lambda shapes: shapes[0])


def _stored_layout(args: ModelArgs, names: list[str]) -> dict[str, StoredTensor]:
    """Model tensor name -> where the checkpoint keeps it (under its own name, unless the family's
    `stored` says otherwise: BLOOM's prefix-less checkpoints, experts stored per expert or in MXFP4; T5's
    shared embedding stored only as a stack's copy), less the family's `unread_names`."""
    rule = family_for(args.model_type).stored
    layout = {name: _as_is(name) for name in names}
    if rule is not None:
        found = rule(names)
        used = {n for where in found.values() for n in ((where,) if isinstance(where, str) else where.names)}
        layout = {name: where for name, where in layout.items() if name not in used}
        layout.update({name: _as_is(where) if isinstance(where, str) else where
                       for name, where in found.items()})
    unread = family_for(args.model_type).unread_names
    return {name: where for name, where in layout.items() if name not in unread}


def _new_dir(parent: Path, prefix: str, suffix: str) -> Path:
    """A new uniquely named directory with the umask's permissions (tempfile.mkdtemp makes 0700, which
    would become the exported directory's mode)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (from the index, or the single file)."""
    index, single = path / INDEX_NAME, path / WEIGHTS_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        files = {name: path / file for name, file in weight_map.items()}
        missing = sorted({f.name for f in files.values() if not f.is_file()})
        if missing:
            held = {m: sum(f.name == m for f in files.values()) for m in missing}
            listed = ", ".join(f"{m} ({n} tensors)" for m, n in held.items())
            raise CheckpointError(f"{path}: {INDEX_NAME} names shard files that are missing: {listed}")
        return files
    if single.is_file():
        return {name: single for name in _read_header(single)}
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    hint = (
        f" (found {', '.join(others)}: pickle checkpoints are not loaded; convert to safetensors)"
        if others
        else ""
    )
    raise CheckpointError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found{hint}")


def _read_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, safetensors dtype) from a file's header; validates the file's extent."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return {
                name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
                for name in f.keys()
            }
    except SafetensorError as e:
        size = file.stat().st_size
        raise CheckpointError(
            f"{file}: not a readable safetensors file ({size} bytes; truncated or corrupt download?): {e}"
        ) from None


def _expected_shapes(model: CausalLM) -> dict[str, tuple[int, ...]]:
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if model.args.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def _check_tensors(
    path: Path,
    expected: dict[str, tuple[int, ...]],
    stored: dict[str, tuple[tuple[int, ...], str]],
    layout: dict[str, StoredTensor],
) -> None:
    """One error listing every missing, unexpected and misshapen tensor (`stored`: stored name ->
    shape and dtype; `layout`: model name -> its pieces)."""
    found = {name: where.shape([stored[n][0] for n in where.names]) for name, where in layout.items()}
    ignorable = {name for name in found if name.endswith("rotary_emb.inv_freq") or name == "lm_head.weight"}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - ignorable)
    misshapen = [
        f"{name}: checkpoint {list(found[name])}, model {list(shape)}"
        for name, shape in expected.items()
        if name in found and tuple(found[name]) != shape
    ]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
        if items:
            more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
            problems.append(f"{len(items)} {title}: " + "; ".join(items[:_MAX_LISTED]) + more)
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match its config.json: " + " | ".join(problems))


def _write_shards(
    directory: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype, max_bytes: int
) -> None:
    """Consecutive tensors fill a shard up to `max_bytes`; more than one shard gets an index."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for shard, file in zip(shards, names, strict=True):
        data = {name: tensors[name].detach().to(device="cpu", dtype=dtype).contiguous() for name in shard}
        save_file(data, directory / file, metadata={"format": "pt"})
        _fsync(directory / file)
    if n > 1:
        total = sum(t.numel() * dtype.itemsize for t in tensors.values())
        weight_map = {name: file for shard, file in zip(shards, names, strict=True) for name in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_text(directory / INDEX_NAME, json.dumps(index, indent=2) + "\n")


def _check_replaceable(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path}: a non-empty directory that is not a model directory; refusing to replace it"
        )


def _replace_dir(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an old `path` is moved aside first and deleted after."""
    _fsync(tmp)
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    _fsync(path.parent)
    if old is not None:
        shutil.rmtree(old)


def _write_text(file: Path, text: str) -> None:
    file.write_text(text)
    _fsync(file)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
