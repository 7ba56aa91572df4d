"""`train --from`: a new run from a trained model's weights (EDM's transfer): its network and forward process, the
default optimisation, and the class embedding the data needs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from ..config import Config, TrainConfig
from ..errors import UsageError
from ..formats.checkpoint import load_model


def starting_weights(source: Path) -> tuple[Config, dict[str, torch.Tensor], tuple[str, ...]]:
    """(the config a run from this model starts with, its weights, its classes): its network and forward process,
    the default optimisation, and no classes yet (with_classes gives the data's)."""
    net, config, _ = load_model(source)
    if config.distill is not None:
        raise UsageError(f"{source} is a distilled student; start from its teacher ({config.distill.teacher})")
    return Config(preset=config.preset, model=replace(config.model, class_names=()), diffusion=config.diffusion,
                  train=TrainConfig()), net.state_dict(), config.model.class_names


def with_class_embedding(weights: dict[str, torch.Tensor], had: tuple[str, ...], config: Config,
                         log: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """The starting weights for the run's classes: the model's class embedding where its classes (`had`) are the
    data's; else none (the data has no classes) or a new one, zero, so that the network starts as the model was."""
    has = config.model.class_names
    if had == has:
        return weights
    weights = {k: v for k, v in weights.items() if not k.startswith("class_emb.")}
    if has:
        from ..network.unet import UNet

        with torch.device("meta"):
            shape = UNet(config.model).class_emb.weight.shape
        weights["class_emb.weight"] = torch.zeros(shape)
        log(f"note: a new class embedding for the data's {len(has)} classes" +
            (f" (the model's were {', '.join(had)})" if had else ""))
    else:
        log("note: the data has no classes: the model's class embedding is left out")
    return weights
