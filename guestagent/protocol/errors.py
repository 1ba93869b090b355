"""The one exception the codecs raise for bytes they cannot accept."""

from __future__ import annotations

from guestagent.errors import GuestagentError


class ProtocolError(GuestagentError):
    """Bytes from the peer (or a value for it) violate docs/protocol.md.

    str(err) is a one-line message. Decoders raise nothing else for any input.
    """
