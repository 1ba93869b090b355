"""The guest-host scheduling protocol (docs/protocol.md), without IO.

model: the values exchanged. channel + connection: the JSON-lines channel,
as bytes in -> events out. region + session: the shared region's byte
layout and the sans-IO sessions that drive it. liveness: link state and
heartbeats, shared by both. Everything a transport or a peer needs is named
here: each module lists its share in its own __all__. Other names, and those
beginning with an underscore, are not part of the surface.
"""

from guestagent.protocol import (
    channel,
    connection,
    errors,
    liveness,
    messages,
    model,
    negotiation,
    region,
    session,
)
from guestagent.protocol.channel import *  # noqa: F403
from guestagent.protocol.connection import *  # noqa: F403
from guestagent.protocol.errors import *  # noqa: F403
from guestagent.protocol.liveness import *  # noqa: F403
from guestagent.protocol.messages import *  # noqa: F403
from guestagent.protocol.model import *  # noqa: F403
from guestagent.protocol.negotiation import *  # noqa: F403
from guestagent.protocol.region import *  # noqa: F403
from guestagent.protocol.session import *  # noqa: F403

# The surface is what each module lists in its own __all__, next to the definitions.
__all__ = [*model.__all__, *errors.__all__, *liveness.__all__, *negotiation.__all__,
           *channel.__all__, *messages.__all__, *connection.__all__, *region.__all__,
           *session.__all__]
