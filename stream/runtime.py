"""One runtime for every worker: the consumer loop and all that goes around it.

A worker is its processing (``Processing``): what it does with the records taken, what it
does when partitions come and go, and what it reports. ``WorkerRuntime`` owns the rest, the
same for every worker, in the spirit of Quix Streams' Application:

- the clients: a consumer-group member, and one producer (``CheckedProducer``: a message
  the broker did not take raises), with ``ClientErrors`` as their error callback, so a
  fatal client error, or a broker unreachable for BEAT_BROKER_TIMEOUT_MS, ends the run
  with BrokerError (exit code 3 from the CLI);
- the loop: take a batch (``Batching``), hand its records to the processing, let it
  process them, then let it do what it does between batches (the encoder follows model
  versions); a summary in the log every ``report_every_s``;
- rebalances: the processing's hooks first, then readiness (``/readyz``, the ready file);
- stop: ``stop()`` (SIGINT/SIGTERM under ``stop_on_signals``) ends the loop after the batch
  in hand; from then on a flush waits for the broker at most BEAT_STOP_GRACE_MS;
- commit: only once every message produced so far is delivered (``commit``);
- what it shows: the status server (stream/observability.py) while the loop runs, stage
  timers, and the liveness behind ``/healthz``: the loop's turns, each stage's end and each
  wait of ``pause`` count as signs of life.

Nothing of a batch is committed unless the whole batch got through: an error ends the run,
the producer's queue is dropped, and a restart reads the batch again (at-least-once).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from stream.broker import (
    BrokerError,
    CheckedProducer,
    ClientErrors,
    DeliveryError,
    consumer_config,
    records_in,
)
from stream.config import Settings
from stream.observability import WorkerMetrics, serving

log = logging.getLogger(__name__)


class Processing(Protocol):
    """A worker's own part: what the runtime hands it and asks of it."""

    def take(self, records: list[Message]) -> None:
        """Add records (errors and end-of-partition reports removed) to the batch in hand."""

    def process_taken(self) -> None:
        """Process the batch in hand, if any, and commit it (WorkerRuntime.commit); called
        after every take, whether or not it brought records."""

    def backlog(self) -> bool:
        """Whether records taken are still waiting after process_taken (the encoder works
        through its pending users a step at a time): the next take then waits for nothing
        and gives only what is already fetched."""

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        """Make the partitions usable (a stream worker restores their state) before they
        count as ready."""

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        """The partitions move to another member: finish or give up what came from them."""

    def on_lost(self, partitions: list[TopicPartition]) -> None:
        """The group moved on without this member: drop what came from the partitions."""

    def between_batches(self) -> None:
        """After a batch is committed (or given up), before the next is taken."""

    def summary(self) -> str:
        """The worker's counts for the log (the runtime adds the stage times)."""

    def release(self) -> None:
        """Let go of what the processing holds (state stores) once the run ends."""


@dataclass(frozen=True)
class Batching:
    """How a batch is taken. consume() waits up to ``first_wait_s`` for the first message
    (not at all while the processing has a backlog), then asks for up to ``step`` at a
    time; more are taken, up to ``most`` in all, until ``fill_s`` after the first ones
    came, and beyond that while each call comes back full (the messages are fetched
    already: the worker is behind)."""

    first_wait_s: float
    fill_s: float
    step: int
    most: int


@dataclass
class StageTimes:
    """Seconds and runs of each stage since the start (bench/ reads them), and a summary of
    those since the previous summary, for the log."""

    seconds: Counter = field(default_factory=Counter)
    runs: Counter = field(default_factory=Counter)
    _reported: tuple[Counter, Counter] = field(default_factory=lambda: (Counter(), Counter()))

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds
        self.runs[name] += 1

    def summary(self) -> str:
        seconds, runs = self.seconds - self._reported[0], self.runs - self._reported[1]
        self._reported = (self.seconds.copy(), self.runs.copy())
        return " ".join(f"{name}={1000 * s / runs[name]:.1f}" for name, s in seconds.items())


