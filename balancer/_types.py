"""The small vocabularies shared by every layer: outcomes, selections, channel states."""

from __future__ import annotations

from typing import Literal

__all__ = ["ChannelState", "Outcome", "ReleaseOutcome", "Selection"]

#: How a channel is picked among those with a free slot.
Selection = Literal["random", "weighted", "p2c"]
#: What a worker reports when it releases a lease.
Outcome = Literal["ok", "failed", "throttled"]
#: :data:`Outcome` plus ``"abandoned"``: the holder was cancelled; the slot
#: comes back and the channel's failure streak is left as it was.
ReleaseOutcome = Literal["ok", "failed", "throttled", "abandoned"]
#: ``"active"`` takes new leases; ``"draining"`` left the map and only lets its
#: leases finish; ``"cooling"`` takes none until its cooldown ends.
ChannelState = Literal["active", "draining", "cooling"]
