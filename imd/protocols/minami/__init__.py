"""The minami protocol: JSON over HTTP (register, friends) and a WebSocket tunnel (login,
messages), at ``/im/...`` and ``/whisperIM/...``, plus our own web chat page."""
