"""How passes are shown: listings, JSON, action logs, progress bars, logging setup."""
