"""One write per WebSocket connection per reactor turn (66boss ``/entry`` and minami).

At full speed a connection is given tens of frames in one reactor turn (the acks and
deliveries of one store batch).  autobahn's ``sendMessage`` costs about 3 µs a frame (its
checks, the header, the arguments of a debug log line that is evaluated even when debug is
off, a transport write).  ``TurnFrames.send_text`` keeps a turn's frames and, when the turn
ends, frames them with autobahn's ``prepareMessage`` and hands them to the transport with one
``sendData``.  The bytes reach the socket no later than before: a transport writes only when
the reactor next polls anyway.  Nothing is lost to the delay that a transport buffer would
not lose the same way (frames given to a connection that is then lost), and a close frame
goes after the frames given before it.

The prepared frames are plain frames: the factories using this mixin never accept
permessage-deflate (autobahn refuses the offer unless ``perMessageCompressionAccept`` is
set), so no frame needs compressing.
"""

from __future__ import annotations

from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.internet.interfaces import IReactorTime


class TurnWriter:
    """The connections with frames waiting, written together at the end of the turn (one
    per factory: connections of a factory share it)."""

    def __init__(self, clock: IReactorTime):
        self._clock = clock
        self._waiting: list[TurnFrames] = []

    def wait(self, connection: TurnFrames) -> None:
        self._waiting.append(connection)
        if len(self._waiting) == 1:
            self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        waiting, self._waiting = self._waiting, []
        for connection in waiting:
            connection.flush_frames()


class TurnFrames(WebSocketServerProtocol):
    """A WebSocket server protocol whose text frames go out once per turn; its factory has a
    ``turn_writer``."""

    turn_frames: list[bytes] | None = None  # class default: an idle connection keeps none

    def send_text(self, payload: bytes) -> bool:
        """Send ``payload`` as a text frame at the end of this turn; False if the connection
        is no longer open (nothing was taken)."""
        if self.state != self.STATE_OPEN:
            return False
        frames = self.turn_frames
        if frames is None:
            self.turn_frames = [payload]
            self.factory.turn_writer.wait(self)
        else:
            frames.append(payload)
        return True

    def flush_frames(self) -> None:
        frames = self.turn_frames
        if frames is None:
            return
        del self.turn_frames
        if self.state == self.STATE_OPEN:
            prepare = self.factory.prepareMessage
            self.sendData(b"".join([prepare(frame).payloadHybi for frame in frames]))

    def sendClose(self, *args, **kwargs):
        self.flush_frames()  # what was given before the close goes before it
        return super().sendClose(*args, **kwargs)
