"""The agent's link to the host: the best transport present, reopened when that changes."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from guestagent.errors import GuestagentError
from guestagent.protocol.model import PeerState
from guestagent.transport.link import GuestLink, GuestView
from guestagent.transport.select import RANK, Choice, available, open_link

Note = Callable[..., None]  # note(line, level=logging.WARNING): log a condition once
Available = Callable[[Mapping[str, Any]], "list[Choice]"]
Opener = Callable[[Choice, int, float], GuestLink]


class Uplink:
    """Which transport is in use and its link. ``available`` and ``open_link`` are
    the transport selection's (tests pass their own)."""

    def __init__(self, note: Note, log: logging.Logger, errors: Counter[str],
                 find: Available = available, opener: Opener = open_link) -> None:
        self.note, self.log, self.errors = note, log, errors
        self.find, self.opener = find, opener
        self.link: GuestLink | None = None
        self.choice: Choice | None = None

    def view(self) -> GuestView | None:
        return self.link.view() if self.link is not None else None

    def relink(self, transport: Mapping[str, Any], nr_vcpus: int, heartbeat: float,
               now: float) -> bool:
        """Move to the best transport present; True when a new link was opened (in the
        RUNNING state, with nothing published yet)."""
        choices = self.find(transport)
        current = self.choice
        if current in choices and RANK[choices[0].kind] >= RANK[current.kind]:
            return False
        for choice in choices:
            if current is not None and choice == current:
                return False
            try:
                link = self.opener(choice, nr_vcpus, heartbeat)
            except GuestagentError as err:
                self.errors["link_open"] += 1
                self.note(f"{choice.kind} transport {choice.target} unusable: {err}")
                continue
            self.drop(now)
            self.link, self.choice = link, choice
            self.log.info("transport: %s %s", choice.kind, choice.target)
            link.set_state(PeerState.RUNNING, now)
            return True
        if current is None:
            self.note(f"no transport available (mode {transport['mode']})", logging.ERROR)
        return False

    def drop(self, now: float) -> None:
        """Say STOPPING on the current link (if any) and close it."""
        if self.link is None:
            return
        try:
            self.link.set_state(PeerState.STOPPING, now)
            self.link.tick(now)
        finally:
            self.link.close()
            self.link, self.choice = None, None

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link, self.choice = None, None
