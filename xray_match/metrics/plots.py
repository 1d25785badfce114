"""PNG figures people would rather see than numbers (logged to MLflow by rank 0)."""

from __future__ import annotations

import torch


def save_recall_curve(r_i2t: torch.Tensor, r_t2i: torch.Tensor, path: str, max_k: int = 50, title: str = "") -> str:
    """Recall@K for K = 1..max_k in both directions, from 0-based ranks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(range(1, max_k + 1))
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for ranks, label in ((r_i2t, "image -> text"), (r_t2i, "text -> image")):
        ax.plot(ks, [100.0 * (ranks < k).float().mean().item() for k in ks], label=label)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_png(fig, path)


def save_png(fig, path: str) -> str:
    """Render a matplotlib figure as PNG, close it, and write the file atomically (temp name, then
    rename: a reader never sees half a PNG); returns ``path``."""
    import io

    import matplotlib.pyplot as plt

    from xray_match.data.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