class WorkerRuntime:
    """Runs a Processing as a member of a consumer group on topics; see the module
    docstring for what it owns."""

    def __init__(
        self,
        settings: Settings,
        processing: Processing,
        *,
        name: str,
        group: str,
        topics: list[str],
        batching: Batching,
        metrics: WorkerMetrics,
        consumer_settings: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.processing = processing
        self.name = name  # of the worker, in the log
        self.topics = topics
        self.batching = batching
        self.metrics = metrics
        self.consumer_settings = consumer_settings or {}
        self.client_errors = ClientErrors(settings)
        self.group = group
        self.consumer = self._consumer(group)
        self.producer = CheckedProducer(
            settings, error_cb=self.client_errors, **{"batch.size": 1 << 20}
        )
        self.stages = StageTimes()
        self.stopping = threading.Event()
        self.stop_asked = 0.0  # time.monotonic() of the first stop()
        self.revoked = False  # partitions moved since the batch in hand was taken

    # -- the run --------------------------------------------------------------------------

    def run(self, report_every_s: float = 10.0, ready_file: Path | None = None) -> None:
        """Take and process batches until stop(), then leave the group and wait for what is
        still queued. ready_file is created once partitions are held and usable."""
        if ready_file is not None:
            self.metrics.ready_file = ready_file
        self.metrics.beat()
        self._subscribe()
        try:
            with serving(self.settings, self.metrics):
                self._loop(report_every_s)
            self.close()
        except BaseException as err:
            self.producer.purge()  # nothing of the batch is committed: drop what is unsent
            said = self._exit_error(err)
            if said is err:
                raise
            raise said from None
        finally:
            self.processing.release()

    def _loop(self, report_every_s: float) -> None:
        next_report = time.monotonic() + report_every_s
        while not self.stopping.is_set():
            self.metrics.beat()
            self.client_errors.check(self.consumer)
            self.take_batch()
            self.processing.process_taken()
            self.processing.between_batches()
            if time.monotonic() >= next_report:
                log.info("%s: %s", self.name, self.summary())
                next_report += report_every_s
        log.info("%s: stopping: %s", self.name, self.summary())

    def summary(self) -> str:
        return f"{self.processing.summary()}; ms per stage run: {self.stages.summary()}"

    def _exit_error(self, err: BaseException) -> BaseException:
        """What the run ends with: BrokerError, said in a line by the CLI, for what a
        restart cures (a fatal client error, a delivery that failed); others as they are."""
        if isinstance(err, KafkaException):
            fatal = self.client_errors.fatal_error(err)
            if fatal is not None:
                return fatal
        if isinstance(err, DeliveryError):
            return BrokerError(f"{err.args[0].str()}: the batch is not committed, a restart "
                               "reads it again; exiting for a clean restart")  # fmt: skip
        return err

    def stop(self) -> None:
        """End the run after the batch in hand (callable from a signal handler or a thread)."""
        self.stop_asked = self.stop_asked or time.monotonic()
        self.stopping.set()

    def close(self) -> None:
        """Leave the group (the partitions move at once), then wait for what is still
        queued: DeliveryError if the broker does not take it (see flush)."""
        self.consumer.close()
        self.flush()

    # -- taking a batch -------------------------------------------------------------------

    def take_batch(self) -> bool:
        """Hand the processing one batch of records, as Batching says; whether any message
        came."""
        self.revoked = False
        batching = self.batching
        # consume(n, timeout) returns only once it has n messages or the timeout passed:
        # asking for one returns with the first, where asking for a step would wait out
        # first_wait_s whenever fewer than a step arrive (the stream worker's batches took
        # 0.6 s at 1,000 events/s instead of one 0.1-s interval).
        taken = self._consume(1, 0.0 if self.processing.backlog() else batching.first_wait_s)
        if not taken:
            return False
        deadline = time.monotonic() + batching.fill_s
        while taken < batching.most and not self.stopping.is_set():
            asked = min(batching.step, batching.most - taken)
            got = self._consume(asked, max(deadline - time.monotonic(), 0))
            taken += got
            if got < asked and time.monotonic() >= deadline:
                break
        return True

    def _consume(self, count: int, timeout_s: float) -> int:
        messages = self.consumer.consume(count, timeout_s)
        if messages:
            self.processing.take(records_in(messages))
        return len(messages)

    # -- what the processing calls --------------------------------------------------------

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage of the processing: log summary, metrics, and a sign of life."""
        start = time.perf_counter()
        yield
        took = time.perf_counter() - start
        self.stages.add(name, took)
        self.metrics.observe_stage(name, took)

    def pause(self, seconds: float) -> bool:
        """Wait (a retry's backoff) while staying alive; True once the worker is stopping."""
        self.metrics.beat()
        return self.stopping.wait(seconds)

    def flush(self) -> None:
        """Wait until the broker has taken every message produced. DeliveryError for one it
        did not take, for a broker that takes none for BEAT_BROKER_TIMEOUT_MS, or once the
        worker has been stopping for BEAT_STOP_GRACE_MS: a frozen broker must not hold a
        stopped worker for the whole broker timeout."""
        started, grace_s = time.monotonic(), self.settings.stop_grace_ms / 1000
        while queued := self.producer.wait(0.1):
            if (fatal := self.client_errors.fatal_error()) is not None:
                raise fatal
            now = time.monotonic()
            if self.stopping.is_set() and now - self.stop_asked > grace_s:
                self._undelivered(f"stopped with {queued} messages unacknowledged by the broker "
                                  f"after {grace_s:g}s (BEAT_STOP_GRACE_MS)")  # fmt: skip
            if now - started > self.client_errors.timeout_s:
                self._undelivered(f"the broker did not acknowledge {queued} messages in "
                                  f"{now - started:.0f}s (BEAT_BROKER_TIMEOUT_MS)")  # fmt: skip
        self.producer.flush(0)  # raises DeliveryError for any that failed

    @staticmethod
    def _undelivered(why: str) -> None:
        raise DeliveryError(KafkaError(KafkaError._MSG_TIMED_OUT, why))

    def commit(self, offsets: list[TopicPartition]) -> None:
        """Commit the offsets once every message produced so far is delivered (flush). A
        commit the group refuses (a rebalance moved the partitions) is logged: their new
        owners read those records again."""
        self.flush()
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as err:
            if self.client_errors.fatal_error(err) is not None:
                raise
            log.warning("%s: commit refused (%s); the records are read again", self.name, err)

    def rejoin(self, group: str) -> None:
        """Leave the group for another one, with a new consumer (the encoder: the group of a
        model version made current)."""
        self.consumer.close()  # leaves the old group at once
        self.group = group
        self.consumer = self._consumer(group)
        self._subscribe()

    # -- the consumer and rebalances ------------------------------------------------------

    def _consumer(self, group: str) -> Consumer:
        return Consumer(consumer_config(
            self.settings, group, error_cb=self.client_errors, **self.consumer_settings,
            **self.metrics.consumer_settings(self.settings),
        ))  # fmt: skip

    def _subscribe(self) -> None:
        self.consumer.subscribe(
            self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def _on_assign(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        self.processing.on_assign(partitions)
        numbers = sorted({tp.partition for tp in partitions})
        log.info("%s: assigned %s", self.name, numbers)
        self.metrics.partitions_assigned(numbers)

    def _on_revoke(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        self.processing.on_revoke(partitions)
        self._moved(partitions)

    def _on_lost(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        self.processing.on_lost(partitions)
        self._moved(partitions)

    def _moved(self, partitions: list[TopicPartition]) -> None:
        self.revoked = True
        self.metrics.partitions_revoked(tp.partition for tp in partitions)


def stop_on_signals(stop: Callable[[], None]) -> None:
    """SIGINT and SIGTERM call stop(): the worker finishes the batch in hand, commits it
    and leaves its group."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop())
