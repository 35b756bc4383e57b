"""The long-running daemon: scheduling, watching, systemd notify, metrics and HTTP."""
