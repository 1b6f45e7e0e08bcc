"""Kernel ops (`tokenfleet.kernels`): one file per op, and the registry that maps an op's name to its Triton launcher,
torch reference, vendor baseline and counts (`registry.py`: `REGISTRY`, `KernelOp`, `rel_error`, re-exported here)."""

if __name__ == "kernels":
    # This folder is `tokenfleet.kernels`. Found as a top-level `kernels` (a checkout's root on sys.path: `python -m`
    # or `python -c` run there), it would shadow Hugging Face's `kernels`, which transformers 5 imports. The name goes
    # to the next `kernels` on sys.path, or fails as it would without this folder; nothing of ours runs under it.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    sys.modules[__name__] = importlib.util.module_from_spec(_spec)  # what the import statement returns
    _spec.loader.exec_module(sys.modules[__name__])
else:
    from tokenfleet.kernels.registry import REGISTRY, KernelOp, rel_error  # noqa: F401 - the package's interface
