"""A small, deterministic CPU training job: ``python -m cedana_ray.jobs.train [--steps N]``.

Fits a two-layer MLP to a fixed synthetic regression task with full-batch SGD and
prints ``step=N loss=X`` (the exact float) after every step, then ``done``. With fixed
seeds the loss curve is bit-identical from run to run, so a run that was checkpointed,
migrated and restored in the middle must print exactly the same curve as one that was
not. PyTorch on CPU when it is installed (``--backend torch``), else NumPy.

    cedana-ray run process --checkpoint-every 30s -- python -m cedana_ray.jobs.train --steps 5000
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable, Iterator

SAMPLES, FEATURES, HIDDEN, LR = 256, 16, 64, 0.05


def torch_steps() -> Iterator[float]:
    import torch

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    x = torch.randn(SAMPLES, FEATURES)
    y = x @ torch.randn(FEATURES, 1) + 0.1 * torch.sin(x.sum(1, keepdim=True))
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    while True:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        yield loss.item()


def numpy_steps() -> Iterator[float]:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((SAMPLES, FEATURES))
    y = x @ rng.standard_normal((FEATURES, 1)) + 0.1 * np.sin(x.sum(1, keepdims=True))
    w1 = rng.standard_normal((FEATURES, HIDDEN)) / np.sqrt(FEATURES)
    w2 = rng.standard_normal((HIDDEN, 1)) / np.sqrt(HIDDEN)
    while True:
        h = np.tanh(x @ w1)
        err = h @ w2 - y
        grad_out = 2 * err / SAMPLES
        grad_w2 = h.T @ grad_out
        grad_w1 = x.T @ ((grad_out @ w2.T) * (1 - h**2))
        w1 -= LR * grad_w1
        w2 -= LR * grad_w2
        yield float((err**2).mean())


BACKENDS: dict[str, Callable[[], Iterator[float]]] = {"torch": torch_steps, "numpy": numpy_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between steps (to watch it)")
    parser.add_argument("--backend", choices=["auto", *BACKENDS], default="auto")
    args = parser.parse_args()
    backend = args.backend
    if backend == "auto":
        backend = "torch" if importlib.util.find_spec("torch") else "numpy"
    print(f"backend={backend}", flush=True)
    for step, loss in zip(range(args.steps), BACKENDS[backend](), strict=False):
        print(f"step={step} loss={loss!r}", flush=True)
        time.sleep(args.interval)
    print("done", flush=True)


if __name__ == "__main__":
    main()
