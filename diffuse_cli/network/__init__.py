"""The network and what runs it: the U-Net, the fused operations and CUDA graphs that make it fast, the device and
its precision, and the CPU threads it gets on a shared machine."""
