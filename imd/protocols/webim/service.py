"""webim as a child service of the daemon: its actions and long-poll on the web port, and
its tickets, whose polls are answered and held messages requeued at shutdown."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor
from twisted.web import resource

from imd.compose import ProtocolService
from imd.protocols.webim import routes
from imd.protocols.webim.actions import WebimActions
from imd.protocols.webim.tickets import Tickets


class WebimProtocolService(ProtocolService):
    name = "webim"
    web_routes = "webim /webim/"

    def check(self) -> str | None:
        static = self.daemon.config.webim_static
        if static and not Path(static).is_dir():
            return (f"--webim-static {static} is not a directory (give the webim client's "
                    "static/ folder itself)")
        return None

    def build(self) -> None:
        daemon = self.daemon
        config = daemon.config
        self.tickets = Tickets(daemon.hub, reactor, config.poll_timeout, config.ticket_timeout,
                               config.offline_grace, config.max_queue, config.webim_page_ttl)
        self.actions = WebimActions(daemon.hub, daemon.accounts, daemon.friends, daemon.groups,
                                    self.tickets, config.webim_secret, config.public_url,
                                    config.token_ttl)

    def mount(self, root: resource.Resource) -> None:
        routes.mount(root, self.actions, self.tickets, self.daemon.config.webim_static)

    def open_connections(self) -> int:
        return len(self.tickets.by_id)  # bound tickets: one per open browser tab

    def close(self) -> None:
        self.tickets.close_all()
