"""The head alone, contiguous vs channels-last layout (CHANNELS_LAST), alternated three times in one
process: a training step (Adam, 64 images of 64 x 16 x 16 trunk features, the study's trunk at 128 px)
and an eval pass (128 images). Prints milliseconds per training step and per image of an eval pass;
docs/speed.md quotes its figures. Run it with nothing else on the CPU.

    python tools/head_layout.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backbone  # noqa: E402


def train_step(model, features, labels, optimizer) -> None:
    logits, _ = model.forward_head(features)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def timed(model, features, labels, repeats: int = 40) -> tuple[float, float]:
    """(ms per training step, ms per image of an eval pass over twice the batch)."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-3)
    model.train()
    for _ in range(5):
        train_step(model, features, labels, optimizer)
    started = time.perf_counter()
    for _ in range(repeats):
        train_step(model, features, labels, optimizer)
    step_ms = (time.perf_counter() - started) / repeats * 1000
    model.eval()
    batch = torch.cat([features] * 2)
    with torch.inference_mode():
        for _ in range(3):
            model.forward_head(batch)
        started = time.perf_counter()
        for _ in range(repeats):
            model.forward_head(batch)
    return step_ms, (time.perf_counter() - started) / repeats * 1000 / len(batch)


def main() -> None:
    torch.manual_seed(0)
    model = backbone.PlanktonNet(6, 128, 128, 0.2, "efficientnet_v2_s", 0)
    channels, height, width = backbone.trunk_output_shape("efficientnet_v2_s", 128)
    features, labels = torch.randn(64, channels, height, width), torch.randint(0, 6, (64,))
    results = {"contiguous": [], "channels_last": []}
    for _ in range(3):
        results["contiguous"].append(timed(model.to(memory_format=torch.contiguous_format), features, labels))
        results["channels_last"].append(timed(backbone.to_channels_last(model), features, labels))
    for layout, rows in results.items():
        print(f"{layout}: training step ms/64 {[round(a, 1) for a, _ in rows]}, "
              f"eval ms/image {[round(b, 3) for _, b in rows]}")


if __name__ == "__main__":
    main()
