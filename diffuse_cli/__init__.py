"""diffuse: train a denoising diffusion model on a folder of images and sample from it."""

__version__ = "0.1.0"
