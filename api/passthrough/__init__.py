"""The session passthrough: ``/passthrough/<hostname>/<job_id>/...`` relayed to the owner's
running session, over HTTP and WebSocket.

:mod:`.routes` holds the Litestar handler (who may pass, and to which upstream);
:mod:`.tickets` the signed links and cookies that let a browser in; :mod:`.relay` the engine
that carries the traffic (:mod:`.headers`, :mod:`.http_relay` over :mod:`.http_pool`,
:mod:`.websocket_relay`, :mod:`.upstream`, :mod:`.common`). The handler is imported from
:mod:`.routes` itself, so that importing the engine or the tickets needs no Litestar or
database.
"""

from api.passthrough.common import NOT_ANSWERING
from api.passthrough.relay import PassthroughRelay
from api.passthrough.tickets import TICKET_PARAM, make_ticket
from api.passthrough.upstream import Upstream

__all__ = ["NOT_ANSWERING", "TICKET_PARAM", "PassthroughRelay", "Upstream", "make_ticket"]
