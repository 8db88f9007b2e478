"""``progress.png``: loss curves, pseudo-Dice per structure, learning rate and epoch time, from ``log.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from autoseg.jsonio import temp_path_for  # noqa: E402


def read_log(path: Path) -> list[dict]:
    """The epochs of ``log.jsonl`` (a line cut short by a kill is skipped)."""
    records = []
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_progress(records: list[dict], path: Path) -> Path:
    """Draw the training curves of ``records`` (one dict per epoch) into ``path`` atomically."""
    path = Path(path)
    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(3, 1, figsize=(10, 11), sharex=True)
    ax = axes[0]
    ax.plot(epochs, [r["train_loss"] for r in records], label="train loss", color="tab:blue")
    if any(r.get("val_loss") is not None for r in records):
        ax.plot(epochs, [_nan(r.get("val_loss")) for r in records], label="validation loss", color="tab:red")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    names = sorted({n for r in records for n in (r.get("pseudo_dice") or {})})
    for name in names:
        ax2.plot(epochs, [_nan((r.get("pseudo_dice") or {}).get(name)) for r in records], ":", label=name)
    if any(r.get("ema_dice") is not None for r in records):
        ax2.plot(
            epochs, [_nan(r.get("ema_dice")) for r in records], color="tab:green", label="EMA pseudo-Dice"
        )
    ax2.set_ylabel("pseudo-Dice")
    ax2.set_ylim(0, 1)
    if names:
        ax2.legend(loc="lower right", fontsize="small")
    axes[1].plot(epochs, [r["lr"] for r in records], color="tab:purple")
    axes[1].set_ylabel("learning rate")
    axes[1].grid(alpha=0.3)
    axes[2].plot(epochs, [r["seconds"] for r in records], label="epoch", color="tab:gray")
    if any("data_wait_seconds" in r for r in records):
        axes[2].plot(epochs, [r.get("data_wait_seconds", 0.0) for r in records], label="waiting for data")
    axes[2].set_ylabel("seconds")
    axes[2].set_xlabel("epoch")
    axes[2].legend(loc="upper right")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    tmp = temp_path_for(path, ".png")
    try:
        fig.savefig(tmp, format="png", dpi=80)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def _nan(v):
    return float("nan") if v is None else v
