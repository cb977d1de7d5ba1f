"""Checkpoints: folders of safetensors + JSON, written atomically, never pickled.

    RUN/                          a training run
      config.json                 ModelConfig
      train_config.json           TrainConfig
      tokenizer.json
      metrics.csv, loss.png
      checkpoints/step-000500/    one complete checkpoint, renamed into place when fully written
        model.safetensors  config.json  tokenizer.json  trainer_state.json  optimizer.pt
        (tokenizer_config.json too, with the chat template, for a chat model)
        (a LoRA run's: adapter.safetensors and adapter.json, naming its base, instead of
        model.safetensors; see lora.py)

A checkpoint folder is first written as `checkpoints/.tmp-*`, flushed to disk, then renamed: a crash
at any moment leaves either the old set of checkpoints or the new one, never half a folder.
`optimizer.pt` holds tensors, numbers and dicts only and is read back with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .lora import (ADAPTER_CONFIG, adapter_state, apply_lora, is_adapter_checkpoint, load_adapter_state, merge_lora,
                   read_adapter, save_adapter_files)
from .quantize import is_quantized

WEIGHTS = "model.safetensors"
CHECKPOINTS = "checkpoints"


class CheckpointError(ValueError):
    pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """A temp file beside `path` for the caller to write (by name); when the block ends without an
    error it is flushed to disk and renamed over `path`, else removed. A reader sees the old file or
    the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 is for secrets; these are ordinary files
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def file_sha256(file: str | Path) -> str:
    """The SHA-256 of a file, read a megabyte at a time."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, flush it to disk, then rename it over `path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors for safetensors: contiguous, and a tied lm_head stored once (as tok_emb)."""
    return state_for_saving(model, None)


def state_for_saving(model: torch.nn.Module, state: dict | None) -> dict[str, torch.Tensor]:
    tied = model.config.tie_embeddings
    state = model.state_dict() if state is None else state
    return {k: v.detach().cpu().contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")}


def save_checkpoint(folder: str | Path, model, tokenizer, trainer_state: dict | None = None,
                    optimizer_state: dict | None = None, model_state: dict | None = None,
                    adapter: dict | None = None) -> Path:
    """Write a complete checkpoint folder at `folder`, atomically replacing any older one there.
    `model_state` overrides the model's own state dict (the gathered one of a sharded model).
    `adapter` (lora.adapter_record): a LoRA checkpoint, holding the adapters only."""
    if is_quantized(model):
        raise CheckpointError("this model has int8 weights, for inference only; save the float model "
                              "(--quantize applies when loading)")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
    try:
        tmp.chmod(0o777 & ~_umask())
        if adapter is None:
            save_file(state_for_saving(model, model_state), str(tmp / WEIGHTS), metadata={"format": "pt"})
        else:
            save_adapter_files(tmp, adapter, adapter_state(model, model_state))
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer.hf.to_str(pretty=True))
            if tokenizer.chat_template is not None:  # and the chat template, where HF keeps it
                (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer.hf_config(), indent=2) + "\n")
        if trainer_state is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        old = None
        if folder.exists():
            old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
        _fsync_dir(folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def remove_checkpoint(folder: Path) -> None:
    """Rename, then delete: a crash mid-way leaves a hidden folder, never a half-deleted checkpoint."""
    trash = folder.with_name(f".del-{folder.name}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale_temp_folders(run: str | Path) -> None:
    """Leftovers of a crash during a save or a prune."""
    root = Path(run) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-", ".del-")):
                shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(run: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temp folders of a crashed save are ignored)."""
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and is_checkpoint(p)]
    return sorted(found, key=lambda p: p.name)


def is_checkpoint(folder: Path) -> bool:
    """A folder of weights, or of a LoRA run's adapters."""
    return (folder / WEIGHTS).exists() or (folder / ADAPTER_CONFIG).exists()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from either itself or a run folder (then its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if is_checkpoint(path):
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path} holds no checkpoint ({WEIGHTS} or {CHECKPOINTS}/step-*)")
    return found[-1]


def load_weights(folder: str | Path, device="cpu") -> dict[str, torch.Tensor]:
    file = Path(folder) / WEIGHTS
    try:
        return load_file(str(file), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"cannot read weights {file}: {str(e).splitlines()[0]}") from None


def load_checkpoint_into(model, folder: str | Path, device="cpu") -> list[str]:
    """A checkpoint's weights into `model`: a full checkpoint's; or, for a LoRA checkpoint, its base's
    (refused when the base has changed), then LoRA put on the model and the adapters loaded.
    Returns the adapted modules' names ([] for a full checkpoint)."""
    if not is_adapter_checkpoint(folder):
        load_state_into(model, load_weights(folder, device), str(folder))
        return []
    lora, base, adapters = read_adapter(folder)
    load_state_into(model, load_weights(base, device), str(base))
    names = apply_lora(model, lora)
    load_adapter_state(model, adapters, str(folder))
    return names


def load_merged_into(model, folder: str | Path, device="cpu") -> None:
    """A checkpoint's weights into `model`, a LoRA checkpoint's adapters merged in: a plain model."""
    if load_checkpoint_into(model, folder, device):
        merge_lora(model)


def load_state_into(model, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    tied = model.config.tie_embeddings
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        what = (f"missing {', '.join(missing[:5])}" if missing else "") + \
               (f" unexpected {', '.join(unexpected[:5])}" if unexpected else "")
        raise CheckpointError(f"{source} does not match the model config: {what.strip()}")


def load_optimizer_state(folder: str | Path) -> dict | None:
    file = Path(folder) / "optimizer.pt"
    if not file.exists():
        return None
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"cannot read optimizer state {file}: {str(e).splitlines()[0]}") from None


def read_json(file: str | Path, what: str) -> dict:
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{what} {file} is missing") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {what} {file}: {e}") from None
