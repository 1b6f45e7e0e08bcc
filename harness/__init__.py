"""tokenfleet: device, timing, ceilings, runs, the model, capacity and reports (the harness/ folder), and the kernel
ops as `tokenfleet.kernels` (the kernels/ folder). One import package, no generic top-level names (pyproject.toml)."""
