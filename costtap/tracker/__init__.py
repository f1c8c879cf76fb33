"""Where metered calls go: the local ledger today, the remote cost tracker later."""
