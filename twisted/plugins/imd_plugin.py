"""twistd plugin: ``twistd -n imd`` runs the imd daemon (see ``twistd imd --help``)."""

from zope.interface import implementer

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin

from imd.config import Options
from imd.endpoints import SystemdTLSParser


@implementer(IServiceMaker, IPlugin)
class ImdServiceMaker:
    tapname = "imd"
    description = "Multi-protocol instant-messaging daemon (webim, xuanxuan, minami, 66boss)."
    options = Options

    def makeService(self, options):
        from imd.service import make_service

        return make_service(options.config)


serviceMaker = ImdServiceMaker()

# The systemd-tls: server endpoint (TLS on a socket from socket activation).
systemdTLS = SystemdTLSParser()
