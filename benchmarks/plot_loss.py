"""Plot a training run's loss curve (from its checkpoint's trainer/state.json) to a PNG. Needs matplotlib.

python benchmarks/plot_loss.py mlx_diffgemma/demo/model benchmarks/demo_loss.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    losses = np.array(json.loads((run / "trainer" / "state.json").read_text())["losses"])
    step, total, canvas, encoder = losses.T

    def smooth(x, k=25):
        return np.convolve(x, np.ones(k) / k, mode="valid") if len(x) > k else x

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for values, label in ((total, "total"), (canvas, "canvas (block diffusion)"), (encoder, "encoder (next token)")):
        s = smooth(values)
        ax.plot(step[len(step) - len(s) :], s, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (moving average of 25 steps)")
    ax.set_title(f"demo model training ({int(step[-1])} steps)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
