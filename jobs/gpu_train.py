"""A PyTorch job with GPU state worth checkpointing: a few GiB of tensors and a model.

Deterministic: the same arguments give the same loss at every step, so a run that was
checkpointed, killed and restored in the middle can be compared line by line with one
that never stopped. Prints ``ready SECONDS`` once the state is built and warmed up (the
cost of rebuilding it from scratch), then ``step N loss L state S`` per step, ``done``.
"""

from __future__ import annotations

import argparse
import os
import time

START = time.perf_counter()  # rebuilding from scratch includes importing torch
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS; before CUDA starts

import torch  # noqa: E402

GIB_FLOATS = (1 << 30) // 4


def checksum(tensors: list[torch.Tensor]) -> int:
    """An exact checksum of the tensors' bits."""
    return int(sum(t.view(torch.int32).sum(dtype=torch.int64).item() for t in tensors))


def build(gib: int, device: str) -> tuple[list[torch.Tensor], torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    gen = torch.Generator(device=device).manual_seed(1)
    state = [torch.randn(GIB_FLOATS, generator=gen, device=device) for _ in range(gib)]
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)).to(device)
    return state, model, torch.optim.Adam(model.parameters(), lr=1e-3)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int, device: str) -> float:
    gen = torch.Generator(device=device).manual_seed(1000 + i)
    x = torch.randn(256, 1024, generator=gen, device=device)
    loss = torch.nn.functional.mse_loss(model(x), x.flip(1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=int, default=4, help="GiB of state tensors")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    state, model, opt = build(args.gib, args.device)
    ready = time.perf_counter() - START
    gpu_bytes = torch.cuda.memory_allocated() if args.device == "cuda" else 0
    print(f"ready {ready:.3f} state {checksum(state)} gpu_bytes {gpu_bytes}", flush=True)
    for i in range(args.steps):
        loss = step(model, opt, i, args.device)
        print(f"step {i} loss {loss:.10f} state {checksum(state)}", flush=True)
        time.sleep(args.pause)
    print("done", flush=True)


if __name__ == "__main__":
    main()
