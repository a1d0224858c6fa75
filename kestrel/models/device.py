"""Device selection: the GPU when one is present, the CPU otherwise.

Every model and index asks here instead of hard-coding ``cuda``, so the same
code runs on a laptop, in CI (no GPU) and on a GPU host.
"""

from __future__ import annotations

import os

import torch


def pick_device(prefer: str | None = None) -> torch.device:
    """``KESTREL_DEVICE`` or ``prefer`` when set ("cpu", "cuda", "cuda:1"), else CUDA if available.

    >>> pick_device("cpu").type
    'cpu'
    """
    wanted = prefer or os.environ.get("KESTREL_DEVICE")
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def faiss_gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees a GPU (faiss-gpu on a GPU host)."""
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a dependency
        return False
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return bool(get_num_gpus and get_num_gpus() > 0)
