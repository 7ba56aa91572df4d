"""diffuse: train a denoising diffusion model on a folder of images and sample from it.

The Python API (api.py) is importable from here: `import diffuse_cli as diffuse; diffuse.train(...)`.
It is loaded on first use, so that `diffuse --help` does not wait for torch.
"""

from .version import __version__

# The API's names, listed once: api.py's __all__ is this list.
_API = ("Model", "TrainedModel", "load", "train", "distill", "posthoc_ema", "EmaChoice", "TrainOptions", "Hooks", "inspect", "prepare_device",
        "set_threads", "run_folder", "launch_plan", "SampleConfig", "SamplerChoice", "SampleHooks", "SampleRun", "sample_folder_name",
        "noise", "write_noise", "explore", "explorer_path", "write_explorer", "interpolate",
        "interpolation_folder_name", "import_diffusers", "export_diffusers", "evaluate", "EvalSettings", "Evaluation",
        "save_images", "save_grid", "save_strip", "save_png", "grid_upscale", "GRID_MAX", "Trajectory", "ImageData",
        "DiffuseError")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'diffuse_cli' has no attribute {name!r}")


__all__ = ["__version__", *_API]
