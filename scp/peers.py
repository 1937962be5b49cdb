"""Remote AE addresses as users write them: ``AE@HOST:PORT``."""

from __future__ import annotations

import re
from dataclasses import dataclass

_PEER = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[0-9a-fA-F:]+\]|[^:@]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_peer(text: str) -> Peer:
    match = _PEER.match(text.strip())
    if not match or not 0 < int(match["port"]) < 65536:
        raise ValueError(f'Argument "peer" must look like AE@HOST:PORT, got {text!r}')
    return Peer(match["ae"], match["host"].strip("[]"), int(match["port"]))
