"""The kernel's metrics: its registry, the values it reads when an exporter
collects, the supervision histograms, and the exporters' lifecycle.

What the kernel already keeps (instances and their states, restarts, circuit
breakers, the registry's size, calls in flight) is read by :meth:`collect`,
at collection time: nothing is pushed on a state change. RSS and CPU are
sampled then too (:meth:`usage`, a source of ``gather``, on a worker thread),
with a sampler of their own (the resource-limit loop's readings are over its
own interval).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from loguru import logger

from hsu import tracecontext
from hsu.errors import PluginError
from hsu.metrics import GRPC_TYPES, CallMetrics, Exporter, Family, Point, Registry, code_of
from hsu.ports import CallObserver, CallSpan, RoutedCall

if TYPE_CHECKING:
    from hsu._kernel.kernel import Kernel
    from hsu._kernel.supervision.instances import Instance

#: seconds: starting a process and waiting for it to be ready
START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: seconds the kernel waits for an HSU's Core.Metrics at a collection
HSU_TIMEOUT = 2.0
STATES = ("stopped", "starting", "ready", "stopping", "backoff", "fatal")
#: the families :meth:`KernelMetrics.usage` answers (sampled from /proc)
USAGE_FAMILIES = ("hsu_instance_resident_memory_bytes", "hsu_instance_cpu_percent")
#: the families the kernel answers itself (:meth:`KernelMetrics.collect` and
#: :meth:`~KernelMetrics.usage`): a Core.Metrics that asks only for these
#: does not ask the HSUs
KERNEL_FAMILIES = frozenset(
    {
        *USAGE_FAMILIES,
        "hsu_instances",
        "hsu_instance_restarts_total",
        "hsu_instance_inflight",
        "hsu_instance_uptime_seconds",
        "hsu_breaker_state",
        "hsu_registry_endpoints",
        "hsu_kernel_start_time_seconds",
        "hsu_instance_start_seconds",
        "hsu_cold_start_seconds",
    }
)


class KernelMetrics:
    """One kernel's metrics (``kernel.metrics``, ``kernel.calls``)."""

    def __init__(self, kernel: Kernel, calls: bool) -> None:
        from hsu._kernel.supervision.resources import Sampler

        self.kernel = kernel
        self.registry = Registry()
        self.calls = CallMetrics(self.registry, "server") if calls else None
        self.started = self.registry.histogram(
            "hsu_instance_start_seconds",
            "seconds from spawning an instance's process to the instance being ready",
            ("hsu_unit",),
            START_BUCKETS,
        )
        self.cold = self.registry.histogram(
            "hsu_cold_start_seconds",
            "seconds a routed call waited for an instance to be started for it",
            ("hsu_unit",),
            START_BUCKETS,
        )
        self.registry.add_collector("kernel", self.collect, filtered=True)
        self.registry.add_source("usage", self.usage, families=USAGE_FAMILIES)
        self.registry.add_source("hsus", self.from_hsus, filtered=True)
        #: Core channels to instances, by address; instances that do not
        #: serve Core.Metrics (another language's SDK), by (id, pid)
        self._channels: dict[str, Any] = {}
        self._unimplemented: set[tuple[str, int]] = set()
        self._sampler = Sampler()
        self._sampled: set[int] = set()
        #: one sampling at a time (the sampler keeps CPU deltas per process)
        self._sampling = asyncio.Lock()
        #: a sampling :meth:`gather` started for :meth:`usage` to take
        self._started: asyncio.Future[tuple[list[Point], list[Point]]] | None = None
        self._exporters: list[tuple[str, Exporter]] = []

    # -- routed calls ----------------------------------------------------------------

    def observer(self) -> CallObserver | None:
        """``kernel.call_observer``: count the call, and tell the plugins that
        implement ``hsu_routed_call`` (looked up per call, so a plugin
        registered later is told too; none: no record is built)."""
        plugins = self.kernel.plugins
        count = None if self.calls is None else self.calls.observe
        if count is None and not plugins.routed_call_impls():
            return None
        kernel = self.kernel

        def observe(
            kind: str, method: str, unit: str, exc: BaseException | None, t0: float
        ) -> None:
            if count is not None:
                count(kind, method, unit, exc, t0)
            impls = plugins.routed_call_impls()
            if impls:
                end = time.time_ns()
                start = end - max(0, int((time.perf_counter() - t0) * 1e9))
                span = tracecontext.CURRENT.get()
                spans: tuple[CallSpan, ...] = ()
                if span is not None:
                    trace = tracecontext.CALL.get()
                    if trace is not None and trace.span is span:
                        # the call began before its tries (a cold start)
                        start = min(start, trace.start_ns)
                        spans = trace.spans()
                call = RoutedCall(
                    kind=GRPC_TYPES.get(kind, kind),
                    method=method,
                    unit=unit,
                    code=code_of(exc),
                    start_ns=start,
                    end_ns=end,
                    span=span,
                    spans=spans,
                )
                plugins.routed_call(impls, kernel, call)

        return observe

    def report(self, call: RoutedCall) -> None:
        """``kernel.report_routed_call``: a call routed outside the kernel's
        process (nginx) is counted and told as the gateway's are."""
        if self.calls is not None:
            seconds = max(0, call.end_ns - call.start_ns) / 1e9
            self.calls.count(call.kind, call.method, call.unit, call.code, seconds)
        plugins = self.kernel.plugins
        impls = plugins.routed_call_impls()
        if impls:
            plugins.routed_call(impls, self.kernel, call)

    # -- supervision -----------------------------------------------------------------

    def instance_ready(self, inst: Instance) -> None:
        """The instance's process became ready (spawn-to-ready)."""
        if inst.ready_at is not None and not inst.reattached:
            took = max(0.0, inst.ready_at - inst.started_at)
            self.started.labels(inst.unit).observe(took)

    def cold_start(self, unit: str, began: float) -> None:
        """A routed call waited for an instance of ``unit`` since ``began``
        (:func:`time.monotonic`)."""
        self.cold.labels(unit).observe(max(0.0, time.monotonic() - began))

    # -- collection ------------------------------------------------------------------

    def collect(self, names: Collection[str] | None = None) -> Iterable[Family]:
        """The kernel's own families (``names``: only these; the others'
        points are not made)."""

        def wanted(name: str) -> bool:
            return names is None or name in names

        k = self.kernel
        instances = list(k.instances.values())
        by_state: dict[tuple[str, str], int] = {}
        restarts: list[Point] = []
        inflight: list[Point] = []
        up: list[Point] = []
        now = time.time()
        per_instance = any(
            wanted(n)
            for n in (
                "hsu_instance_restarts_total",
                "hsu_instance_inflight",
                "hsu_instance_uptime_seconds",
            )
        )
        if wanted("hsu_instances"):
            by_state = {(u, s): 0 for u in k.deployment.units for s in STATES}
            for inst in instances:
                key = (inst.unit, inst.state.value)
                by_state[key] = by_state.get(key, 0) + 1
            yield Family(
                "hsu_instances",
                "gauge",
                "instances by unit and state",
                tuple(
                    Point((("hsu_unit", u), ("state", s)), float(n))
                    for (u, s), n in sorted(by_state.items())
                ),
            )
        if per_instance:
            for inst in instances:
                labels = (("hsu_unit", inst.unit), ("hsu_instance", inst.instance_id))
                restarts.append(Point(labels, float(inst.restarts)))
                inflight.append(Point(labels, float(k.routing.load(inst.instance_id))))
                if inst.ready_at is not None and inst.state.value == "ready":
                    up.append(Point(labels, max(0.0, now - inst.ready_at)))
        yield Family(
            "hsu_instance_restarts_total",
            "counter",
            "processes started in an instance's slot after the first",
            tuple(restarts),
        )
        yield Family(
            "hsu_instance_inflight",
            "gauge",
            "calls in flight on an instance (its own report, else the kernel's count)",
            tuple(inflight),
        )
        yield Family(
            "hsu_instance_uptime_seconds",
            "gauge",
            "seconds since the instance's current process became ready",
            tuple(up),
        )
        if wanted("hsu_breaker_state"):
            breakers: list[Point] = []
            for interface, route in list(k.routing.routes.items()):
                for instance_id, breaker in list(route.breakers.items()):
                    ep = route.endpoints.get(instance_id)
                    unit = ep.unit if ep is not None else ""
                    for s in ("closed", "open", "half_open"):
                        blabels = (
                            ("grpc_service", interface),
                            ("hsu_unit", unit),
                            ("hsu_instance", instance_id),
                            ("state", s),
                        )
                        breakers.append(Point(blabels, 1.0 if breaker.state == s else 0.0))
            yield Family(
                "hsu_breaker_state",
                "gauge",
                "1 for the state each instance's circuit breaker is in (kernel's routes)",
                tuple(breakers),
            )
        yield Family(
            "hsu_registry_endpoints",
            "gauge",
            "endpoints the service registry lists (this kernel's and others')",
            (Point((), float(k.routing.endpoint_count())),),
        )
        yield Family(
            "hsu_kernel_start_time_seconds",
            "gauge",
            "when the kernel started, seconds since the epoch",
            (Point((), k.created_at),),
        )

    async def gather(self, names: Collection[str] | None, local: bool = False) -> list[Family]:
        """What the control plane's Core.Metrics answers: the families of
        ``names`` (None: all); ``local``: without the HSUs' series, so none
        of them is asked.

        The usage sampling starts here, on its thread, before anything is
        awaited: the other replies of the same ``hsu status`` (grpc.aio
        serves its streams in any order) are then built while it reads /proc
        (docs/benchmarks.md, "`hsu status` with 1,000 running")."""
        mine = None
        wanted = names is None or not set(USAGE_FAMILIES).isdisjoint(names)
        if wanted and self._started is None and not self._sampling.locked():
            loop = asyncio.get_running_loop()
            mine = self._started = loop.run_in_executor(None, self._sample, self._targets())
        try:
            return await self.registry.gather(names, skip=("hsus",) if local else ())
        finally:
            if mine is not None and self._started is mine and mine.done():
                self._started = None  # usage() did not take it: dropped
                if not mine.cancelled():
                    mine.exception()

    async def usage(self) -> list[Family]:
        """Every live instance's RSS and CPU, read from /proc on a worker
        thread (one read of each process's stat, :class:`Sampler`): with
        many instances it still takes long enough that the event loop must
        not wait for it (docs/benchmarks.md, "Where `hsu status` goes")."""
        async with self._sampling:
            started, self._started = self._started, None
            if started is not None:
                rss, cpu = await started
            else:
                rss, cpu = await asyncio.to_thread(self._sample, self._targets())
        return [
            Family(
                "hsu_instance_resident_memory_bytes",
                "gauge",
                "resident memory of an instance's process tree",
                tuple(rss),
            ),
            Family(
                "hsu_instance_cpu_percent",
                "gauge",
                "CPU of an instance's process tree since the previous collection, % of one core",
                tuple(cpu),
            ),
        ]

    def _targets(self) -> list[tuple[tuple[tuple[str, str], ...], int, str]]:
        return [
            ((("hsu_unit", i.unit), ("hsu_instance", i.instance_id)), i.pid, i.instance_id)
            for i in list(self.kernel.instances.values())
            if i.pid and i.state.value in ("ready", "starting", "stopping")
        ]

    def _sample(
        self, targets: Sequence[tuple[tuple[tuple[str, str], ...], int, str]]
    ) -> tuple[list[Point], list[Point]]:
        members = self.kernel.containment.members
        rss: list[Point] = []
        cpu: list[Point] = []
        alive = {pid for _, pid, _ in targets}
        sampled = self._sampler.sample_many(
            ((pid, members(i)) for _, pid, i in targets), open_files=False
        )
        for (labels, _, _), usage in zip(targets, sampled, strict=True):
            if usage is not None:
                rss.append(Point(labels, float(usage.rss)))
                cpu.append(Point(labels, usage.cpu_percent))
        for pid in [p for p in self._sampled if p not in alive]:
            self._sampler.forget(pid)
        self._sampled = alive
        return rss, cpu

    async def from_hsus(self, names: Collection[str] | None = None) -> list[Family]:
        """Every ready instance's Core.Metrics, each series labelled with its
        ``hsu_unit`` and ``hsu_instance`` (asked at once, within
        :data:`HSU_TIMEOUT`; one that does not answer in time is left out).

        ``names``: only these families, asked of the HSUs as such; none at
        all when they are all the kernel's own (:data:`KERNEL_FAMILIES`)."""
        import grpc

        from hsu._kernel.core_service import families_from_pb
        from hsu.core.v1 import core_pb2, core_pb2_grpc

        if names is not None and not set(names) - KERNEL_FAMILIES:
            return []
        request = core_pb2.MetricsRequest(families=sorted(names or ()))
        ready = [
            i
            for i in list(self.kernel.instances.values())
            if i.state.value == "ready"
            and i.address
            and (i.instance_id, i.pid) not in self._unimplemented
        ]
        live = {i.address for i in ready}
        for address in [a for a in self._channels if a not in live]:
            await self._channels.pop(address).close()

        async def ask(inst: Instance) -> list[Family]:
            ch = self._channels.get(inst.address)
            if ch is None:
                ch = self._channels[inst.address] = grpc.aio.insecure_channel(inst.address)
            try:
                reply = await core_pb2_grpc.CoreStub(ch).Metrics(request, timeout=HSU_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                    self._unimplemented.add((inst.instance_id, inst.pid))
                return []
            extra = {"hsu_unit": inst.unit, "hsu_instance": inst.instance_id}
            return [f.with_labels(extra) for f in families_from_pb(reply)]

        answers = await asyncio.gather(*(ask(i) for i in ready))
        return [f for fams in answers for f in fams]

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            await ch.close()

    # -- exporters -------------------------------------------------------------------

    async def start_exporters(self, names: Iterable[str]) -> None:
        """Start each exporter ``kernel.exporters`` names; one that is not
        registered is an error listing the registered ones."""
        for name in names:
            factory: Any = self.kernel.plugins.get("exporter", name)
            exporter = factory(self.kernel)
            await exporter.start()
            self._exporters.append((name, exporter))
            logger.debug("metrics exporter {} started", name)

    async def stop_exporters(self) -> None:
        await self.close()
        exporters, self._exporters = self._exporters, []
        for name, exporter in reversed(exporters):
            try:
                await exporter.stop()
            except Exception as exc:
                logger.opt(exception=exc).warning("metrics exporter {} failed to stop", name)


def check_exporters(names: Iterable[str], registered: list[str]) -> None:
    """``kernel.exporters`` names registered exporters (an error says which not)."""
    missing = [n for n in names if n not in registered]
    if missing:
        known = ", ".join(registered) or "none"
        raise PluginError(
            f"kernel.exporters: no exporter named {', '.join(map(repr, missing))}"
            f" (registered: {known}); is its plugin enabled?"
        )
