"""Write this folder's synthetic `measurements.safetensors` (24 layers, hidden 64, dense).

    python tests/plans/example_dense/make_measurement.py     # from the repository root

It fabricates seeded activations in which the harmful class carries a planted
unit direction whose strength peaks in the middle of the stack, and measures
them with the measure stage's own code. The output is the same on every run.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.measurement import write_measurements
from pipeline.refusal_direction import measure_activations

NUM_LAYERS, HIDDEN, SAMPLES = 24, 64, 32
FOLDER = Path(__file__).resolve().parent


def synthetic_activations() -> tuple[torch.Tensor, torch.Tensor]:
    """[n, layers, hidden] per class: a shared per-layer base, noise, and a planted direction for harmful."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(NUM_LAYERS, HIDDEN, generator=generator, dtype=torch.float64)
    base = base / base.norm(dim=1, keepdim=True) * torch.linspace(4.0, 16.0, NUM_LAYERS, dtype=torch.float64)[:, None]
    planted = torch.randn(HIDDEN, generator=generator, dtype=torch.float64)
    planted = planted / planted.norm()
    depth = torch.arange(NUM_LAYERS, dtype=torch.float64)
    strength = 0.5 + 4.5 * torch.exp(-((depth - 14.0) ** 2) / (2 * 3.0**2))
    noise = 0.3 / math.sqrt(HIDDEN)
    harmless = base + noise * torch.randn(SAMPLES, NUM_LAYERS, HIDDEN, generator=generator, dtype=torch.float64)
    harmful = (
        base
        + strength[:, None] * planted
        + noise * torch.randn(SAMPLES, NUM_LAYERS, HIDDEN, generator=generator, dtype=torch.float64)
    )
    return harmful.to(torch.float32), harmless.to(torch.float32)


def main() -> None:
    harmful, harmless = synthetic_activations()
    meta = {
        "model_id": "example/synthetic-dense-24x64",
        "model_fingerprint": "synthetic-seed-0",
        "model_type": "llama",
        "hidden_size": str(HIDDEN),
        "num_layers": str(NUM_LAYERS),
        "is_moe": "false",
        "position": "last",
        "harmful_sha256": hashlib.sha256(harmful.numpy().tobytes()).hexdigest(),
        "harmless_sha256": hashlib.sha256(harmless.numpy().tobytes()).hexdigest(),
    }
    with tempfile.TemporaryDirectory() as scratch:
        activations = Path(scratch) / "activations.safetensors"
        save_file({"harmful": harmful, "harmless": harmless}, str(activations), metadata=meta)
        measurements = measure_activations(activations)
    write_measurements(FOLDER / "measurements.safetensors", measurements)
    print("quality by layer:", ", ".join(f"{q:.4f}" for q in measurements.quality))


if __name__ == "__main__":
    main()
