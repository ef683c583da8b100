"""66boss as a child service of the daemon: WebSocket ``/entry``, the group API and uploads
on the web port, the line listener (``--boss-line``), and the heartbeat signal."""

from __future__ import annotations

from twisted.application.internet import TimerService
from twisted.internet import reactor
from twisted.logger import Logger
from twisted.web import resource

from imd.compose import Listener, ProtocolService
from imd.protocols.boss import http, uploads
from imd.protocols.boss.connection import BossService
from imd.protocols.boss.line import line_factory
from imd.protocols.boss.ws import entry_resource

log = Logger()


class BossProtocolService(ProtocolService):
    name = "66boss"
    web_routes = "66boss /entry, group API, uploads"
    upload_paths = uploads.UPLOAD_PATHS

    def build(self) -> None:
        daemon = self.daemon
        self.boss = BossService(daemon.hub, daemon.accounts, daemon.groups, daemon.config,
                                reactor)
        self.boss.start()
        TimerService(daemon.config.heartbeat, self.boss.heartbeat).setServiceParent(self)
        if daemon.config.boss_auth == "trust":
            log.warn("--boss-auth=trust: 66boss clients may log in as any user id without a "
                     "token; use only on a closed network")

    def mount(self, root: resource.Resource) -> None:
        root.putChild(b"entry", entry_resource(self.boss))
        http.mount(root, self.boss)
        uploads.mount(root, self.boss, self.daemon.data_dir)

    def listeners(self) -> list[Listener]:
        return [Listener(self.daemon.config.boss_line, line_factory(self.boss),
                         "66boss line protocol")]

    def open_connections(self) -> int:
        return len(self.boss.connections)

    def close(self) -> None:
        self.boss.stop()  # every connection
