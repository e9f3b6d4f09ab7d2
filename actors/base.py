"""What every model stage shares: loading one component, batching pending units by shape, isolating failures."""
from __future__ import annotations

import logging
import time

import pyarrow as pa

from actors.rows import FAILED, PENDING, from_table, load_row, request_for, to_table
from diffusion import runtime
from diffusion.model import GenerationRequest, PanGuDraw

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 500


def error_text(stage: str, exc: BaseException) -> str:
    """One line naming the stage and the exception, short enough for a result row."""
    text = f"{stage}: {type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


class ModelStage:
    """A Ray Data callable class holding one component of the model on its device.

    `__call__` takes a block of units and returns it with this stage's columns filled. Pending units are split into
    sub-batches of one group (size, steps, sampler, branch count) of at most `batch_size` rows; `process` runs one
    sub-batch. When a sub-batch raises, its rows are run one by one, so only the row that breaks is marked failed.
    """

    name = "stage"
    components: frozenset[str] = frozenset()
    # The pending units this stage works on: "plain" (the structure/texture path), "fused" (Coop-Diffusion rows,
    # `unit["fusion"]` set) or "any"; the others pass through unchanged.
    serves = "plain"

    def __init__(self, model_dir: str, *, device: str = "cpu", batch_size: int = 4, pad_batches: bool = False,
                 split_rule: str = "reference", dtype: str = "float32"):
        # Inside an actor that holds {"NPU": 1}, Ray exposes exactly one device, and MindSpore sees it as id 0.
        self.device = device
        self.batch_size = batch_size
        self.pad_batches = pad_batches
        runtime.configure(device, 0)
        self.model = PanGuDraw.load(model_dir, components=self.components, device=device,
                                    split_rule=split_rule, dtype=dtype)
        log.info("%s stage ready on %s (model %s)", self.name, device, self.model.identity.get("name"))

    # ---------------------------------------------------------------- Ray Data entry point

    def __call__(self, table: pa.Table) -> pa.Table:
        units = from_table(table)
        self.prepare([unit for unit in units if self.takes(unit)])
        groups: dict[str, list[dict]] = {}
        for unit in units:
            if self.takes(unit):
                groups.setdefault(self.group_of(unit), []).append(unit)
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                self._run_isolated(members[start:start + self.batch_size])
        return to_table(units)

    def takes(self, unit: dict) -> bool:
        if unit["status"] != PENDING:
            return False
        return self.serves == "any" or (unit.get("fusion") is not None) == (self.serves == "fused")

    def prepare(self, units: list[dict]) -> None:
        """Per-block work before batching (reading inputs); may mark units failed."""

    def group_of(self, unit: dict) -> str:
        return unit["group"]

    def process(self, units: list[dict], requests: list[GenerationRequest]) -> list[dict]:
        """Column updates for each unit of one sub-batch; raise to fail the sub-batch."""
        raise NotImplementedError

    # ---------------------------------------------------------------- helpers

    def _run_isolated(self, chunk: list[dict]) -> None:
        requests = [request_for(load_row(u["row"]), u["image_index"]) for u in chunk]
        start = time.perf_counter()
        try:
            updates = self.process(chunk, requests)
        except Exception as exc:  # noqa: BLE001 - any error of one row must not stop the others
            if len(chunk) > 1:
                log.warning("%s: a batch of %d rows failed (%s); running its rows one by one",
                            self.name, len(chunk), error_text(self.name, exc))
                for unit in chunk:
                    self._run_isolated([unit])
                return
            log.warning("%s: row %r image %d failed: %s", self.name, chunk[0]["row_id"], chunk[0]["image_index"],
                        error_text(self.name, exc))
            chunk[0].update(status=FAILED, error=error_text(self.name, exc))
            self._clear_arrays(chunk[0])
            return
        per_row = (time.perf_counter() - start) / len(chunk)
        for unit, update in zip(chunk, updates):
            unit.update(update)
            unit[f"{self.name}_s"] = per_row
            if unit["status"] == FAILED:
                self._clear_arrays(unit)

    @staticmethod
    def _clear_arrays(unit: dict) -> None:
        for column in ("cond", "handoff", "latent", "pixels"):
            unit[column] = None

    def padded(self, *lists: list) -> tuple[list, ...]:
        """Pad parallel lists to `batch_size` by repeating their last item, so one compiled graph serves every batch.

        Rows are independent (each has its own noise), so the copies change nothing but the batch shape.
        """
        if not self.pad_batches:
            return lists
        missing = self.batch_size - len(lists[0])
        return tuple(list(items) + [items[-1]] * max(missing, 0) for items in lists)


def failed_update(stage: str, message: str) -> dict:
    """A per-row failure found by a check after a successful batch (a NaN latent, say)."""
    return {"status": FAILED, "error": f"{stage}: {message}"}
