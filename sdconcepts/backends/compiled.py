"""The UNet run through ``torch.compile`` for training and sampling, falling back to eager with one line.

``compiled_unet(unet)`` gives a ``CompiledUnet``, called like the UNet. There is one per UNet for the process, so a
second training run or generation reuses what was compiled; across processes Inductor's own on-disk caches (on by
default in torch >= 2.4, under ``TORCHINDUCTOR_CACHE_DIR``) shorten the next start. Before the UNet it compiles a
one-line function on the UNet's device, so a machine that cannot compile (no C++ compiler for the CPU backend, a
torch or Python that dynamo does not support) is found in seconds, not after minutes of tracing; then, and when the
compiled call itself fails, the UNet runs eagerly and ``fallback`` says why, in one line that the caller shows (a
training run's first step event, txt2img's warnings).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any

import torch

__all__ = ["CompiledUnet", "compile_problem", "compiled_unet"]

log = logging.getLogger(__name__)

_problems: dict[str, str | None] = {}
_unets: weakref.WeakKeyDictionary[torch.nn.Module, CompiledUnet] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_unets_lock = threading.Lock()  # one wrapper per UNet when the web UI's training and generation threads ask at once


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _probe(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def compile_problem(device: torch.device | str) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here (one line), or None when it can; tried once per device
    type and process."""
    kind = torch.device(device).type
    with _lock:
        if kind in _problems:
            return _problems[kind]
        problem: str | None = None
        if not hasattr(torch, "compile"):
            problem = f"torch {torch.__version__} has no torch.compile"
        else:
            try:
                import torch._dynamo.eval_frame as dynamo  # lazy: the compiler stack loads only when compiling is asked for

                if not dynamo.is_dynamo_supported():
                    problem = f"torch.compile does not support this Python or torch ({torch.__version__})"
                else:
                    probe = torch.compile(_probe, dynamic=False, fullgraph=True)
                    probe(torch.ones(4, device=device))
            except Exception as exc:  # noqa: BLE001 - whatever stops compiling means: run eagerly, say why
                problem = _first_line(exc)
        _problems[kind] = problem
        return problem


class CompiledUnet:
    """The UNet's call through ``torch.compile``, or eager when it cannot compile (``fallback`` says why).

    ``first_call_s``: the wall seconds of the first compiled call (tracing and compiling the forward pass included;
    a training step's backward pass is compiled at its first backward).
    """

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.fallback: str | None = None
        self.first_call_s: float | None = None
        self.compiled: Any = None
        device = next(unet.parameters()).device
        problem = compile_problem(device)
        if problem is not None:
            self._fall_back(f"this machine cannot compile ({problem})")
        else:
            self.compiled = torch.compile(unet)

    def _fall_back(self, reason: str) -> None:
        self.compiled = None
        self.fallback = f"compiling the UNet failed, running it eagerly: {reason}"
        log.info("%s", self.fallback)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.unet(*args, **kwargs)
        start = time.perf_counter()
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a compiler failure: run eagerly (a real error raises again there)
            self._fall_back(_first_line(exc))
            return self.unet(*args, **kwargs)
        if self.first_call_s is None:
            self.first_call_s = time.perf_counter() - start
        return out


def compiled_unet(unet: torch.nn.Module) -> CompiledUnet:
    """The process's ``CompiledUnet`` for ``unet`` (made on first use)."""
    with _unets_lock:
        found = _unets.get(unet)
        if found is None:
            found = _unets[unet] = CompiledUnet(unet)
        return found
