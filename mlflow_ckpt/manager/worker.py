"""The background worker that runs saves (and metric logging) off the training thread.

One daemon thread processes jobs in order. At most one *save* is in flight: the manager
waits for the previous one before taking the next snapshot, which bounds the extra memory to
one host copy of the state. The first error a job raises is kept and re-raised on the
training thread at the manager's next call, so failures are never silent.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

Job = Callable[[], None]


class BackgroundWorker:
    """A single ordered job queue served by one daemon thread."""

    def __init__(self, name: str) -> None:
        self._jobs: collections.deque[tuple[Job, bool]] = collections.deque()
        self._cond = threading.Condition()
        self._saves_in_flight = 0
        self._busy = False
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Job, *, is_save: bool) -> None:
        """Queue ``job``; ``is_save`` counts it towards :meth:`wait_for_saves`."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the checkpoint worker is closed")
            self._jobs.append((job, is_save))
            self._saves_in_flight += is_save
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs or self._stopping)
                if not self._jobs:
                    return
                job, is_save = self._jobs.popleft()
                self._busy = True
            try:
                job()
            except BaseException as exc:
                logger.error("Background checkpoint job failed: %s", exc)
                with self._cond:
                    if self._error is None:
                        self._error = exc
            finally:
                del job  # drop the snapshot now, not when the next job arrives
                with self._cond:
                    self._busy = False
                    self._saves_in_flight -= is_save
                    self._cond.notify_all()

    @property
    def saves_in_flight(self) -> int:
        with self._cond:
            return self._saves_in_flight

    def wait_for_saves(self) -> None:
        """Block until no save job is queued or running."""
        with self._cond:
            self._cond.wait_for(lambda: self._saves_in_flight == 0)

    def drain(self) -> None:
        """Block until every queued job has run."""
        with self._cond:
            self._cond.wait_for(lambda: not self._jobs and not self._busy)

    def take_error(self) -> BaseException | None:
        """Return (and forget) the first error a job raised since the last call."""
        with self._cond:
            error, self._error = self._error, None
            return error

    def stop(self) -> None:
        """Run what is queued, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()
