"""Published model versions: where they live, which one is current, what each one writes.

``beat model publish DIR`` copies a model directory to ``BEAT_DATA_DIR/models/<version>/``
(never changed once written) and, once its feature view is registered and backfilled,
names it in ``BEAT_DATA_DIR/models/CURRENT``, a one-line file replaced by an atomic rename.
Encoder workers that follow the current version read that file between micro-batches.

Why a file and not a topic: every encoder must read the new version's weights from the
versions folder anyway (a shared volume in production), so the pointer lives beside them.
The rename makes the switch atomic, a reader never sees a half-written name, and the file
cannot name a version whose copy is not complete (the copy is renamed into place first).
A topic would add a second thing to keep in step with the files and could announce a
version an encoder cannot load yet.

Each version writes only its own Feast feature view, ``user_embedding_<slug>``, with its
own consumer group, ``<prefix>-encoders-<slug>``: the group's committed offsets say how far
that version's view is up to date, so a backfill hands over to the live encoders exactly
where it stopped, and two versions run side by side (shadow) without sharing offsets.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from stream.config import Settings

CURRENT_SERVICE = "user_embedding_current"  # the feature service readers pin
VIEW_PREFIX = "user_embedding_"
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def slug(version: str) -> str:
    """The version in Feast and consumer-group names: lower case, runs of other characters
    as one underscore (beat-small-1a2b3c4d: beat_small_1a2b3c4d)."""
    return re.sub(r"[^a-z0-9]+", "_", version.lower()).strip("_")


def view_name(version: str) -> str:
    return VIEW_PREFIX + slug(version)


def version_group(settings: Settings, version: str) -> str:
    return f"{settings.encoder_group}-{slug(version)}"


class ModelVersions:
    """The versions folder of a deployment: BEAT_DATA_DIR/models/."""

    def __init__(self, settings: Settings) -> None:
        self.root = settings.data_dir / "models"
        self._current = self.root / "CURRENT"

    def path(self, version: str) -> Path:
        return self.root / version

    def published(self) -> list[str]:
        """Every version copied here, oldest name first (temporaries of a copy left out)."""
        if not self.root.is_dir():
            return []
        names = (p.name for p in self.root.iterdir() if p.is_dir())
        return sorted(name for name in names if _VERSION.fullmatch(name))

    def current(self) -> str | None:
        """The current version, or None before the first publish. Read between micro-batches:
        a tiny file, so no watcher thread is needed."""
        try:
            return self._current.read_text().strip() or None
        except FileNotFoundError:
            return None

    def resolve(self, name: str) -> str:
        """The published version a name (the version, or its slug) stands for; ValueError
        listing the published ones when none does."""
        found = [v for v in self.published() if name in (v, slug(v))]
        if not found:
            raise ValueError(f"model version {name!r} is not published here ({self.root}); "
                             f"published: {', '.join(self.published()) or 'none'}")
        return found[0]

    def add(self, model_dir: Path, version: str) -> Path:
        """Copy model_dir here as version (kept as it is when already there)."""
        if not _VERSION.fullmatch(version):
            raise ValueError(f"model version {version!r} cannot name a folder: use letters, "
                             "digits, '.', '_' and '-' (save_pretrained(model_version=...))")
        clash = [v for v in self.published() if v != version and slug(v) == slug(version)]
        if clash:
            raise ValueError(f"model version {version!r} would share the feature view "
                             f"{view_name(version)} with the published {clash[0]!r}")
        target = self.path(version)
        if not target.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
            shutil.copytree(model_dir, staging, dirs_exist_ok=True)
            staging.rename(target)  # complete or absent: never a half-copied version
        return target

    def make_current(self, version: str) -> None:
        with tempfile.NamedTemporaryFile("w", dir=self.root, prefix=".tmp-", delete=False) as f:
            f.write(version + "\n")
        os.replace(f.name, self._current)
