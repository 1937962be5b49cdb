"""UIDs for what the node makes (SR, tracking, device), derived from their inputs so the same
input on the same installation always yields the same UID, and two installations never do.

PS3.5 B.2: ``2.25.`` followed by the integer of a UUID. The UUID is name-based (version 5) in a
namespace that is this installation's own random value (kept in its database from the first
start), over the inputs joined unambiguously (a JSON array: ``["1", "12"]`` is not
``["11", "2"]``). A site with an organisation root (``node.uid_root``) gets ``<root>.<integer>``
instead.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

MAX_UID_LENGTH = 64
_ROOT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


@dataclass(frozen=True)
class UidMaker:
    installation: uuid.UUID  # the namespace: this installation's random value
    root: str | None = None  # an organisation root, if the site has one

    def __post_init__(self) -> None:
        if self.root is not None and (not _ROOT.match(self.root) or len(self.root) > 24):
            raise ValueError(
                f'Argument "root" must be a UID root of at most 24 characters (digits and dots, no '
                f"leading zeros), got {self.root!r}"
            )

    def make(self, *parts: str) -> str:
        """The UID for ``parts`` (what the UID stands for, then its inputs)."""
        name = uuid.uuid5(self.installation, json.dumps(list(parts), ensure_ascii=False))
        uid = f"{self.root or '2.25'}.{name.int}"
        if len(uid) > MAX_UID_LENGTH:  # a root over 24 characters is refused above
            raise ValueError(f"UID {uid!r} is longer than {MAX_UID_LENGTH} characters")
        return uid
