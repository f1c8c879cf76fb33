"""mitmproxy addons: metering, upstream overrides and start-up checks."""
