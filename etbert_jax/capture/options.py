"""Options of the session table: timeouts and TCP FIN/RST handling.

With `idle_timeout_s=0`, `active_timeout_s=None` and `split_on_fin_rst=False`, sessions are plain
bidirectional conversations keyed by protocol and endpoint pair, as `tshark -z conv,tcp` counts them.
"""

from __future__ import annotations

import dataclasses

HEADER_POLICIES = ("anonymize", "strip-link", "raw", "etbert")


@dataclasses.dataclass(frozen=True)
class SessionOptions:
    """Session grouping options: timeouts and TCP FIN/RST handling."""

    # Seconds of capture time without a packet after which a session ends; 0 or None disables it.
    idle_timeout_s: float | None = 120.0
    # Seconds after a session's first packet at which it ends and a new one starts; 0 or None disables it.
    active_timeout_s: float | None = 3600.0
    # End a TCP session after an RST or after both sides sent FIN, once a new SYN arrives or the grace ends.
    split_on_fin_rst: bool = True
    # Seconds of capture time a closing TCP session waits for late packets (final ACK) before it ends.
    closing_grace_s: float = 5.0
    # Packets between two sweeps that end idle sessions; bounds memory by the number of active sessions.
    sweep_every_packets: int = 1000

    def __post_init__(self) -> None:
        for name in ("idle_timeout_s", "active_timeout_s"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"SessionOptions.{name} must be >= 0 or None, got {value}")
        if self.closing_grace_s < 0:
            raise ValueError(f"SessionOptions.closing_grace_s must be >= 0, got {self.closing_grace_s}")
        if self.sweep_every_packets < 1:
            raise ValueError(
                f"SessionOptions.sweep_every_packets must be >= 1, got {self.sweep_every_packets}"
            )

    @classmethod
    def conversations(cls) -> SessionOptions:
        """Return options with every timeout and FIN/RST split off (tshark's conversation rule)."""
        return cls(idle_timeout_s=None, active_timeout_s=None, split_on_fin_rst=False)

    @property
    def idle_timeout_ns(self) -> int | None:
        return int(self.idle_timeout_s * 1e9) if self.idle_timeout_s else None

    @property
    def active_timeout_ns(self) -> int | None:
        return int(self.active_timeout_s * 1e9) if self.active_timeout_s else None

    @property
    def closing_grace_ns(self) -> int:
        return int(self.closing_grace_s * 1e9)


def check_header_policy(policy: str) -> str:
    """Return `policy` if it names a header policy, else raise ValueError listing the valid ones."""
    if policy not in HEADER_POLICIES:
        raise ValueError(f"unknown header_policy {policy!r}; expected one of {', '.join(HEADER_POLICIES)}")
    return policy
