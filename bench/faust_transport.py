"""faust's aiokafka transport with a configurable fetch wait.

faust hard-codes ``fetch_max_wait_ms=1500``. Brokers that hold every fetch for its
whole max wait (Tansu, the embedded broker, does) then add up to 1.5 s to each event's
path. This transport, registered as the URL scheme ``beatkafka://``, sets the wait from
``FETCH_MAX_WAIT_MS`` (the ``fetch_max_wait_ms`` setting).
"""

from __future__ import annotations

from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as driver

SCHEME = "beatkafka"
FETCH_MAX_WAIT_MS = 10


class _ConsumerThread(driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):  # type: ignore[no-untyped-def]
        consumer = super()._create_worker_consumer(transport)
        # Read by aiokafka when the consumer starts its fetcher, which is after this.
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class _Consumer(driver.Consumer):
    def _new_consumer_thread(self) -> driver.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(driver.Transport):
    Consumer = _Consumer


def broker_url(bootstrap_servers: str, fetch_max_wait_ms: int) -> str:
    """A faust broker URL for these servers that uses this transport."""
    global FETCH_MAX_WAIT_MS
    FETCH_MAX_WAIT_MS = fetch_max_wait_ms
    TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"
    return ";".join(f"{SCHEME}://{server}" for server in bootstrap_servers.split(","))
