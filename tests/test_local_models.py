"""In-process (`local`) models: where a blocking model's calls run.

`inline: auto` (the default) calls a model on the event loop once its calls prove
quicker than a thread's hand-off, and keeps any model whose calls take longer (it
computes, or waits on I/O) in threads, where it cannot hold up other callers.
"""

from __future__ import annotations

import asyncio

import numpy as np
from coalesce.adapters.local import LocalAdapter
from coalesce.config import LocalBackend

X = {"x": np.ones((1, 2), np.float32)}


def threads_of_calls(calls: int, **args) -> list[str]:
    """The thread each of `calls` calls ran in, for tests.models:thread_noting(**args)."""

    async def run() -> list[str]:
        config = {"type": "local", "model": "tests.models:thread_noting", "args": args}
        adapter = LocalAdapter("m", LocalBackend.model_validate(config))
        await adapter.load()
        try:
            for _ in range(calls):
                assert (await adapter.infer(X, None))["y"] is X["x"]
        finally:
            await adapter.close()
        return adapter.model.threads

    return asyncio.run(run())


def test_a_quick_model_is_called_on_the_loop_once_timed_in_a_thread():
    threads = threads_of_calls(20)
    assert threads[0].startswith("model-m")  # its first call timed it
    assert set(threads[1:]) == {"MainThread"}


def test_a_model_that_waits_stays_in_threads():
    threads = threads_of_calls(10, sleep_s=0.002)  # 2 ms of sleep, no CPU to speak of
    assert all(name.startswith("model-m") for name in threads)


def test_a_quick_model_that_turns_slow_goes_back_to_threads():
    threads = threads_of_calls(30, sleep_s=0.005, slow_after=10)
    assert threads[5:11] == ["MainThread"] * 6  # call 11 is the first slow one: on the loop
    assert all(name.startswith("model-m") for name in threads[11:])


def test_inline_false_keeps_a_quick_model_in_threads():
    async def run() -> list[str]:
        config = {"type": "local", "model": "tests.models:thread_noting", "inline": False}
        adapter = LocalAdapter("m", LocalBackend.model_validate(config))
        await adapter.load()
        for _ in range(10):
            await adapter.infer(X, None)
        await adapter.close()
        return adapter.model.threads

    assert all(name.startswith("model-m") for name in asyncio.run(run()))
