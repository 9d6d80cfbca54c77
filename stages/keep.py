"""Which weights a training stage hands on (``train.keep``): those of the epoch with the lowest
validation loss (``best``, the default), or those of the last epoch (``last``).

Rank 0 keeps a record of the best epoch so far: its number, its validation value and a CPU
copy of its weights. Every checkpoint carries the record (``state["best"]``), so a resumed
run knows it too; the copy of the weights is left out while the best epoch is the checkpoint's
own (its ``state["model"]``). Which value decides is the task's ``select_metric`` (a metric its
``summarize`` reports for the validation split, lower is better). Torch is imported on use.
"""
from __future__ import annotations

import math


class BestEpoch:
    def __init__(self, metric: str, restored: dict | None = None):
        self.metric = metric
        self.epoch, self.value, self.weights = -1, math.inf, None
        best = (restored or {}).get("best")
        if best:
            self.epoch, self.value = int(best["epoch"]), float(best["value"])
            # (no copy: the restored checkpoint's own weights are the best ones)
            self.weights = best.get("model") or {k: _copy(v) for k, v in restored["model"].items()}

    def update(self, epoch: int, metrics: dict, model_state: dict) -> bool:
        """Record ``epoch`` if its validation value is lower than every earlier one's (ties keep
        the earlier epoch) -> whether it was."""
        value = metrics.get(self.metric)
        if value is None or not value < self.value:
            return False
        self.epoch, self.value = epoch, float(value)
        self.weights = {k: _copy(v) for k, v in model_state.items()}
        return True

    def state(self, epoch: int) -> dict:
        """The record for the checkpoint of ``epoch`` (the weights only when they are another epoch's)."""
        if self.epoch < 0:
            return {}
        record = {"epoch": self.epoch, "value": self.value}
        if self.epoch != epoch:
            record["model"] = self.weights
        return {"best": record}


def _copy(value):
    """A CPU copy of a state-dict entry (a tensor, or a module's extra state as it is)."""
    import copy

    import torch

    return value.detach().to("cpu", copy=True) if torch.is_tensor(value) else copy.deepcopy(value)


def kept(state: dict, meta: dict, keep: str, metric: str) -> tuple[dict, dict[str, float], str]:
    """The weights a stage hands on from its final checkpoint (``state``, ``meta``) ->
    (state dict, metrics saying which epoch they are from, a line for the run's tags)."""
    last = int(meta["epoch"])
    best = state.get("best")
    if keep == "last" or not best:
        why = "train.keep=last" if keep == "last" else f"no epoch reported {metric}"
        return state["model"], {"kept_epoch": float(last)}, f"the last epoch, {last + 1} ({why})"
    epoch = int(best["epoch"])
    weights = best.get("model") or state["model"]
    line = (f"epoch {epoch + 1} of {last + 1}, the lowest {metric} ({best['value']:.5g}; train.keep=best)")
    return weights, {"kept_epoch": float(epoch), f"kept_{metric}": float(best["value"])}, line
