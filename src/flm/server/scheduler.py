"""Continuous batching: one worker thread owns the model and steps every running sequence
together. A request joins between steps: its prompt is prefilled alone, a chunk at a time
(`Backend.prefill_chunk` tokens) between two steps of the running sequences, so that a long
prompt delays their next tokens by one chunk, not by its whole prefill. A request leaves when it
finishes or its client goes away, and each has its own KV cache.

Requests beyond `max_batch` wait in a bounded queue; past that, `submit` refuses (HTTP 429).
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..backends import Backend
from ..generate import Sequence

log = logging.getLogger("flm")


def _release_freed_memory() -> None:
    """glibc keeps freed heap pages; malloc_trim hands them back (a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class QueueFull(Exception):
    """More requests than running slots plus queue places."""


@dataclass
class Job:
    """A generation request. `emit(token, finish_reason)` is called from the worker thread for
    every token (finish_reason None) and once at the end (token None)."""

    sequence: Sequence
    emit: Callable[[int | None, str | None], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    def __init__(self, backend: Backend, max_batch: int = 8, max_queue: int = 32):
        self.backend = backend
        self.max_batch = max_batch
        self.waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.running: list[tuple[Job, int]] = []  # (job, last token not yet fed)
        self.prefilling: list[Job] = []  # admitted, their prompts going in a chunk at a time, oldest first
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._loop, name="flm-scheduler", daemon=True)
        self.steps = 0
        self._trimmed_at = 0

    def start(self) -> "Scheduler":
        """Run the worker in a background thread (tests, embedding). `flm serve` calls
        `run` on the main thread instead: OpenMP keeps its fast spinning thread pool only for
        the thread that created it, and the model runs markedly faster there (bench/HISTORY.md,
        "Figures that were in code comments")."""
        self._thread.start()
        return self

    def run(self) -> None:
        """Run the worker in the calling thread until `stop` is called."""
        self._loop()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    @property
    def active(self) -> int:
        return len(self.running) + len(self.prefilling) + self.waiting.qsize()

    def submit(self, job: Job) -> None:
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.max_batch} requests running and {self.waiting.maxsize} waiting") from None
        self._wake.set()

    # ------------------------------------------------------------ worker
    def _loop(self) -> None:
        torch.set_num_threads(self._threads)  # OpenMP's thread count is per calling thread
        while not self._stop.is_set():
            self._admit()
            if not self.running and not self.prefilling:
                if self.steps != self._trimmed_at:
                    _release_freed_memory()  # KV caches of finished requests go back to the OS
                    self._trimmed_at = self.steps
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception as exc:  # a bug must not kill the server: fail the running jobs, keep serving
                log.exception("decode step failed")
                for job, _ in self.running:
                    job.emit(None, f"error: {exc}")
                self.running = []
            self._prefill_chunk()

    def _finish(self, job: Job, reason: str) -> None:
        job.emit(None, reason)

    def _admit(self) -> None:
        while len(self.running) + len(self.prefilling) < self.max_batch:
            try:
                job = self.waiting.get_nowait()
            except queue.Empty:
                return
            if not job.cancelled.is_set():
                self.prefilling.append(job)

    def _prefill_chunk(self) -> None:
        """The next chunk of the oldest prompt; its first token once the prompt is in."""
        if not self.prefilling:
            return
        job = self.prefilling[0]
        if job.cancelled.is_set():
            self.prefilling.pop(0)
            self._finish(job, "cancelled")
            return
        try:
            logits = job.sequence.prefill_chunk()
            if logits is None:
                return
            self.prefilling.pop(0)
            token = job.sequence.choose(logits)
        except Exception as exc:
            self.prefilling.remove(job)
            self._finish(job, f"error: {exc}")
            return
        self._deliver(job, token)

    def _deliver(self, job: Job, token: int | None) -> None:
        """Hand a token to the client and keep the job running if it goes on."""
        seq = job.sequence
        if token is not None:
            job.emit(token, None)
        if seq.finish_reason is not None:
            self._finish(job, seq.finish_reason)
        elif job.cancelled.is_set():
            self._finish(job, "cancelled")
        else:
            self.running.append((job, token))

    def _step(self) -> None:
        live = [(job, token) for job, token in self.running if not job.cancelled.is_set()]
        for job, _ in self.running:
            if job.cancelled.is_set():
                self._finish(job, "cancelled")
        self.running = []
        if not live:
            return
        logits = self.backend.step([token for _, token in live], [job.sequence.cache for job, _ in live])
        self.steps += 1
        for row, (job, _) in enumerate(live):
            self._deliver(job, job.sequence.choose(logits[row]))
