"""What two runs of the same weights on different memory promise, for tests that compare them.

The weights are equal bit for bit (asserted separately); their outputs are not: CPU kernels pick code paths and
reduction orders by memory layout, alignment and the CPU's vector width, so results agree to about 1e-6 relative,
not exactly. Through a few sampler steps and the VAE that is far below one 8-bit level, so a pixel can only round
the other way: at most one level, on a small share of the values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def pixels(result: Any) -> np.ndarray:
    """The images of a GenerationResult as one int16 array (differences do not wrap around)."""
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def assert_images_close(got: np.ndarray, want: np.ndarray, *, share: float = 0.01) -> None:
    assert got.shape == want.shape
    diff = np.abs(got - want)
    assert int(diff.max()) <= 1, f"a pixel differs by {int(diff.max())} levels"
    assert float((diff > 0).mean()) <= share, f"{float((diff > 0).mean()):.2%} of the values differ"


def assert_outputs_close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def assert_owned_weights(module: torch.nn.Module) -> None:
    """The load guarantee that makes kernels see the same layout whatever file the weights came from."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        assert tensor.untyped_storage().resizable(), f"{name} is backed by memory torch did not allocate"
        assert tensor.data_ptr() % 64 == 0, f"{name} is not 64-byte aligned"
