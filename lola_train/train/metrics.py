"""Metrics to ``metrics.jsonl`` (one JSON object per line) and to TensorBoard when it is installed."""
from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    """``log(stage, step, **values)``: appends ``{"stage", "step", "time", **values}``; only on the main process.
    Lists are written to JSONL as they are and to TensorBoard element-wise (``name/0``, ``name/1`` ...)."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(folder) / "metrics.jsonl"
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(folder) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def log(self, stage: str, step: int, **values) -> None:
        if not self.enabled:
            return
        row = {"stage": stage, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, v in values.items():
                items = enumerate(v) if isinstance(v, (list, tuple)) else [(None, v)]
                for i, x in items:
                    if isinstance(x, (int, float)) and not isinstance(x, bool):
                        self.tb.add_scalar(f"{stage}/{key}" + (f"/{i}" if i is not None else ""), x, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(folder: Path) -> list[dict]:
    path = Path(folder) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
