"""Saving and loading model checkpoints: safetensors weights plus a JSON config.

Nothing here unpickles: a checkpoint from an untrusted source can at worst fail to load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from featurestore.errors import CorruptCheckpointError

if TYPE_CHECKING:
    import torch

    from featurestore.model import Transformer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_checkpoint(model: Transformer, directory: Path, metadata: dict) -> None:
    """Write weights and config (model config plus `metadata`) into an existing directory."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE)
    config = {"model": model.config.to_dict(), **metadata}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))


def read_checkpoint_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"checkpoint config {path} is missing; re-create the checkpoint (re-run the job that "
            "trained it)."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptCheckpointError(
            f"checkpoint config {path} is not valid JSON ({error}); re-create the checkpoint."
        ) from None
    if not isinstance(config, dict) or "model" not in config:
        raise CorruptCheckpointError(f"checkpoint config {path} has no 'model' section")
    return config


def check_finite_weights(module: torch.nn.Module, directory: Path) -> None:
    """Refuse a checkpoint whose weights hold NaN or Inf: every output of the model, and every
    update trained from it, would be NaN."""
    import torch

    bad = [name for name, tensor in module.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise CorruptCheckpointError(
            f"checkpoint {directory} has NaN/Inf weights (in {', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); use another checkpoint, or re-run the job that "
            "trained it")


def load_checkpoint(directory: Path) -> Transformer:
    """The demo Transformer stored in `directory`, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from featurestore.model import ModelConfig, Transformer

    config = read_checkpoint_config(directory)
    model = Transformer(ModelConfig.from_dict(config["model"]))
    path = directory / WEIGHTS_FILE
    try:
        state = load_file(path)
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"checkpoint weights {path} are missing; re-run the job that trained the run."
        ) from None
    except (SafetensorError, OSError, ValueError) as error:
        raise CorruptCheckpointError(
            f"checkpoint weights {path} are corrupted or not a safetensors file ({error}); "
            "re-run the job that trained the run to re-create it."
        ) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CorruptCheckpointError(
            f"checkpoint weights {path} do not match its config {directory / CONFIG_FILE}: "
            f"{error}"
        ) from None
    return model.eval()
