"""The training objective: the denoising loss of latent diffusion, as a pure function of a model port and a batch.

It is ldm's ``p_losses`` (what A1111 trains with, a1111-compat §4.7): a uniform timestep in [0, T), Gaussian noise,
the UNet's prediction against the noise (or against v for v-prediction models), mean squared error; with loss weights
(PNG alpha) the unreduced error is weighted before the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from sdconcepts.training.dataset import TrainingBatch

__all__ = ["DiffusionModel", "denoising_error", "diffusion_loss"]


class DiffusionModel(Protocol):
    """The port the objective needs; ``sdconcepts.training.training_model`` adapts the diffusers backend to it."""

    @property
    def alphas_cumprod(self) -> Tensor:
        """The noise schedule's cumulative alpha products ``[T]`` (float64 or float32, on the CPU)."""
        ...

    @property
    def prediction_type(self) -> str:
        """``epsilon`` or ``v_prediction``."""
        ...

    @property
    def device(self) -> torch.device: ...

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Conditioning ``[B, tokens, width]`` for ``texts``; gradients reach whatever is being trained."""
        ...

    def predict(self, noisy: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        """The UNet's output for noisy latents at ``timesteps`` under ``context``."""
        ...


def diffusion_loss(model: DiffusionModel, batch: TrainingBatch, generator: torch.Generator) -> Tensor:
    """Mean squared denoising error of ``batch``; the timesteps and noise come from the CPU ``generator``."""
    count = batch.latents.shape[0]
    timesteps = torch.randint(0, model.alphas_cumprod.shape[0], (count,), generator=generator)
    noise = torch.randn(batch.latents.shape, generator=generator, dtype=torch.float32)
    return denoising_error(model, batch, timesteps, noise)


def denoising_error(model: DiffusionModel, batch: TrainingBatch, timesteps: Tensor, noise: Tensor) -> Tensor:
    """Mean squared denoising error of ``batch`` at the given ``timesteps`` (CPU, long) with the given ``noise``
    (CPU, float32, shaped like the latents): the loss itself, and with fixed inputs the validation loss."""
    latents = batch.latents
    alphas = model.alphas_cumprod
    shape = (latents.shape[0],) + (1,) * (latents.dim() - 1)
    alpha = alphas[timesteps].to(torch.float32).reshape(shape)
    signal, sigma = alpha.sqrt(), (1 - alpha).sqrt()
    latents = latents.to(torch.float32)
    noisy = signal * latents + sigma * noise
    if model.prediction_type == "v_prediction":
        target = signal * noise - sigma * latents
    else:
        target = noise
    device = model.device
    context = model.encode_text(batch.texts)
    prediction = model.predict(noisy.to(device), timesteps.to(device), context)
    error = (prediction.float() - target.to(device)) ** 2
    if batch.weights is not None:
        error = error * batch.weights.to(device)
    return error.mean()
