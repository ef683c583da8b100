"""imd's admin endpoint (metrics, health, readiness, the admin API and page) and the
operations it shares with ``imdctl``."""
