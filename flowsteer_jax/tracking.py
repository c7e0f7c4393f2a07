"""Where the trainer's logs go: TensorBoard (`WORKDIR/tb`, always) and, with `log.wandb`, Weights & Biases.

Both sinks take tensorboardX's calls (`add_scalar`, `add_image`, `close`), and `Writers` sends each call to all of
them, so the training loop logs once. `wandb` is optional: imported only when `log.wandb` is on, and a missing
package is one `InputError` before any model loads (`check`). The W&B run is named after the workdir and its id is
derived from the workdir's path, so a resumed run continues the same W&B run. `WANDB_MODE=offline` (W&B's own
variable) logs to `WORKDIR/wandb/` without a network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from typing import Any

import ml_collections
import numpy as np

from conversion.errors import InputError


def check(config: ml_collections.ConfigDict) -> None:
    """Refuse `log.wandb=True` without the `wandb` package (before any model loads)."""
    if config.log.wandb and importlib.util.find_spec("wandb") is None:
        raise InputError(
            "log.wandb=True, but the wandb package is not installed: pip install wandb, or log.wandb=False"
        )


class WandbWriter:
    """tensorboardX's writer calls, sent to a W&B run."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, config_dict: dict[str, Any]):
        import wandb

        self.wandb = wandb
        path = os.path.abspath(workdir)
        self.run = wandb.init(
            project=config.log.wandb_project,
            name=os.path.basename(path),
            id=hashlib.sha256(path.encode()).hexdigest()[:16],
            resume="allow",
            dir=path,
            config=config_dict,
        )

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: float(value)}, step=int(step))

    def add_image(self, tag: str, image: np.ndarray, step: int, dataformats: str = "HWC") -> None:
        if dataformats != "HWC":
            raise ValueError(f"dataformats={dataformats!r}: only HWC images are logged")
        self.run.log({tag: self.wandb.Image(np.asarray(image))}, step=int(step))

    def close(self) -> None:
        self.run.finish()


class Writers:
    """Every call to each of `writers` (tensorboardX's `SummaryWriter`, `WandbWriter`)."""

    def __init__(self, *writers: Any):
        self.writers = writers

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for w in self.writers:
            w.add_scalar(tag, value, step)

    def add_image(self, tag: str, image: np.ndarray, step: int, dataformats: str = "HWC") -> None:
        for w in self.writers:
            w.add_image(tag, image, step, dataformats=dataformats)

    def close(self) -> None:
        for w in self.writers:
            w.close()


def make_writers(config: ml_collections.ConfigDict, workdir: str, config_dict: dict[str, Any]) -> Writers:
    """TensorBoard in `WORKDIR/tb`, plus W&B with `log.wandb` (on the logging process only)."""
    from tensorboardX import SummaryWriter

    writers = [SummaryWriter(os.path.join(workdir, "tb"))]
    if config.log.wandb:
        writers.append(WandbWriter(config, workdir, config_dict))
    return Writers(*writers)
