"""What a coalesce did: :class:`CoalesceReport`, its fields and their JSON form (docs/json.md)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ...format.structs import SECTOR_SIZE

__all__ = ["CoalesceReport"]


@dataclass
class CoalesceReport:
    child: str
    target: str
    target_type: str
    merged_layers: list[str]  # the layers whose data went into the target, leaf first
    backend: str
    block_size: int  # the unit of work: the target's block size (a fixed target: the child's)
    blocks_copied: int = 0  # target blocks written
    full_blocks: int = 0  # of those, blocks taken whole from one layer
    partial_blocks: int = 0  # merged sector by sector
    bytes_copied: int = 0  # sectors copied into the target, in bytes
    blocks_allocated: int = 0  # new blocks in the target
    blocks_resumed: int = 0  # target blocks an interrupted run (resume=True) had merged already: not redone
    zero_blocks_skipped: int = 0  # all-zero blocks over nothing: not allocated (they already read as zeros)
    shadowed_sectors: int = 0  # copied sectors that replaced data the target held (the duplicate data eliminated)
    target_size_before: int = 0
    target_size_after: int = 0
    syncs: int = 0
    writes: int = 0
    seconds: float = 0.0
    verified: bool = False
    verify_seconds: float = 0.0
    relinked: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def target_growth(self) -> int:
        return self.target_size_after - self.target_size_before

    @property
    def shadowed_bytes(self) -> int:
        return self.shadowed_sectors * SECTOR_SIZE

    @property
    def throughput(self) -> float:
        """Bytes copied per second of the merge itself (verification excluded)."""
        merge = self.seconds - self.verify_seconds
        return self.bytes_copied / merge if merge > 0 else 0.0

    def to_dict(self) -> dict:
        """The JSON form (docs/json.md): the child is the ``source``, the target the ``destination``."""
        d = asdict(self)
        d.update(target_growth=self.target_growth, shadowed_bytes=self.shadowed_bytes,
                 throughput=round(self.throughput))
        out = {"source": d.pop("child"), "destination": d.pop("target")}
        for k, v in d.items():
            out[k.replace("target_", "destination_", 1) if k.startswith("target_") else k] = v
        return out
