"""``smtpq serve``: one process, or a supervisor and its workers (``workers = N > 1``).

The supervisor takes every shard's lock and checks the admin sockets and the listening
addresses before it starts anything (:func:`~smtpq.daemon.server.preflight`): a second daemon
on the same queue refuses at once, and the running one is left as it was. Each worker is
started with the descriptors of its shards' locks (``pass_fds``), so a shard stays locked while
any process of the daemon lives, and a restarted worker gets its lock from the supervisor
rather than racing anyone for it.

Workers die with the supervisor: between fork and exec each asks the kernel for SIGKILL when
its parent dies (``PR_SET_PDEATHSIG``), then checks that its parent is still the supervisor
(which closes the race with a supervisor that died first). A worker that dies is restarted
after a back-off that grows while it keeps dying young (:func:`restart_delay`). The supervisor
exits when asked (SIGTERM/SIGINT: passed on to the workers, which finish their attempts; exit
0), or when a worker cannot start at all (its exit code 2: the others are stopped, exit 2).
SIGHUP is validated here first (a broken file is logged and goes no further), then passed on:
each worker applies what changes live, and workers restarted later run with the supervisor's
effective configuration, not with whatever the file says by then.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from smtpq.daemon.config import Config, ConfigError, ConfigSource
from smtpq.daemon.errors import StartupError
from smtpq.daemon.logs import configure_logging
from smtpq.daemon.notify import Notifier
from smtpq.daemon.reload import plan_reload
from smtpq.daemon.render import render_config
from smtpq.daemon.server import Shard, preflight, shards
from smtpq.daemon.worker import WorkerSpec, run_daemon
from smtpq.storage.lock import ShardLock

__all__ = ["Supervisor", "die_with_parent", "restart_delay", "serve_forever"]

log = logging.getLogger(__name__)

#: A worker that dies sooner than this after its start counts as failing again.
STABLE_AFTER = 30.0
#: After SIGTERM, workers get their grace period and this much more before SIGKILL.
STOP_MARGIN = 15.0
#: A worker's program: imported by name, so that its module is not also ``__main__``.
WORKER_MAIN = "from smtpq.daemon.worker import main; raise SystemExit(main())"
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def restart_delay(failures: int, *, first: float = 0.5, longest: float = 30.0) -> float:
    """Seconds before restarting a worker that died after ``failures`` early deaths in a row
    (each within :data:`STABLE_AFTER` of its start): half a second at first, doubling with each
    early death, at most half a minute."""
    return min(longest, first * 2.0 ** max(0, failures))


def die_with_parent(parent: int) -> None:
    """In a new child, between fork and exec: SIGKILL when the parent dies.

    The request survives exec. If the parent died before it was made, the child is already
    an orphan (its parent pid changed): it exits at once. SIGHUP is ignored until the worker
    installs its own handler (an ignored signal stays ignored across exec): a reload during
    its start must not kill it.
    """
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def serve_forever(config: Config, source: ConfigSource | None = None) -> int:
    """Run the daemon (or supervise its workers) until SIGTERM/SIGINT; the exit code.

    A start-up failure is one line on standard error and exit code 2.
    """
    # Until a handler is in place a SIGHUP would end the process: ignore it meanwhile.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    configure_logging(config.log_level, config.log_format)
    source = source or ConfigSource()
    notifier = Notifier.from_environment()
    if config.workers > 1:
        return Supervisor(config, source, notifier).run()
    owned = shards(config)
    try:
        locks = preflight(config, owned)
    except StartupError as exc:
        print(f"smtpq: {exc}", file=sys.stderr, flush=True)
        return 2

    tell = {
        "ready": notifier.ready,
        "reloading": notifier.reloading,
        "reloaded": notifier.ready,
        "stopping": notifier.stopping,
    }
    try:
        return run_daemon(config, owned, source=source, events=lambda event: tell[event]())
    finally:
        for lock in locks.values():
            lock.release()


@dataclass
class _Slot:
    """One worker's place: the process now in it and its history."""

    index: int
    shards: list[Shard]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    ready: bool = False
    failures: int = 0
    restart_at: float | None = None


