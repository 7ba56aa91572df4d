"""Files on disk: our checkpoint (safetensors, its config in the header), diffusers' folders in and out, and
atomic writes."""
