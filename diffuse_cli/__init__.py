"""diffuse: train a denoising diffusion model on a folder of images and sample from it.

The Python API (api.py) is importable from here: `import diffuse_cli as diffuse; diffuse.train(...)`.
It is loaded on first use, so that `diffuse --help` does not wait for torch.
"""

__version__ = "0.1.0"

_API = ("Model", "load", "train", "noise", "explore", "interpolate", "import_diffusers", "export_diffusers",
        "write_explorer", "save_images", "save_grid", "save_strip", "Trajectory", "Hooks", "SampleConfig",
        "SamplerChoice", "ImageData", "DiffuseError", "set_threads", "inspect", "evaluate")


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'diffuse_cli' has no attribute {name!r}")


__all__ = ["__version__", *_API]
