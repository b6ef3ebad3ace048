"""What the monitor has concluded so far: :class:`Ledger`.

It takes one packed sampled step at a time (:meth:`Ledger.take`: the one transfer, the host
summaries, the :class:`~monitor.judge.Judge`), keeps each layer's latest health, each parameter's
latest numbers, the alerts and the layers' forward order, and hands back the step's record for
the sinks. It is shared by the training thread and the writer thread: every access holds its lock.
"""

from __future__ import annotations

import threading
from typing import Any

from monitor.alerts import Alert
from monitor.health import AttentionHealth, LayerHealth, ParameterHealth
from monitor.judge import Judge, LayerMemory
from monitor.pack import Job, unpack
from monitor.records import LayerSample, SampleRecord

MAX_ALERTS = 10_000


class Ledger:
    """Latest healths, alerts and forward order, fed one sampled step at a time (thread-safe)."""

    def __init__(self, judge: Judge) -> None:
        self.judge = judge
        self.lock = threading.RLock()
        self.health: dict[str, LayerHealth] = {}
        self.param_health: dict[str, ParameterHealth] = {}
        self.alerts: list[Alert] = []
        self.order: list[str] = []  # layer names in first-seen forward order
        self.attention: dict[str, AttentionHealth] = {}  # attention modules, in first-seen forward order
        self._order_set: set[str] = set()
        self.judged_seq = 0  # the last sampled step judged (steps are numbered when packed)

    def take(self, job: Job) -> tuple[SampleRecord, list[Alert]] | None:
        """Judge one packed step; None if a newer one was judged first (windows stay in order)."""
        layers: list[LayerSample] = []
        with self.lock:
            if job.seq <= self.judged_seq:
                return None
            self.judged_seq = job.seq
            unpacked, params, attention = unpack(job)
            healths, alerts = self.judge.judge_step(
                job.step, [(wp.name, wp.kind, summary) for wp, summary, _, _ in unpacked], params.grad_norms
            )
            for (wp, summary, hist, scale), health in zip(unpacked, healths):
                layers.append(LayerSample(wp.name, wp.kind.name, health, summary, hist, scale))
                self.health[wp.name] = health
            parameters = [
                ParameterHealth(name, job.step, params.grad_norms.get(name), params.update_ratios.get(name))
                for name in dict.fromkeys([*params.grad_norms, *params.update_ratios])
            ]
            if parameters:
                self.param_health = {p.name: p for p in parameters}
            new_names = [ls.name for ls in layers if ls.name not in self._order_set]
            if new_names:
                self.order.extend(new_names)
                self._order_set.update(new_names)
            heads, attention_alerts = self.judge.judge_attention(job.step, attention)
            self.attention.update((h.name, h) for h in heads)
            alerts += attention_alerts
            self.alerts.extend(alerts)
            if len(self.alerts) > MAX_ALERTS:
                del self.alerts[: len(self.alerts) - MAX_ALERTS]
        return SampleRecord(job.step, layers, alerts, parameters, heads), alerts

    def layer_health(self) -> dict[str, LayerHealth]:
        with self.lock:
            return {n: self.health[n] for n in self.order if n in self.health}

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        with self.lock:
            return {
                "order": list(self.order),
                "layers": self.judge.state_dict(),
                "alerts": [a.to_dict() for a in self.alerts],
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Everything is read before anything changes: a damaged state raises and leaves this as it was."""
        order = [str(n) for n in state["order"]]
        alerts = [Alert(**a) for a in state["alerts"]]
        layers = dict(state["layers"])
        for layer in layers.values():
            LayerMemory.from_state_dict(layer)  # every entry readable now, not at the layer's next step
        with self.lock:
            self.order = order
            self._order_set = set(order)
            self.alerts = alerts
            self.judge.load_state_dict(layers)
