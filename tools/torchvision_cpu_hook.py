"""Lets a CUDA-only torchvision wheel import next to a CPU-only torch.

PyPI has no CPU build of torchvision for Linux. Its compiled extension cannot load against a CPU
torch, and torchvision then dies at import time registering fake kernels for `torchvision::nms`.
Because transformers, peft, timm, open_clip and the accelerate CLI all import torchvision when it
is installed, that one failure takes the whole stack down.

`tools/install.sh` copies this file into the virtual environment's site-packages together with a
`.pth` line that imports it. It imports nothing at interpreter start. On the first
`import torchvision`, and only if the extension does not load, it declares the two operator
schemas torchvision's Python code expects. Where the extension loads (a CUDA torch, a real CPU
build) it changes nothing. Only torchvision's C++ ops (nms, image decoding) stay unavailable; this
project uses PIL for decoding and never calls them.
"""

import contextlib
import importlib.abc
import importlib.machinery
import sys

_library = None  # must stay referenced, or the declared schemas go away


def _declare_missing_ops(package_dir):
    global _library
    import glob
    import os

    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018 - probing whether the op exists
        return
    except (AttributeError, RuntimeError):
        pass
    for path in glob.glob(os.path.join(package_dir, "_C*.so")):
        try:
            torch.ops.load_library(path)
            return
        except (OSError, RuntimeError):
            pass
    _library = torch.library.Library("torchvision", "DEF")
    _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


class _Loader(importlib.abc.Loader):
    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def create_module(self, spec):
        return self._real.create_module(spec)

    def exec_module(self, module):
        import os

        # Never make torchvision's import worse than it was: any failure here is ignored.
        with contextlib.suppress(Exception):
            _declare_missing_ops(os.path.dirname(module.__spec__.origin))
        self._real.exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
    # Stays installed: transformers asks importlib.util.find_spec("torchvision") before importing.
    def find_spec(self, name, path, target=None):
        if name != "torchvision":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
