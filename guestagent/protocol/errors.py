"""The exceptions of the protocol package, in the manner of h11.

RemoteProtocolError: bytes from the peer violate docs/protocol.md (the peer's
fault; a link counts it and goes on). LocalProtocolError: this side asked for
something the protocol does not allow, e.g. a send the connection's state
forbids or a value that cannot be encoded (our bug, or our caller's).
Both are ProtocolError, so code that handles either catches the base.
"""

from __future__ import annotations

from guestagent.errors import GuestagentError

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(GuestagentError):
    """Something violates docs/protocol.md. str(err) is a one-line message."""


class RemoteProtocolError(ProtocolError):
    """What the peer sent is invalid. Decoders raise nothing else for any input."""


class LocalProtocolError(ProtocolError):
    """What this side tried to send is invalid, or not allowed in this state."""
