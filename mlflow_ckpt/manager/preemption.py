"""The scheduler's warning: a preemption signal becomes a checkpoint at the next step.

Kubernetes, SLURM (``--signal``), spot VMs and ``torchrun``'s agent warn a job with a signal
(usually SIGTERM) some seconds before they kill it. Without a handler the process dies at
once and loses everything since its last periodic checkpoint. :class:`PreemptionWatch`
installs a handler that only records the signal: Python runs it between two bytecodes of
the main thread, where saving could deadlock on a lock the interrupted code holds (a
logging handler, an MLflow client, the background worker's queue). The manager's next
``step()`` then saves that step synchronously (trigger ``preempted``), waits for every
pending upload and commits; only then does the process end as the signal would have: the
handler that was installed before ours is called (Lightning's, Hugging Face's, the user's),
or, where there was none, the signal's default action ends the process.

Two things end the process at once instead, losing only what was not committed (which the
kill -9 guarantees cover): a second signal, and no ``step()`` within ``preempt_grace_s`` of
the first (a hung collective with a dead peer, a step longer than the scheduler's grace), so
the watch never keeps a dying node longer than it was told to.

A handler can only be installed from the main thread; elsewhere a warning says so and the
signal keeps its previous meaning. The main thread runs Python handlers only between
bytecodes: while it is blocked inside one long native call (a collective waiting for a dead
peer), the handler, and with it the save, waits for that call to return; the grace watchdog
still ends the process in time once the handler has run.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_GRACE_S = 60.0
_UNCATCHABLE = {"SIGKILL", "SIGSTOP"}


def signals_asked(save_on_signals: Any, resume: Any) -> Any:
    """What ``save_on_signals`` asks for, its default filled in: SIGTERM with
    ``resume="auto"`` (a preemptible job), nothing otherwise."""
    if save_on_signals is not None:
        return save_on_signals
    return ("SIGTERM",) if resume == "auto" else ()


def parse_signals(value: Any) -> tuple[int, ...]:
    """``save_on_signals=`` as signal numbers: names (``"SIGTERM"``, ``"TERM"``), numbers or
    ``signal.Signals``, one or a sequence; a ``ValueError``/``TypeError`` names a bad one."""
    if value is None:
        return ()
    items: Iterable[Any] = (value,) if isinstance(value, str | int | signal.Signals) else value
    if not isinstance(items, Iterable):
        raise TypeError(f"save_on_signals must be a signal name or a list of them, not {value!r}")
    parsed: list[int] = []
    for item in items:
        parsed.append(_one_signal(item))
    return tuple(dict.fromkeys(parsed))


def _one_signal(item: Any) -> int:
    if isinstance(item, bool) or not isinstance(item, str | int | signal.Signals):
        raise TypeError(f"save_on_signals: {item!r} is not a signal name or number")
    try:
        if isinstance(item, str):
            name = item.upper() if item.upper().startswith("SIG") else f"SIG{item.upper()}"
            sig = signal.Signals[name]
        else:
            sig = signal.Signals(item)
    except (KeyError, ValueError):
        raise ValueError(
            f"save_on_signals: {item!r} is not a signal on this platform (e.g. 'SIGTERM', "
            "'SIGUSR1')"
        ) from None
    if sig.name in _UNCATCHABLE:
        raise ValueError(f"save_on_signals: {sig.name} cannot be caught, so nothing can save on it")
    return int(sig)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class PreemptionWatch:
    """Records the first of ``signals`` and ends the process if no step acts on it in time.

    ``received`` is the signal to act on (set by the handler, or by :meth:`acknowledge` when
    another rank of a distributed job got it). After the emergency save, :meth:`leave`
    gives the signal to what would have handled it without us.
    """

    def __init__(self, signals: tuple[int, ...], grace_s: float, run_id: str) -> None:
        self.signals = signals
        self.grace_s = grace_s
        self.run_id = run_id
        self.received: int | None = None
        self._previous: dict[int, Any] = {}  # the handlers ours replaced, by signal
        self._armed = threading.Event()  # a signal came: the grace period runs
        self._done = threading.Event()  # acted on (or given up): the watchdog stands down
        self._released = False
        self._passing = False  # inside leave(): a handler chaining back to ours is a no-op

    def install(self) -> None:
        """Put our handler on every watched signal (main thread only; else a warning)."""
        if not self.signals:
            return
        if threading.current_thread() is not threading.main_thread():
            names = ", ".join(signal_name(s) for s in self.signals)
            message = (
                f"save_on_signals ({names}) is not handled for run {self.run_id}: signal "
                "handlers can only be installed from the main thread, and this manager was "
                "built on another. A preemption signal keeps its previous meaning."
            )
            logger.warning("%s", message)
            warnings.warn(message, stacklevel=4)
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        name = f"mlflow-ckpt-preempt-{self.run_id[:8]}"
        threading.Thread(target=self._watch, name=name, daemon=True).start()

    def _handle(self, signum: int, frame: Any) -> None:
        """The signal handler: record the signal; a second one ends the process now.

        Once released it stands for the handler it replaced: a framework that saved ours as
        its "original" (Lightning restores its originals after ``fit``) still gets the old
        meaning of the signal from it."""
        if self._released:
            if not self._passing:
                self._hand_on(signum, frame)
            return
        if self.received is not None:
            end_now(signum, f"a second {signal_name(signum)} arrived")
        self.received = signum
        self._armed.set()

    def acknowledge(self, signum: int) -> None:
        """Act on ``signum`` although this process did not get it (another rank did)."""
        if self.received is None:
            self.received = signum
        self._armed.set()

    def _watch(self) -> None:
        self._armed.wait()
        if self._done.wait(self.grace_s):
            return
        signum = self.received or signal.SIGTERM
        end_now(
            signum,
            f"no step() saved within preempt_grace_s={self.grace_s:g}s of "
            f"{signal_name(signum)} (run {self.run_id})",
        )

    def release(self) -> None:
        """Stand the watchdog down and give each signal its previous handler back, where ours
        is still the one installed (idempotent)."""
        self._done.set()
        self._armed.set()  # a watchdog still waiting for a signal ends too
        if self._released:
            return
        self._released = True
        if not self._previous or threading.current_thread() is not threading.main_thread():
            return  # (off the main thread ours stays, standing for the previous one)
        for sig, handler in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                if signal.getsignal(sig) == self._handle:
                    signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def leave(
        self, signum: int, *, shutdown: Callable[[], None], end_run: Callable[[], None]
    ) -> None:
        """After the emergency save: do what ``signum`` would have done without the manager.

        The handler installed before ours is called (its exception, e.g. ``SystemExit``,
        propagates after ``shutdown``); an ignored signal changes nothing; otherwise
        ``shutdown`` (the lease) and ``end_run`` run and the signal's default action ends the
        process. Where the process goes on, the signal has been acted on: later steps are
        ordinary ones (and a new signal goes straight to the handler that had it before)."""
        self.release()
        previous = self._previous.get(signum, signal.SIG_DFL)
        if previous is signal.SIG_IGN:
            logger.info("%s was ignored before: training goes on", signal_name(signum))
            self.received = None
            return
        if callable(previous):
            self._passing = True
            try:
                previous(signum, inspect.currentframe())
            except BaseException:
                shutdown()
                raise
            finally:
                self._passing = False
            self.received = None
            return
        shutdown()
        end_run()
        end_now(signum, f"the checkpoint of run {self.run_id} is committed")

    def _hand_on(self, signum: int, frame: Any) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous is not signal.SIG_IGN:
            end_now(signum, "no manager watches it any more")


def end_now(signum: int, why: str) -> None:
    """End the process as ``signum``'s default action would (flushing our output first)."""
    logger.warning("Ending the process on %s: %s", signal_name(signum), why)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if threading.current_thread() is threading.main_thread():
        with contextlib.suppress(OSError, ValueError):
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)  # terminates here for every signal worth watching
    os._exit(128 + signum)  # a signal whose default is not to terminate, or another thread
