"""Choosing DeepSpeed's accelerator without importing torch: a GPU on the machine is not enough,
torch must be a CUDA build (``make`` installs the CPU wheel, also on machines with a GPU)."""

from __future__ import annotations

from pathlib import Path

import torch

from midtrain.runtime_env import _torch_built_with_cuda, names_a_cuda_version


def test_reads_the_build_from_torch_version_py() -> None:
    cuda_build = "__version__ = '2.11.0+cu130'\ncuda: Optional[str] = '13.0'\nhip = None\n"
    assert names_a_cuda_version(cuda_build)
    assert names_a_cuda_version("cuda = '12.4'\n")
    assert not names_a_cuda_version("__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\n")
    assert not names_a_cuda_version("__version__ = '2.13.0'\n")  # no cuda line at all


def test_agrees_with_the_installed_torch() -> None:
    installed = (Path(torch.__file__).parent / "version.py").read_text()
    assert names_a_cuda_version(installed) == (torch.version.cuda is not None)
    assert _torch_built_with_cuda() == (torch.version.cuda is not None)
