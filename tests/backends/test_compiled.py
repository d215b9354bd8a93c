"""The compiled UNet (``backends/compiled.py``): equal to eager for training and sampling, and eager with one line
where the machine cannot compile (a real failure: the C++ compiler named by CXX does not exist)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from closeness import assert_outputs_close, pixels  # noqa: E402

from sdconcepts.training import create_embedding_file  # noqa: E402
from sdconcepts.training.training_model import TrainingModel  # noqa: E402


@pytest.mark.slow
def test_a_machine_that_cannot_compile_trains_and_generates_eagerly_saying_so_once(
        tiny_model: Any, tiny_model_dir: Path, dataset: Path, tmp_path: Path) -> None:
    create_embedding_file(tmp_path / "embeddings", "toytri", TrainingModel(tiny_model).token_rows("triangle", 1),
                          vectors=1)
    # No mock: Inductor looks for the C++ compiler CXX names, and there is none there; a fresh cache folder, so
    # no kernel compiled by an earlier run can stand in for it.
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler" / "g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sdconcepts", *args, "--ckpt", str(tiny_model_dir), "--compile"],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)

    trained = cli("train-embedding", "toytri", "--dataset", str(dataset), "--template", "subject", "--max-steps", "2",
                  "--save-every", "0", "--preview-every", "0", "--validate-every", "0")
    assert trained.returncode == 0, trained.stderr
    said = [line for line in trained.stderr.splitlines() if "running it eagerly" in line]
    assert len(said) == 1 and "this machine cannot compile" in said[0] and "C++ compiler" in said[0], trained.stderr
    assert "Training finished at 2 steps" in trained.stdout
    made = cli("generate", "--prompt", "a toytri", "--steps", "2", "--seed", "1", "--output", str(tmp_path / "a.png"))
    assert made.returncode == 0 and (tmp_path / "a.png").is_file(), made.stderr
    said = [line for line in made.stderr.splitlines() if "running it eagerly" in line]
    assert len(said) == 1 and said[0].startswith("warning: compiling the UNet failed"), made.stderr


@pytest.mark.slow
def test_the_compiled_unet_trains_and_samples_like_eager(tiny_model: Any) -> None:
    from sdconcepts.backends.sampling import txt2img
    from sdconcepts.generation import GenerationParams

    vectors = (torch.randn(2, 48, generator=torch.Generator().manual_seed(0)) * 0.02).requires_grad_(True)
    eager = TrainingModel(tiny_model, {"zq": vectors})
    compiled = TrainingModel(tiny_model, {"zq": vectors}, compile_unet=True)
    assert compiled.compiled is not None and compiled.compiled.fallback is None
    generator = torch.Generator().manual_seed(1)
    noisy, timesteps = torch.randn(4, 4, 8, 8, generator=generator), torch.tensor([10, 300, 600, 900])

    def step(model: TrainingModel) -> tuple[torch.Tensor, torch.Tensor]:
        vectors.grad = None
        out = model.predict(noisy, timesteps, model.encode_text(["a zq"] * 4))
        out.square().mean().backward()  # type: ignore[no-untyped-call]
        assert vectors.grad is not None
        return out.detach(), vectors.grad.clone()

    want_out, want_grad = step(eager)
    for _ in range(2):  # the first call compiles, the second runs what was compiled
        got_out, got_grad = step(compiled)
        assert_outputs_close(got_out, want_out)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-3, atol=1e-6)
    assert compiled.compiled.fallback is None and compiled.compiled.first_call_s is not None
    params = GenerationParams(prompt="a yellow triangle", steps=3, seed=2, width=32, height=32, batch_size=2)
    want = pixels(txt2img(tiny_model, params))
    got = pixels(txt2img(tiny_model, params, compile_unet=True))
    assert int(np.abs(got - want).max()) <= 1


def test_a_convolution_as_one_matrix_product_equals_the_convolution_and_its_input_gradient() -> None:
    from sdconcepts.backends.compiled import conv_as_matmul

    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(32, 8, 3, 3, generator=generator)
    bias = torch.randn(32, generator=generator)
    for stride, padding, dilation, with_bias in ((2, 1, 1, True), (1, 2, 2, False), ((2, 1), (0, 1), 1, True)):
        x = torch.randn(3, 8, 7, 6, generator=generator)
        got_x, want_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        b = bias if with_bias else None
        got = conv_as_matmul(got_x, weight, b, stride, padding, dilation)
        want = torch.conv2d(want_x, weight, b, stride, padding, dilation)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        upstream = torch.randn(want.shape, generator=generator)
        got.backward(upstream)  # type: ignore[no-untyped-call]
        want.backward(upstream)  # type: ignore[no-untyped-call]
        torch.testing.assert_close(got_x.grad, want_x.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_wide_convolutions_on_few_positions_compile_to_matrix_products_equal_to_eager(
        caplog: pytest.LogCaptureFixture) -> None:
    from sdconcepts.backends.compiled import CompiledUnet

    torch.manual_seed(5)
    # 64 output channels on 1 x 2 x 2 positions: a product; 8 channels on as many positions: a convolution.
    module = torch.nn.Sequential(torch.nn.Conv2d(8, 64, 3, padding=1), torch.nn.SiLU(),
                                 torch.nn.Conv2d(64, 8, 3, padding=1)).requires_grad_(False)
    x = torch.randn(1, 8, 2, 2)

    def step(call: Any) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = x.clone().requires_grad_(True)
        out = call(leaf)
        out.square().sum().backward()
        assert leaf.grad is not None
        return out.detach(), leaf.grad

    want_out, want_grad = step(module)
    with caplog.at_level("INFO", logger="sdconcepts.backends.compiled"):
        compiled = CompiledUnet(module)
        got_out, got_grad = step(compiled)
    assert compiled.fallback is None
    assert "compiling: 1 convolutions as matrix products" in caplog.text
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5)
