"""Third-party code shipped with gpujobd: NVIDIA's NVML bindings (nvidia-ml-py 13.615.71, BSD-3-Clause),
unmodified. gpujobd.gpu imports a system-wide pynvml first and falls back to this copy."""
