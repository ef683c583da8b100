"""xuanxuan 1.0 as a child service of the daemon: the socket listener (``--xuanxuan``) and
its HTTP side (getconfig, files) on the web port."""

from __future__ import annotations

from twisted.web import resource

from imd.chats import Chats
from imd.compose import Listener, ProtocolService
from imd.protocols.xuanxuan import http
from imd.protocols.xuanxuan.socket import XuanxuanService, socket_factory


class XuanxuanProtocolService(ProtocolService):
    name = "xuanxuan"
    web_routes = "xuanxuan HTTP"
    upload_paths = http.UPLOAD_MARKERS
    socket_port = 0  # where the socket listens (getconfig tells clients), once it does

    def build(self) -> None:
        daemon = self.daemon
        self.xuanxuan = XuanxuanService(daemon.hub, daemon.accounts,
                                        Chats(daemon.hub.store, daemon.groups), daemon.config)

    def mount(self, root: resource.Resource) -> None:
        http.mount(root, http.XuanxuanHttp(self.xuanxuan, self.daemon.data_dir / "files",
                                           lambda: self.socket_port))

    def listeners(self) -> list[Listener]:
        return [Listener(self.daemon.config.xuanxuan, socket_factory(self.xuanxuan),
                         "xuanxuan socket", listening=self._listening)]

    def _listening(self, port) -> None:
        self.socket_port = getattr(port.getHost(), "port", 0)

    def open_connections(self) -> int:
        return len(self.xuanxuan.connections)

    def close(self) -> None:
        self.xuanxuan.presence.stop()
        for connection in list(self.xuanxuan.connections):
            connection.transport.abortConnection()
