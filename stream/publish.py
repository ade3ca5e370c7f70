"""`beat model publish` and `beat model switch`: the deploy steps of a model version.

publish DIR, in this order, so that whatever step fails, readers and encoders keep the
version they had and the command can simply be run again:

1. load the model and check it against the settings: a directory that does not load or
   fit is refused before anything changes;
2. copy it to the versions folder (stream/model_versions.py) and register the Feast
   objects, with a view of its own (feature_repo/definitions.py defines one per version);
3. backfill that view from beat.windows (stream/refresh.py), committing the version's
   consumer group as it goes, while the current version's encoders keep the current view
   fresh and readers keep reading it;
4. switch, unless ``shadow``: name the version in CURRENT (the encoders that follow it
   move over between micro-batches and carry on from where the backfill stopped) and
   point the service ``user_embedding_current`` at its view.

A shadow version is published but not current: run an encoder pinned to it
(``beat encode --model-version V``, its own group and view) beside the current ones, compare
the two views, and ``beat model switch V`` when it should serve.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stream.config import Settings
from stream.encoder_worker import EncoderWorker, load_encoder
from stream.feast_sink import FeatureSink, register
from stream.model_versions import ModelVersions, version_group, view_name
from stream.refresh import RefreshSummary, backfill


@dataclass
class Published:
    version: str
    backfill: RefreshSummary | None  # None: it was current already, nothing was done
    current: bool


def publish(
    settings: Settings, model_dir: Path, shadow: bool = False, progress: bool = True
) -> Published:
    versions = ModelVersions(settings)
    encoder = load_encoder(settings, model_dir, "beat model publish ")
    version = encoder.model_version
    if version == versions.current():
        # A backfill now would race the version's own encoders over the same rows.
        return Published(version, None, True)
    versions.add(model_dir, version)
    register(settings)
    sink = FeatureSink(settings, view_name(version), deploy=False)
    worker = EncoderWorker(settings, encoder, sink, version_group(settings, version))
    try:
        summary = backfill(settings, worker, progress)
    finally:
        worker.close()
    if not shadow:
        switch(settings, version)
    return Published(version, summary, not shadow)


def switch(settings: Settings, name: str) -> str:
    """Make a published version (its name or slug) current: the encoders' pointer, then
    the readers' service. ValueError when it is not published."""
    versions = ModelVersions(settings)
    version = versions.resolve(name)
    versions.make_current(version)
    register(settings)  # user_embedding_current follows CURRENT
    return version
