"""Ending a run of the dataflow when a node leaves the cluster, so the driver can resume on the nodes left.

Ray Data restarts a lost actor wherever resources allow. After a node loss the pools of model actors usually
cannot be restored: every device of the cluster was given to some stage, so a restarted actor waits for a device
that the surviving actors hold, and the run hangs. `NodeLossCheck` ends the run instead (the driver sees
`NodeLostError`); `jobs.pipeline.run_pipeline` then chooses actors for what is left and resumes the rows that
have no result yet.
"""
from __future__ import annotations

import logging
import time

import ray
from ray.data import DataContext
from ray.data._internal.execution.execution_callback import ExecutionCallback

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0


class NodeLostError(RuntimeError):
    """A node that was alive when a run of the dataflow started has left the cluster."""

    def __init__(self, node_ids: set[str]):
        self.node_ids = frozenset(node_ids)
        super().__init__(f"{len(node_ids)} node(s) left the cluster: {', '.join(sorted(n[:12] for n in node_ids))}")


def alive_node_ids() -> set[str]:
    return {node["NodeID"] for node in ray.nodes() if node.get("Alive")}


class NodeLossCheck(ExecutionCallback):
    """Ray Data execution callback: raises NodeLostError (ending the run) once a node of the run's start is gone."""

    def __init__(self) -> None:
        self._nodes: set[str] = set()
        self._checked = 0.0

    def before_execution_starts(self, executor) -> None:
        self._nodes = alive_node_ids()
        self._checked = time.monotonic()

    def on_execution_step(self, executor) -> None:
        # One GCS request a second; the scheduling loop steps every few milliseconds.
        if time.monotonic() - self._checked < CHECK_INTERVAL_S:
            return
        self._checked = time.monotonic()
        lost = self._nodes - alive_node_ids()
        if lost:
            log.warning("node(s) %s left the cluster; ending this run of the dataflow", sorted(lost))
            raise NodeLostError(lost)


def install(context: DataContext | None = None) -> None:
    """Register NodeLossCheck for the datasets this process runs (once)."""
    context = context or DataContext.get_current()
    if NodeLossCheck not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(NodeLossCheck)
