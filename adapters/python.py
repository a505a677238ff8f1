"""`type: python` — a Python model that Coalesce runs in worker processes of its own.

Why processes: a CPU-bound model that holds the GIL uses one core however many
threads call it; N workers use N cores, and each may run another interpreter
(`python:`), so the model's dependencies stay apart from the sidecar's. This module
is the pool; python_process.py drives one worker from this side, python_worker.py is
the worker itself (run as a script); tensors cross in shared memory.

Each batch goes to an idle worker, handed over first come, first served. The
batcher's `max_in_flight` defaults to `processes` (see config.PythonBackend), so a
batch is formed only when a worker is free to take it and holds everything that
queued meanwhile, rather than waiting here, already formed and smaller.

A worker that dies, or holds a batch past `hang_timeout_ms`, is killed and replaced;
its batch runs once more on another worker, and is answered UNAVAILABLE if that one
is lost too. Workers exit with the sidecar, even after `kill -9` (see the worker).

With `requirements`, the workers run in a virtual environment Coalesce builds
(python_runtime.py). The build runs in the background: load() returns at once, so
the other backends serve while this one answers UNAVAILABLE saying which step it is
at; a failed build leaves it down, with the installer's output, until a reload.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Coroutine
from typing import Any

from coalesce.config import PythonBackend
from coalesce.core.request import ModelInfo, Tensors, TensorSpec
from coalesce.errors import CoalesceError, Unavailable

from .python_process import STOP_GRACE_S, StartFailed, Worker, WorkerLost, exit_text, start_worker
from .python_runtime import BuildFailed, Environment

log = logging.getLogger("coalesce")
DEFAULT_HANG_MS = 60_000.0
MAX_BACKOFF_S = 30.0


class PythonAdapter:
    """Runs each batch on an idle worker process; replaces workers that die or hang."""

    def __init__(self, name: str, config: PythonBackend) -> None:
        self.name = name
        self.config = config
        self._hang_s = (config.hang_timeout_ms or config.timeout_ms or DEFAULT_HANG_MS) / 1000
        self._workers: set[Worker] = set()
        self._idle: deque[Worker] = deque()
        self._waiters: deque[asyncio.Future[Worker]] = deque()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._down: str | None = None
        self._closed = False
        self._info = ModelInfo(platform="coalesce_python")
        self._max_batch_size: int | None = None
        # Workers read the first; only this process holds the second: its closing,
        # at our exit however abrupt, is their signal to exit.
        self._lifeline_read, self._lifeline_write = os.pipe()
        self.environment: Environment | None = None
        self._python: str | None = None  # the managed environment's interpreter, once built
        self.needs_rebuild = False  # a failed build: a reload builds this backend again

    async def load(self) -> None:
        """Start every worker (after building the environment, in the background)."""
        if self.config.requirements is None:
            await self._start_all()
            return
        self.environment = Environment(
            self.config.requirements,
            base=self.config.python,
            cache_dir=self.config.cache_dir,
            label=f"backend {self.name}",
            timeout_s=self.config.build_timeout_s,
        )
        self._background(self._prepare())

    async def _prepare(self) -> None:
        assert self.environment is not None
        try:
            self._python = await self.environment.prepare()
        except BuildFailed as exc:
            self.needs_rebuild = True
            self._down = f"its Python environment failed to build: {exc}"
            log.error("backend %s: %s", self.name, self._down)
            self._fail_waiters(Unavailable(f"backend '{self.name}': {self._down}"))
            return
        await self._start_all()

    async def _start_all(self) -> None:
        """If no worker can load the model, stay not ready (no retries)."""
        count = self.config.processes
        results = await asyncio.gather(
            *(self._start() for _ in range(count)), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        for result in results:
            if isinstance(result, Worker):
                self._add(result)
        if not failures:
            log.info("backend %s: %d workers ready", self.name, count)
            return
        reason = _reason(failures[0])
        details = getattr(failures[0], "traceback", "")
        log.error(
            "backend %s: %d of %d workers failed to start: %s%s",
            self.name,
            len(failures),
            count,
            reason,
            f"\n{details.rstrip()}" if details else "",
        )
        if not self._workers:
            self._down = reason  # a model that cannot load will not load on a retry
            return
        for _ in failures:
            self._background(self._replace())

    async def infer(self, inputs: Tensors, timeout: float | None) -> Tensors:
        """`timeout` is enforced by the batcher; a lost worker's batch is retried once."""
        lost: WorkerLost | None = None
        for attempt in (1, 2):
            worker = await self._acquire()
            job = self._background(self._run(worker, inputs))
            try:
                return await asyncio.shield(job)  # cancelled or not, the job settles the worker
            except WorkerLost as exc:
                lost = exc
                log.warning(
                    "backend %s: %s; %s",
                    self.name,
                    exc,
                    "retrying its batch on another worker"
                    if attempt == 1
                    else "answering its batch UNAVAILABLE",
                )
        raise Unavailable(f"backend '{self.name}': the batch lost two workers (last: {lost})")

    async def _run(self, worker: Worker, inputs: Tensors) -> Tensors:
        try:
            outputs = await worker.call(self.name, inputs, self._hang_s)
        except CoalesceError:
            self._hand_over(worker)  # the model answered with an error: the worker is fine
            raise
        except BaseException:  # lost, or cancelled mid-batch at close: its state is unknown
            self._lose(worker)
            raise
        self._hand_over(worker)
        return outputs

    async def _acquire(self) -> Worker:
        if self._idle:
            return self._idle.pop()
        self._check_serving()
        waiter: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._hand_over(waiter.result())  # handed a worker just as we were cancelled
            raise

    def _check_serving(self) -> None:
        if self._closed:
            raise Unavailable(f"backend '{self.name}' is shutting down")
        if self.environment is not None and self._python is None and not self._down:
            raise Unavailable(
                f"backend '{self.name}' is building its Python environment "
                f"({self.environment.step})"
            )
        if not self._workers and self._down:
            raise Unavailable(f"backend '{self.name}' has no worker running: {self._down}")

    def _hand_over(self, worker: Worker) -> None:
        """To the longest-waiting caller, else back to the idle list."""
        if worker.process.returncode is not None:  # died just after answering
            self._lose(worker)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self._idle.append(worker)

    def _add(self, worker: Worker) -> None:
        if not self._workers:
            self._describe(worker.hello)
        self._workers.add(worker)
        self._background(self._watch(worker))
        self._hand_over(worker)

    async def _watch(self, worker: Worker) -> None:
        """Replace a worker that dies between batches (a busy one is the job's to handle)."""
        code = await worker.process.wait()
        if worker in self._idle:
            self._idle.remove(worker)
            log.warning("backend %s: idle worker %d %s", self.name, worker.pid, exit_text(code))
            self._lose(worker)

    def _lose(self, worker: Worker) -> None:
        worker.kill()
        self._workers.discard(worker)
        if not self._closed:
            self._background(self._replace())

    async def _replace(self) -> None:
        """Start a worker in place of a lost one, backing off while starts fail."""
        delay = 0.5
        while True:
            try:
                worker = await self._start()
            except Exception as exc:
                self._down = _reason(exc)
                log.error(
                    "backend %s: a replacement worker failed to start: %s (retry in %.1f s)",
                    self.name,
                    self._down,
                    delay,
                )
                if not self._workers:
                    self._fail_waiters(
                        Unavailable(f"backend '{self.name}' has no worker running: {self._down}")
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
                continue
            if self._closed:  # closed while it started
                worker.kill()
                return
            self._down = None
            log.info("backend %s: worker %d started in place of a lost one", self.name, worker.pid)
            self._add(worker)
            return

    async def _start(self) -> Worker:
        return await start_worker(self.name, self.config, self._lifeline_read, self._python)

    def _describe(self, hello: dict[str, Any]) -> None:
        def specs(items: list[Any]) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(n, d, tuple(s)) for n, d, s in items)

        self._info = ModelInfo(specs(hello["inputs"]), specs(hello["outputs"]), "coalesce_python")
        self._max_batch_size = hello["max_batch_size"]

    def _fail_waiters(self, error: CoalesceError) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def _background(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(_settled)
        task.add_done_callback(self._tasks.discard)
        return task

    async def ready(self) -> bool:
        return bool(self._workers) and not self._closed

    @property
    def status(self) -> str:
        """One line for /readyz and the dashboard: building, down and why, or serving."""
        if self._closed:
            return "shutting down"
        if self._workers:
            return f"serving: {len(self._workers)} of {self.config.processes} workers"
        if self._down:
            return f"down: {self._down.splitlines()[0]}"
        if self.environment is not None and self._python is None:
            return f"building its environment: {self.environment.step}"
        return "starting workers"

    def info(self) -> ModelInfo:
        return self._info

    @property
    def max_batch_size(self) -> int | None:
        return self._max_batch_size

    @property
    def pids(self) -> list[int]:
        """The live workers' process ids."""
        return sorted(w.pid for w in self._workers)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._fail_waiters(Unavailable(f"backend '{self.name}' is shutting down"))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(w.stop(STOP_GRACE_S) for w in self._workers))
        self._workers.clear()
        self._idle.clear()
        for fd in (self._lifeline_read, self._lifeline_write):
            os.close(fd)


def _reason(error: BaseException) -> str:
    return str(error) if isinstance(error, StartFailed) else f"{type(error).__name__}: {error}"


def _settled(task: asyncio.Task[Any]) -> None:
    """Mark a background task's outcome as seen: its caller may have stopped waiting."""
    if not task.cancelled():
        task.exception()
