"""minami as a child service of the daemon: its WebSocket and HTTP routes on the web port."""

from __future__ import annotations

from twisted.web import resource

from imd.compose import ProtocolService
from imd.protocols.minami import routes
from imd.protocols.minami.ws import MinamiService


class MinamiProtocolService(ProtocolService):
    name = "minami"
    web_routes = "minami /im/"

    def build(self) -> None:
        daemon = self.daemon
        self.minami = MinamiService(daemon.hub, daemon.accounts, daemon.friends, daemon.config)

    def mount(self, root: resource.Resource) -> None:
        routes.mount(root, self.minami)

    def open_connections(self) -> int:
        return len(self.minami.connections)

    def close(self) -> None:
        for connection in list(self.minami.connections):
            connection.transport.abortConnection()
