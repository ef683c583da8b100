"""imd: a multi-protocol instant-messaging daemon (webim, xuanxuan, minami, 66boss)."""

__version__ = "0.1.0"
