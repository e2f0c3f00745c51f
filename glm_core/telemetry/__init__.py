"""Memory figures: NVML (GPUs), the CUDA allocator and the host."""
