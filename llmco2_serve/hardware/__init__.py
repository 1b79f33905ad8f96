"""GPUs: the spec table (gpus.py), which physical devices an engine core owns (devices.py), and the energy-counter
readers (gpu_energy.py: NVML, the CPU estimate, and the fakes tests use)."""