class Supervisor:
    """Starts ``config.workers`` worker processes and keeps them running (see the module)."""

    def __init__(self, config: Config, source: ConfigSource, notifier: Notifier) -> None:
        self.config = config
        self.source = source
        self.notifier = notifier
        self.stopping = False
        self.exit_code = 0
        self._signals: list[int] = []
        self._locks: dict[int, ShardLock] = {}
        self._slots: list[_Slot] = []
        self._announced = False
        self._reloading: set[int] = set()
        self._kill_at: float | None = None
        self._status = -1
        self._status_w = -1

    def run(self) -> int:
        """Supervise until asked to stop or until a worker cannot start; the exit code."""
        n = self.config.workers
        owned = {s.index: s for worker in range(n) for s in shards(self.config, worker, n)}
        try:
            self._locks = preflight(self.config, list(owned.values()))
        except StartupError as exc:
            print(f"smtpq: {exc}", file=sys.stderr, flush=True)
            return 2
        self._slots = [
            _Slot(i, [s for k, s in sorted(owned.items()) if k % n == i]) for i in range(n)
        ]
        self._status, self._status_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._status, False)
        wake, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            for slot in self._slots:
                self._start(slot)
            self._loop(wake)
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for fd in (wake, wake_w, self._status, self._status_w):
                os.close(fd)
            for lock in self._locks.values():
                lock.release()
        return self.exit_code

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def _loop(self, wake: int) -> None:
        while True:
            now = time.monotonic()
            due = [s.restart_at for s in self._slots if s.restart_at is not None]
            if self._kill_at is not None:
                due.append(self._kill_at)
            timeout = max(0.0, min(due) - now) if due else None
            readable, _, _ = select.select([wake, self._status], [], [], timeout)
            if wake in readable:
                _drain(wake)
            while self._signals:
                self._handle_signal(self._signals.pop(0))
            if self._status in readable:
                self._read_status()
            self._reap()
            self._restart_due()
            if self.stopping and all(s.proc is None for s in self._slots):
                return

    # -- signals -----------------------------------------------------------------------------

    def _handle_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            if not self.stopping:
                log.info("%s: stopping the workers", signal.Signals(signum).name)
                self._stop(signum)
        elif signum == signal.SIGHUP and not self.stopping:
            self._reload()

    def _stop(self, signum: int) -> None:
        self.stopping = True
        self.notifier.stopping()
        self._kill_at = time.monotonic() + self.config.grace_period + STOP_MARGIN
        for slot in self._slots:
            slot.restart_at = None
            if slot.proc is not None:
                slot.proc.send_signal(signum)

    def _reload(self) -> None:
        try:
            new = self.source.load()
        except ConfigError as exc:
            log.error("reload failed: configuration error: %s; running on unchanged", exc)
            return
        except Exception:  # a reload never takes the daemon down
            log.exception("reload failed; running on unchanged")
            return
        self.notifier.reloading()
        self.config = plan_reload(self.config, new).config
        configure_logging(self.config.log_level, self.config.log_format)
        self._reloading = {s.index for s in self._slots if s.proc is not None and s.ready}
        for slot in self._slots:
            if slot.index in self._reloading and slot.proc is not None:
                slot.proc.send_signal(signal.SIGHUP)
        self._check_reloaded()

    # -- workers -----------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        spec = WorkerSpec(
            index=slot.index,
            workers=len(self._slots),
            config=render_config(self.config),
            source_path=self.source.path,
            source_overrides=dict(self.source.overrides),
            locks={s.index: self._locks[s.index].fileno for s in slot.shards if s.path},
            status_fd=self._status_w,
        )
        slot.restart_at = None
        slot.ready = False
        slot.started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_MAIN],
            stdin=subprocess.PIPE,
            pass_fds=[*spec.locks.values(), self._status_w],
            preexec_fn=functools.partial(die_with_parent, os.getpid()),
        )
        assert proc.stdin is not None
        try:
            proc.stdin.write(spec.to_json())
            proc.stdin.close()
        except BrokenPipeError:  # it died at once: reaped and reported like any other exit
            pass
        slot.proc = proc
        log.info("worker %d started: pid %d", slot.index, proc.pid)

    def _read_status(self) -> None:
        try:
            data = os.read(self._status, 65536)
        except BlockingIOError:
            return
        for line in data.decode("ascii", "replace").splitlines():
            index, _, event = line.partition(" ")
            if not index.isdigit() or int(index) >= len(self._slots):
                continue
            slot = self._slots[int(index)]
            if event == "ready":
                slot.ready = True
            self._reloading.discard(slot.index)
        if not self._announced and all(s.ready for s in self._slots):
            self._announced = True
            log.info("all %d workers ready", len(self._slots))
            self.notifier.ready()
        else:
            self._check_reloaded()

    def _check_reloaded(self) -> None:
        if self._announced and not self._reloading:
            self.notifier.ready()

    def _reap(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if slot.proc is None or (code := slot.proc.poll()) is None:
                continue
            pid, slot.proc, slot.ready = slot.proc.pid, None, False
            self._reloading.discard(slot.index)
            if self.stopping:
                log.info("worker %d (pid %d) %s", slot.index, pid, _exit_text(code))
                continue
            if code == 2:
                log.error("worker %d (pid %d) cannot start; stopping the daemon", slot.index, pid)
                self.exit_code = 2
                self._stop(signal.SIGTERM)
                continue
            early = now - slot.started < STABLE_AFTER
            if not early:
                slot.failures = 0
            delay = restart_delay(slot.failures)
            slot.failures += early
            slot.restart_at = now + delay
            log.warning(
                "worker %d (pid %d) %s; restarting it in %.1f s",
                slot.index, pid, _exit_text(code), delay,
            )  # fmt: skip
        if self._kill_at is not None and now >= self._kill_at:
            for slot in self._slots:
                if slot.proc is not None:
                    log.error("worker %d (pid %d) did not stop in time: killed", slot.index,
                              slot.proc.pid)  # fmt: skip
                    slot.proc.kill()
                    self.exit_code = self.exit_code or 1
            self._kill_at = None

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if slot.restart_at is not None and slot.restart_at <= now:
                self._start(slot)

    def _start(self, slot: _Slot) -> None:
        if self.stopping:
            return
        try:
            self._spawn(slot)
        except (OSError, subprocess.SubprocessError) as exc:
            log.error("cannot start worker %d: %s; stopping the daemon", slot.index, exc)
            self.exit_code = 2
            self._stop(signal.SIGTERM)


def _drain(fd: int) -> None:
    """Read a non-blocking pipe empty (the signal wake-up bytes: the handler kept the rest)."""
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass


def _exit_text(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"
