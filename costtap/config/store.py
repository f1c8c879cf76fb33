"""The apps configuration in force, replaced whole on reload.

A reload that fails validation is logged and ignored: the previous configuration stays in
force, so a typo in the file never takes attribution away from running services.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from costtap.config.apps import AppsFileError, LoadedApps, load_apps

logger = logging.getLogger(__name__)

# How often the file's modification time and size are compared, in seconds.
WATCH_INTERVAL = 1.0


class AppsStore:
    def __init__(self, apps: LoadedApps) -> None:
        self.current = apps
        self._signature = _signature(apps.path)

    def reload(self, reason: str) -> bool:
        """Load the file again; return True when the new configuration took effect."""
        path = self.current.path
        if path is None:
            return False
        self._signature = _signature(path)
        try:
            apps = load_apps(path, self.current.default_app_fallback)
        except AppsFileError as error:
            logger.error(
                "apps file reload (%s) rejected, previous configuration kept: %s", reason, error
            )
            return False
        self.current = apps
        logger.info("apps file %s reloaded (%s): %d apps", path, reason, len(apps.config.apps))
        return True

    async def watch(self) -> None:
        """Reload whenever the file's modification time or size changes."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            path = self.current.path
            if path is not None and _signature(path) != self._signature:
                self.reload("file changed")


def _signature(path: Path | None) -> tuple[float, int] | None:
    if path is None:
        return None
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_mtime, status.st_size
