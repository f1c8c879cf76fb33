"""Destinations of metered calls: the local ledger, and later the remote cost tracker."""
