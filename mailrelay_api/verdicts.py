"""A render's verdicts on its RelayDomains (Rendered.domains).

A render of 100,000 RelayDomains accepts most of them, and the operator keeps
its last render until the next: a DomainVerdict each (~110 bytes with its
list slot) was ~10 MiB alive beside the render's files. DomainVerdicts holds
an accepted domain as its DomainFacts and its recipient count (16 bytes) and
makes its DomainVerdict when read; the refused ones as they are.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

from mailrelay_api.domain_facts import DomainFacts


@dataclass(slots=True)  # one per RelayDomain each render: 100,000 and more
class DomainVerdict:
    """Whether a RelayDomain is attached to a relay, and why not."""

    namespace: str
    name: str
    domain: str
    accepted: bool
    # Accepted | Conflict | NotAllowed | NextHopNotAllowed | RelayNotFound | NoRecipients
    reason: str
    message: str
    recipients: int = 0
    # "namespace/name", the facts' own string: render keys its verdicts by it
    # (no second string per RelayDomain each render); "" when made elsewhere.
    source: str = ""

    @property
    def key(self) -> str:
        return self.source or f"{self.namespace}/{self.name}"


NO_RECIPIENTS_MESSAGE = "recipients: listed and no RecipientList: every address is refused"
_NO_RECIPIENTS = 2**64 - 1  # in DomainVerdicts._recipients: accepted, "NoRecipients"


class DomainVerdicts(Sequence[DomainVerdict]):
    """A render's domain verdicts in their order, read as a list of
    DomainVerdict. An accepted one ("Accepted", or "NoRecipients" when it
    lists none) is held as its facts, whose namespace, name, domain and
    source never change (the render cache makes new facts for a changed
    spec), and its count in `_recipients`; a DomainVerdict read from it is
    made on the spot (changing it changes nothing here)."""

    __slots__ = ("_items", "_recipients")

    def __init__(self, verdicts: Sequence[DomainVerdict] = ()) -> None:
        self._items: list[DomainVerdict | DomainFacts] = list(verdicts)
        self._recipients = array("Q", bytes(8 * len(self._items)))

    def append(self, verdict: DomainVerdict) -> None:
        self._items.append(verdict)
        self._recipients.append(0)

    def accept(self, f: DomainFacts) -> None:
        """f accepted; its verdict has f's domain and source."""
        self._items.append(f)
        self._recipients.append(0)

    def accepted_facts(self) -> Iterator[tuple[int, DomainFacts]]:
        """(index, facts) of each accepted domain still held as its facts."""
        for i, item in enumerate(self._items):
            if type(item) is DomainFacts:
                yield i, item

    def held(self) -> Iterator[DomainVerdict]:
        """The verdicts held as DomainVerdicts (every one not accepted among them)."""
        for item in self._items:
            if type(item) is DomainVerdict:
                yield item

    def set_recipients(self, i: int, recipients: int) -> None:
        """The recipients of the accepted `listed` domain at `i`; none: NoRecipients."""
        self._recipients[i] = recipients or _NO_RECIPIENTS

    def _verdict(self, i: int) -> DomainVerdict:
        return _verdict(self._items[i], self._recipients[i])

    @overload
    def __getitem__(self, i: int) -> DomainVerdict: ...

    @overload
    def __getitem__(self, i: slice) -> list[DomainVerdict]: ...

    def __getitem__(self, i: int | slice) -> DomainVerdict | list[DomainVerdict]:
        if isinstance(i, slice):
            return [self._verdict(j) for j in range(*i.indices(len(self._items)))]
        return self._verdict(i)

    def __iter__(self) -> Iterator[DomainVerdict]:
        return map(_verdict, self._items, self._recipients)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(list(self))


def _verdict(item: DomainVerdict | DomainFacts, recipients: int) -> DomainVerdict:
    """The verdict an item of DomainVerdicts stands for."""
    if type(item) is DomainVerdict:
        return item
    assert isinstance(item, DomainFacts)
    if recipients == _NO_RECIPIENTS:
        reason, message, recipients = "NoRecipients", NO_RECIPIENTS_MESSAGE, 0
    else:
        reason, message = "Accepted", ""
    return DomainVerdict(
        item.namespace, item.name, item.domain, True, reason, message, recipients, item.source
    )
