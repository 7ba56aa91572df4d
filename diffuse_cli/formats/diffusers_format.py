"""diffusers' folder layout, in and out, exactly: a `UNet2DModel` with its DDPM/DDIM scheduler config <-> our U-Net.

    folder/model_index.json                           what a DDPMPipeline loads
    folder/unet/config.json                           UNet2DModel's arguments
    folder/unet/diffusion_pytorch_model.safetensors   its weights
    folder/scheduler/scheduler_config.json            β schedule, T, prediction type

| diffusers (UNet2DModel)              | here (ModelConfig / DiffusionConfig)                         |
|--------------------------------------|--------------------------------------------------------------|
| block_out_channels                   | base_channels × channel_mult                                 |
| layers_per_block                     | num_res_blocks                                               |
| AttnDownBlock2D at level i           | attention_resolutions ∋ image_size / 2^i                     |
| attention_head_dim (None: one head)  | head_channels (None: the widest level's channels)            |
| norm_eps, freq_shift, flip_sin_to_cos, downsample_padding | norm_eps, time_freq_shift, time_cos_first, downsample_padding |
| num_class_embeds                     | len(class_names) + 1 (the last: "no class")                  |
| beta_schedule linear / squaredcos_cap_v2 / trained_betas | schedule linear / cosine / any, by its betas     |
| prediction_type epsilon / sample / v_prediction | objective eps / x0 / v                            |

Nothing here imports diffusers: the folder is JSON and safetensors. A config our U-Net cannot represent
exactly is refused, naming the field and its value; it is never approximated.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from ..config import Config, DiffusionConfig, from_dict, MAX_TIMESTEPS, ModelConfig, to_dict, TrainConfig, validate_model
from ..presets import model_config, PRESETS
from ..errors import CheckpointError, ConfigError, DiffuseError, UsageError
from .checkpoint import read_header
from .files import atomic_folder, atomic_write_bytes
from ..diffusion.schedule import BETAS
from ..network.unet import UNet, group_norm

WEIGHTS = "diffusion_pytorch_model.safetensors"
OURS = "diffuse_config.json"  # our config beside an export (class names, preset): diffusers ignores it
OBJECTIVES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
DIFFUSERS_VERSION = "0.27.0"  # the oldest version whose UNet2DModel reads every key written here


# -- the modules that correspond ------------------------------------------------------------------
def _pairs(cfg: ModelConfig) -> list[tuple[str, str, str]]:
    """(our module, diffusers' module, kind) for every module with weights, kind: plain, res or attn."""
    pairs = [("time_mlp.0", "time_embedding.linear_1", "plain"), ("time_mlp.2", "time_embedding.linear_2", "plain"),
             ("conv_in", "conv_in", "plain")]
    levels, res, k = len(cfg.channel_mult), cfg.image_size, 0
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            pairs.append((f"down.{k}.res", f"down_blocks.{i}.resnets.{j}", "res"))
            if res in cfg.attention_resolutions:
                pairs.append((f"down.{k}.attn", f"down_blocks.{i}.attentions.{j}", "attn"))
            k += 1
        if i < levels - 1:
            pairs.append((f"down.{k}.conv", f"down_blocks.{i}.downsamplers.0.conv", "plain"))
            k, res = k + 1, res // 2
    pairs += [("mid.0", "mid_block.resnets.0", "res"), ("mid.1", "mid_block.attentions.0", "attn"),
              ("mid.2", "mid_block.resnets.1", "res")]
    k = 0
    for u, i in enumerate(reversed(range(levels))):
        for j in range(cfg.num_res_blocks + 1):
            pairs.append((f"up.{k}.res", f"up_blocks.{u}.resnets.{j}", "res"))
            if res in cfg.attention_resolutions:
                pairs.append((f"up.{k}.attn", f"up_blocks.{u}.attentions.{j}", "attn"))
            k += 1
        if i > 0:
            pairs.append((f"up.{k}.conv", f"up_blocks.{u}.upsamplers.0.conv", "plain"))
            k, res = k + 1, res * 2
    pairs += [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    return pairs + ([("class_emb", "class_embedding", "plain")] if cfg.class_names else [])


RES = (("norm1", "norm1"), ("conv1", "conv1"), ("emb", "time_emb_proj"), ("norm2", "norm2"), ("conv2", "conv2"),
       ("skip", "conv_shortcut"))
ATTN_NAMES = {"new": ("group_norm", "to_q", "to_k", "to_v", "to_out.0"),
              "old": ("group_norm", "query", "key", "value", "proj_attn")}  # before diffusers 0.14


def to_ours(theirs: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """diffusers' UNet2DModel state dict -> ours, every tensor used once; CheckpointError naming what is off."""
    out, used = {}, set()

    def take(key: str) -> torch.Tensor:
        if key not in theirs:
            raise CheckpointError(f"the weights lack {key}, which the config's network has")
        used.add(key)
        return theirs[key]
    for ours, their, kind in _pairs(cfg):
        if kind == "plain":
            out |= {f"{ours}.{p}": take(f"{their}.{p}") for p in ("weight", "bias")
                    if p == "weight" or f"{their}.{p}" in theirs}  # an embedding has no bias
        elif kind == "res":
            for a, b in RES:
                if a != "skip" or f"{their}.{b}.weight" in theirs:
                    out |= {f"{ours}.{a}.{p}": take(f"{their}.{b}.{p}") for p in ("weight", "bias")}
        else:
            norm, q, k, v, proj = ATTN_NAMES["new" if f"{their}.to_q.weight" in theirs else "old"]
            out |= {f"{ours}.norm.{p}": take(f"{their}.{norm}.{p}") for p in ("weight", "bias")}
            out[f"{ours}.qkv.weight"] = torch.cat([take(f"{their}.{n}.weight") for n in (q, k, v)])[:, :, None, None]
            out[f"{ours}.qkv.bias"] = torch.cat([take(f"{their}.{n}.bias") for n in (q, k, v)])
            out[f"{ours}.proj.weight"] = take(f"{their}.{proj}.weight")[:, :, None, None]
            out[f"{ours}.proj.bias"] = take(f"{their}.{proj}.bias")
    if unused := sorted(set(theirs) - used):
        raise CheckpointError(f"{len(unused)} weights have no place in the network the config describes "
                              f"(e.g. {unused[0]}); not imported")
    return out


def to_diffusers(ours: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> diffusers' UNet2DModel names (current attention names), the inverse of to_ours."""
    out = {}
    for mine, their, kind in _pairs(cfg):
        if kind == "plain":
            out |= {f"{their}.{p}": ours[f"{mine}.{p}"] for p in ("weight", "bias") if f"{mine}.{p}" in ours}
        elif kind == "res":
            out |= {f"{their}.{b}.{p}": ours[f"{mine}.{a}.{p}"] for a, b in RES for p in ("weight", "bias")
                    if f"{mine}.{a}.{p}" in ours}
        else:
            norm, q, k, v, proj = ATTN_NAMES["new"]
            out |= {f"{their}.{norm}.{p}": ours[f"{mine}.norm.{p}"] for p in ("weight", "bias")}
            for n, w, b in zip((q, k, v), ours[f"{mine}.qkv.weight"][:, :, 0, 0].chunk(3), ours[f"{mine}.qkv.bias"].chunk(3)):
                out[f"{their}.{n}.weight"], out[f"{their}.{n}.bias"] = w, b
            out[f"{their}.{proj}.weight"] = ours[f"{mine}.proj.weight"][:, :, 0, 0]
            out[f"{their}.{proj}.bias"] = ours[f"{mine}.proj.bias"]
    return {k: v.contiguous() for k, v in out.items()}


# -- configs ------------------------------------------------------------------------------------
def model_config_from(c: dict[str, Any]) -> ModelConfig:
    """A UNet2DModel config.json as our ModelConfig, or CheckpointError naming the first field that has none."""
    def need(field: str, ok: bool, why: str = "") -> None:
        if not ok:
            raise CheckpointError(f"unet/config.json: {field} = {json.dumps(c.get(field))} has no exact counterpart in "
                                  f"diffuse's U-Net{why}; not imported")
    need("_class_name", c.get("_class_name", "UNet2DModel") == "UNet2DModel")
    for field, value in (("time_embedding_type", "positional"), ("act_fn", "silu"), ("center_input_sample", False),
                         ("mid_block_type", "UNetMidBlock2D"), ("mid_block_scale_factor", 1), ("add_attention", True),
                         ("resnet_time_scale_shift", "default"), ("downsample_type", "conv"), ("upsample_type", "conv"),
                         ("class_embed_type", None), ("attn_norm_num_groups", None), ("norm_num_groups", 32)):
        need(field, c.get(field, value) == value)
    boc, size = list(c.get("block_out_channels", (224, 448, 672, 896))), c.get("sample_size")
    size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
    need("sample_size", isinstance(size, int))
    need("in_channels", c.get("in_channels", 3) in (1, 3) and c.get("in_channels", 3) == c.get("out_channels", 3),
         " (in and out must be the same 1 or 3 image channels)")
    need("block_out_channels", all(ch % 32 == 0 and ch % boc[0] == 0 for ch in boc),
         " (each a multiple of the first, and of the 32 GroupNorm groups)")
    down = list(c.get("down_block_types", ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")))
    up = list(c.get("up_block_types", ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")))
    need("down_block_types", set(down) <= {"DownBlock2D", "AttnDownBlock2D"} and len(down) == len(boc))
    need("up_block_types", [t.replace("Up", "Down") for t in reversed(up)] == down,
         " (they must mirror down_block_types)")
    need("time_embedding_dim", c.get("time_embedding_dim") in (None, 4 * boc[0]))
    need("downsample_padding", c.get("downsample_padding", 1) in (0, 1))
    head_dim = c.get("attention_head_dim", 8)
    attn_levels = [i for i, t in enumerate(down) if t == "AttnDownBlock2D"]
    need("attention_head_dim", head_dim is None or all(boc[i] % head_dim == 0 for i in attn_levels + [len(boc) - 1]))
    need("num_class_embeds", c.get("num_class_embeds") is None, " (a class-conditional model from elsewhere has no "
         "class names and no 'no class' entry)")
    cfg = ModelConfig(image_size=size, channels=c.get("in_channels", 3), base_channels=boc[0],
                      channel_mult=tuple(ch // boc[0] for ch in boc), num_res_blocks=c.get("layers_per_block", 2),
                      attention_resolutions=tuple(size // 2 ** i for i in attn_levels),
                      head_channels=max(boc) if head_dim is None else head_dim, dropout=float(c.get("dropout", 0.0)),
                      norm_eps=float(c.get("norm_eps", 1e-5)), time_freq_shift=float(c.get("freq_shift", 0)),
                      time_cos_first=bool(c.get("flip_sin_to_cos", True)),
                      downsample_padding=c.get("downsample_padding", 1))
    return validate_model(cfg)


def unet_config_of(cfg: ModelConfig) -> dict[str, Any]:
    """Our ModelConfig as UNet2DModel's config.json, or UsageError when diffusers cannot express it."""
    channels = [cfg.base_channels * m for m in cfg.channel_mult]
    groups = {group_norm(ch, cfg.norm_group_min).num_groups for ch in channels}
    if groups != {32}:
        raise UsageError(f"this model's GroupNorms have {' and '.join(map(str, sorted(groups)))} groups (its "
                         f"{', '.join(map(str, channels))} channels); diffusers' UNet2DModel has one count for every "
                         "layer, 32: export a model whose channels are multiples of 32 (e.g. {preset} base, at 32x32 "
                         "or more)", "preset")
    attn = [cfg.image_size // 2 ** i in cfg.attention_resolutions for i in range(len(channels))]
    attending = {ch for ch, a in zip(channels, attn) if a} | {channels[-1]}  # the middle block attends too
    one_head = all(ch <= cfg.head_channels for ch in attending)
    if not one_head and any(ch < cfg.head_channels or ch % cfg.head_channels for ch in attending):
        raise UsageError(f"head_channels {cfg.head_channels} gives some attention layers ({', '.join(map(str, sorted(attending)))}"
                         " channels) one head and others several; diffusers' one attention_head_dim cannot express it")
    return {"_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, "sample_size": cfg.image_size,
            "in_channels": cfg.channels, "out_channels": cfg.channels, "center_input_sample": False,
            "time_embedding_type": "positional", "freq_shift": cfg.time_freq_shift, "flip_sin_to_cos": cfg.time_cos_first,
            "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
            "block_out_channels": channels, "layers_per_block": cfg.num_res_blocks, "mid_block_scale_factor": 1,
            "downsample_padding": cfg.downsample_padding, "dropout": cfg.dropout, "act_fn": "silu",
            "attention_head_dim": None if one_head else cfg.head_channels, "norm_num_groups": 32,
            "norm_eps": cfg.norm_eps, "resnet_time_scale_shift": "default", "add_attention": True,
            "num_class_embeds": len(cfg.class_names) + 1 if cfg.class_names else None}


def diffusion_config_from(s: dict[str, Any]) -> DiffusionConfig:
    """A DDPM/DDIM scheduler_config.json as our DiffusionConfig: the schedule whose betas it gives, exactly."""
    T = s.get("num_train_timesteps", 1000)
    if type(T) is not int or not 2 <= T <= MAX_TIMESTEPS:
        raise CheckpointError(f"scheduler_config.json: num_train_timesteps = {json.dumps(T)[:40]} is not a count from 2 "
                              f"to {MAX_TIMESTEPS:,}; not imported")
    if (kind := s.get("prediction_type", "epsilon")) not in OBJECTIVES:
        raise CheckpointError(f"scheduler_config.json: prediction_type = {json.dumps(kind)} is not one of "
                              f"{', '.join(OBJECTIVES)}; not imported")
    if s.get("rescale_betas_zero_snr"):
        raise CheckpointError("scheduler_config.json: rescale_betas_zero_snr = true has no counterpart here; not imported")
    betas = scheduler_betas(s, T)
    for name, make in BETAS.items():
        if torch.allclose(make(T), betas, rtol=1e-5, atol=1e-9):
            return DiffusionConfig(schedule=name, timesteps=T, objective=OBJECTIVES[kind])
    described = s.get("beta_schedule") if s.get("trained_betas") is None else "trained_betas"
    raise CheckpointError(f"scheduler_config.json: beta_schedule = {json.dumps(described)} (beta_start "
                          f"{s.get('beta_start')}, beta_end {s.get('beta_end')}) is none of diffuse's schedules "
                          f"({', '.join(BETAS)}); not imported")


def scheduler_betas(s: dict[str, Any], T: int) -> torch.Tensor:
    """The betas a diffusers scheduler config describes (as DDPMScheduler makes them), in float64."""
    if s.get("trained_betas") is not None:
        return torch.tensor(s["trained_betas"], dtype=torch.float64)
    kind, start, end = s.get("beta_schedule", "linear"), s.get("beta_start", 1e-4), s.get("beta_end", 0.02)
    if kind == "linear":
        return torch.linspace(start, end, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(start ** 0.5, end ** 0.5, T, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        return BETAS["cosine"](T)
    raise CheckpointError(f"scheduler_config.json: beta_schedule = {json.dumps(kind)} is none of diffuse's schedules; "
                          "not imported")


def scheduler_config_of(d: DiffusionConfig) -> dict[str, Any]:
    """Our DiffusionConfig as DDPMScheduler's config: named where diffusers has our schedule, else its betas; a
    model trained with EDM's preconditioning (whose input diffusers' pipelines do not scale) is refused."""
    if d.objective == "edm":
        raise UsageError("this model is trained with EDM's preconditioning (objective edm), which no diffusers "
                         "scheduler applies; it is not exported")
    scale = 1000 / d.timesteps
    schedule = {"linear": {"beta_schedule": "linear", "beta_start": scale * 1e-4, "beta_end": scale * 0.02},
                "cosine": {"beta_schedule": "squaredcos_cap_v2"}}.get(d.schedule) or \
        {"beta_schedule": "linear", "trained_betas": BETAS[d.schedule](d.timesteps).tolist()}
    return {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "num_train_timesteps": d.timesteps, **schedule, "variance_type": "fixed_small", "clip_sample": True,
            "prediction_type": {v: k for k, v in OBJECTIVES.items()}[d.objective]}


# -- folders ------------------------------------------------------------------------------------
def read_folder(folder: str | os.PathLike) -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """A diffusers pipeline folder (or its unet/ folder) as (our UNet, config, info)."""
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"{root}: {'no such folder' if not root.exists() else 'not a folder'}; give a diffusers "
                         "folder (with unet/config.json)")
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    config_file, weights = unet_dir / "config.json", unet_dir / WEIGHTS
    if not config_file.is_file():
        raise CheckpointError(f"{root}: no unet/config.json; not a diffusers UNet2DModel folder")
    if not weights.is_file():
        if (unet_dir / "diffusion_pytorch_model.bin").is_file():
            raise CheckpointError(f"{unet_dir}: only diffusion_pytorch_model.bin, in torch.save's format, which runs "
                                  "code as it loads and which diffuse never loads; convert it once, where you trust the "
                                  "file: python -c \"from diffusers "
                                  f"import UNet2DModel as U; U.from_pretrained('{unet_dir}').save_pretrained('{unet_dir}', "
                                  "safe_serialization=True)\"")
        raise CheckpointError(f"{unet_dir}: no {WEIGHTS}")
    scheduler = next((p for p in (root / "scheduler" / "scheduler_config.json",
                                  unet_dir.parent / "scheduler" / "scheduler_config.json") if p.is_file()), None)
    if scheduler is None:
        raise CheckpointError(f"{root}: no scheduler/scheduler_config.json, so the noise schedule the model was trained "
                              "with is unknown; not imported")
    unet_cfg, sched_cfg = _json_object(config_file), _json_object(scheduler)
    ours = _our_export(root)  # (config, info) of our own export, else None
    classes = len(ours[0].model.class_names) if ours else 0
    if ours and unet_cfg.get("num_class_embeds") == (classes + 1 if classes else None):
        unet_cfg = {**unet_cfg, "num_class_embeds": None}  # ours, with its names and its "no class"
    try:  # refused here, before gigabytes of weights are read
        model_cfg, diffusion = model_config_from(unet_cfg), diffusion_config_from(sched_cfg)
    except DiffuseError:
        raise
    except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError, RuntimeError) as e:  # a field of the
        # wrong type or out of any sensible range (torch refuses a size that overflows with RuntimeError)
        raise CheckpointError(f"{root}: a config field cannot be read ({e}); not imported") from None
    config = Config(model=model_cfg, diffusion=diffusion, train=TrainConfig(), preset=_preset_of(model_cfg))
    info: dict[str, Any] = {}
    if ours:  # our config, class names and all, if it describes the same network
        saved, info = ours
        kept = {k: getattr(saved.model, k) for k in ("class_names", "head_channels", "norm_group_min",
                                                     "attention_resolutions")}
        same_attention = set(_occurring_attention(saved.model)) == set(model_cfg.attention_resolutions)
        if saved.diffusion != config.diffusion or replace(model_cfg, **kept) != saved.model or not same_attention:
            raise CheckpointError(f"{root}: {OURS} and the diffusers configs describe different models; not imported")
        config = saved
    read_header(weights)  # its tensor table checked against the file before anything is read or allocated
    try:
        tensors = load_file(weights)
    except Exception as e:  # safetensors raises its own error type on corrupt data
        raise CheckpointError(f"{root}: cannot read {weights.name} ({str(e).splitlines()[0]})") from None
    net = UNet(config.model)
    state = to_ours({k: v.float() for k, v in tensors.items()}, config.model)
    missing = set(net.state_dict()) - set(state)
    if missing:
        raise CheckpointError(f"{root}: the weights lack {sorted(missing)[0]}; not imported")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{root}: the weights do not fit the config ({str(e).splitlines()[-1].strip()})") from None
    source = {"imported_from": str(root.resolve()), "imported_format": f"diffusers {unet_cfg.get('_diffusers_version', '?')}"}
    return net.eval(), config, {**info, **source, "step": info.get("step", "?")}


def _json_object(path: Path) -> dict[str, Any]:
    """A config file's JSON object, or CheckpointError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # (RecursionError: nested past Python's limit)
        raise CheckpointError(f"{path}: cannot read it as JSON ({str(e).splitlines()[0]}); not imported") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object; not imported")
    return data


def _our_export(root: Path) -> tuple[Config, dict[str, Any]] | None:
    """The config and info that our export wrote beside the diffusers files (OURS), None where there is none."""
    if not (root / OURS).is_file():
        return None
    saved = _json_object(root / OURS)
    try:
        config, info = from_dict(Config, saved["config"]), dict(saved.get("info", {}))
        validate_model(config.model)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{root / OURS}: not a config diffuse wrote ({e}); remove it to import the diffusers "
                              "files alone") from None
    return config, info


def _occurring_attention(cfg: ModelConfig) -> tuple[int, ...]:
    """The attention resolutions a network has layers at: those among its levels' sizes. A preset may name one that
    never occurs at a small image size (tiny's 4x4 at 16 px), and diffusers' config, which lists layers, cannot."""
    sizes = {cfg.image_size >> level for level in range(len(cfg.channel_mult))}
    return tuple(r for r in cfg.attention_resolutions if r in sizes)


def _preset_of(cfg: ModelConfig) -> str:
    """The preset an imported network's shape matches at its image size, else 'imported'."""
    shape = ("base_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "head_channels",
             "norm_group_min")
    for name in PRESETS:
        try:
            preset = model_config(name, image_size=cfg.image_size)
        except ConfigError:  # a size the scaled presets cannot take
            continue
        if all(getattr(cfg, k) == getattr(preset, k) for k in shape):
            return name
    return "imported"


def write_folder(net: torch.nn.Module, config: Config, info: dict[str, Any], folder: str | os.PathLike) -> Path:
    """Write a diffusers pipeline folder that DDPMPipeline.from_pretrained loads (a distilled student: DDIMPipeline,
    sampled with num_inference_steps = its steps and eta 0); each file atomically."""
    folder = Path(folder)
    unet_cfg, sched_cfg = unet_config_of(config.model), scheduler_config_of(config.diffusion)  # refuse before writing
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UsageError(f"{folder} exists and is not an empty folder; name a new one")
    tensors = to_diffusers({k: v.detach().cpu() for k, v in net.state_dict().items()}, config.model)
    pipeline, scheduler = "DDPMPipeline", "DDPMScheduler"
    if config.distill is not None:  # a student samples by DDIM at its trailing steps, into the clean image, unclipped
        pipeline, scheduler = "DDIMPipeline", "DDIMScheduler"
        sched_cfg = {k: v for k, v in sched_cfg.items() if k != "variance_type"}
        sched_cfg |= {"_class_name": scheduler, "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0,
                      "timestep_spacing": "trailing"}
    index = {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION,
             "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", scheduler]}
    with atomic_folder(folder) as partial:  # never a half folder that diffusers would load
        (partial / "unet").mkdir()
        (partial / "scheduler").mkdir()
        atomic_write_bytes(partial / "unet" / WEIGHTS, save(tensors, metadata={"format": "pt"}))
        for path, data in ((partial / "unet" / "config.json", unet_cfg),
                           (partial / "scheduler" / "scheduler_config.json", sched_cfg),
                           (partial / "model_index.json", index), (partial / OURS, {"config": to_dict(config), "info": info})):
            atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())
    return folder
