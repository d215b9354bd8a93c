"""The UNet run through ``torch.compile`` for training and sampling, falling back to eager with one line.

``compiled_unet(unet)`` gives a ``CompiledUnet``, called like the UNet. There is one per UNet for the process, so a
second training run or generation reuses what was compiled; across processes Inductor's own on-disk caches (on by
default in torch >= 2.4, under ``TORCHINDUCTOR_CACHE_DIR``) shorten the next start. Before the UNet it compiles a
one-line function on the UNet's device, so a machine that cannot compile (no C++ compiler for the CPU backend, a
torch or Python that dynamo does not support) is found in seconds, not after minutes of tracing; then, and when the
compiled call itself fails, the UNet runs eagerly and ``fallback`` says why, in one line that the caller shows (a
training run's first step event, txt2img's warnings).

The backend is Inductor after a rewrite (``_inductor_with_matmul_convs``): on a CPU, convolutions with many output
channels on few positions run as one matrix product (``conv_as_matmul``); on CUDA it is plain Inductor. Plain
Inductor made an SD-1.5-shaped UNet's training step at 64 px slower than eager on a CPU (1.56x): its layout
optimisation runs the convolutions channels-last and so copies every convolution weight (2.2 GB of them in SD 1.5)
into that layout on each call, on top of the reorder oneDNN does itself; with the products (and without the layout
optimisation in their graphs) it took 0.55x eager (docs/training.md, "Compiled UNet").
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any

import torch

__all__ = ["CompiledUnet", "compile_problem", "compiled_unet", "conv_as_matmul"]

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


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def conv_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Any = 1,
                   padding: Any = 0, dilation: Any = 1) -> torch.Tensor:
    """``torch.conv2d`` (groups 1, numeric padding) as one matrix product: the weight, read as the (out channels,
    in channels x kernel) matrix it already is, times the input's unfolded patches of the whole batch.

    On a CPU this is what a convolution with many channels on a few positions wants: oneDNN reorders the whole weight
    into its blocked layout on every call (and again for the backward pass), a pass over memory that costs several
    times the arithmetic when the latent is 1x1 to 4x4 (an SD 1.5 UNet's inner blocks at 64 px); the product reads
    the weight once, as it is, for the forward pass and once for the input gradient (autograd: a product and col2im).
    """
    n = x.shape[0]
    out_channels, _, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    height = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    width = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = torch.nn.functional.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
    cols = cols.transpose(0, 1).reshape(cols.shape[1], n * height * width)  # (in x kernel, batch x positions)
    out = torch.mm(weight.reshape(out_channels, -1), cols)
    if bias is not None:
        out = out + bias[:, None]
    return out.reshape(out_channels, n, height, width).transpose(0, 1)


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _conv_args(node: torch.fx.Node) -> dict[str, Any]:
    """A dynamo graph's ``torch.conv2d`` call's arguments by name, defaults filled in."""
    args: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    args.update(zip(_CONV_ARGS, node.args, strict=False))
    args.update(node.kwargs)
    return args


def _shape(node: Any) -> tuple[int, ...] | None:
    """The sizes of the tensor at a graph node; a dynamic size (a second batch size makes dynamo compile the batch
    dimension dynamic) as its value at this compile, which only picks the faster of two exact ways."""
    value = getattr(node, "meta", {}).get("example_value")
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    try:
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return tuple(d if isinstance(d, int) else int(optimization_hint(d)) for d in shape)
    except Exception:  # noqa: BLE001 - a torch without it, or a size with no value: leave the convolution as it is
        return None if not all(isinstance(d, int) for d in shape) else tuple(shape)


def _ints(value: Any) -> bool:
    return isinstance(value, int) or (isinstance(value, (tuple, list)) and len(value) == 2
                                      and all(isinstance(v, int) for v in value))


def _matmul_pays(args: dict[str, Any]) -> bool:
    """Whether a convolution (``_conv_args``) is one for ``conv_as_matmul``: on a CPU, 2-D, groups 1, numeric
    stride, padding and dilation, and at most a fifth as many output positions (batch x height x width) as output
    channels. The bound is measured (one thread, forward and input gradient, 3x3 kernels, CPU time): the product
    took 0.4x the convolution's time at 1280 channels on 4x4 positions x batch 4, 0.78x at 640 channels on 64
    positions, 0.92x at 320 channels on 64, but 1.2-1.8x at 320 channels on 128-256 positions and at 128 channels or
    fewer on 64 or more."""
    device = getattr(getattr(args["weight"], "meta", {}).get("example_value"), "device", None)
    if getattr(device, "type", None) != "cpu":
        return False  # measured on CPU only (oneDNN's weight reorders); GPUs keep their convolutions
    x, weight = _shape(args["input"]), _shape(args["weight"])
    if x is None or weight is None or len(x) != 4 or len(weight) != 4 or args["groups"] != 1:
        return False
    if not all(_ints(args[name]) for name in ("stride", "padding", "dilation")):
        return False  # "same"/"valid" padding, or sizes computed in the graph
    (sh, sw), (ph, pw), (dh, dw) = _pair(args["stride"]), _pair(args["padding"]), _pair(args["dilation"])
    height = (x[2] + 2 * ph - dh * (weight[2] - 1) - 1) // sh + 1
    width = (x[3] + 2 * pw - dw * (weight[3] - 1) - 1) // sw + 1
    return x[0] * height * width * 5 <= weight[0]


def _inductor_with_matmul_convs(gm: torch.fx.GraphModule, example_inputs: Any) -> Any:
    """The torch.compile backend: Inductor, after the graph's convolutions that ``_matmul_pays`` picks call
    ``conv_as_matmul`` instead (traced through by AOTAutograd, so their backward is a product and col2im too)."""
    from torch._inductor.compile_fx import compile_fx  # lazy, as in compile_problem

    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.conv2d, torch.nn.functional.conv2d):
            continue
        args = _conv_args(node)
        if _matmul_pays(args):
            node.target, node.args = conv_as_matmul, ()
            node.kwargs = {"x": args["input"], **{k: args[k] for k in ("weight", "bias", "stride", "padding",
                                                                       "dilation")}}
            changed += 1
    if not changed:
        return compile_fx(gm, example_inputs)
    gm.recompile()
    log.info("compiling: %d convolutions as matrix products (conv_as_matmul)", changed)
    # Without Inductor's layout optimisation in such a graph: with it, the convolutions left make Inductor store the
    # 4-D tensors that the forward pass saves for the backward channels-last, and those include the products'
    # weights, so each was copied twice a step (a channels-last copy to save, a plain one for the product) and once
    # more in the backward: SD 1.5 at 64 px, batch 4, 1.08x eager with it, 0.55x without.
    return compile_fx(gm, example_inputs, config_patches={"layout_optimization": False})


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
            self.compiled = torch.compile(unet, backend=_inductor_with_matmul_convs)

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
