"""The chain a coalesce works on: the child's layers, leaf first, and which of them is the target.

Opened read-only, every file; a parent whose unique id is not the one its child records is a refusal that
force 'parent-id' overrides (safety.py), not the dead end it is for chain.open_layers.
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple, Sequence

from ...disk.chain import is_within, open_layers, resolve_parent
from ...format.locators import candidate_paths
from ...disk.image import Image
from ...exceptions import ChainError, ParentMismatchError, UnsafeOperationError, VHDError
from ...format.structs import FOOTER, HEADER
from .safety import FORCE_PARENT_ID

__all__ = ["MergeChain", "open_chain"]


class MergeChain(NamedTuple):
    """The child's chain, leaf first: ``sources`` (the leaf down to just above the target) merge into
    ``target``; ``below`` are the target's own parents, left as they are."""

    layers: list[Image]
    target_index: int

    @property
    def leaf(self) -> Image:
        return self.layers[0]

    @property
    def sources(self) -> list[Image]:
        return self.layers[: self.target_index]

    @property
    def target(self) -> Image:
        return self.layers[self.target_index]

    @property
    def below(self) -> list[Image]:
        return self.layers[self.target_index + 1 :]

    def with_target(self, target: Image) -> "MergeChain":
        """The same chain with ``target`` (the target opened again, for writing) in the target's place."""
        layers = list(self.layers)
        layers[self.target_index] = target
        return MergeChain(layers, self.target_index)


def _find_parent_any_id(img: Image, allowed: Sequence[str]) -> str:
    """Like chain.resolve_parent, but accept the first candidate that is a VHD whatever its unique id
    (for ``force=parent-id``)."""
    me = os.path.realpath(img.path)
    child_dir = os.path.dirname(me)
    for source, raw in img.parent_candidates():
        for name in candidate_paths(source, raw):
            cands = ([name] + [os.path.join(d, os.path.basename(name)) for d in allowed]
                     if os.path.isabs(name) else [os.path.join(child_dir, name)])
            for cand in cands:
                real = os.path.realpath(cand)
                if real == me or not is_within(real, allowed) or not os.path.isfile(real):
                    continue
                try:
                    with Image(real, "r", strict=False):
                        return real
                except VHDError:
                    continue
    return resolve_parent(img, allowed)  # raises ParentNotFoundError naming every path tried


def _open_layers(child: str, parent_dirs: Sequence[str], strict: bool, force: set[str],
                        warnings: list[str]) -> list[Image]:
    """The child's whole chain, every file read-only, leaf first. As chain.open_layers, but a parent whose
    unique id differs is an UnsafeOperationError (overridable with force 'parent-id'), not a dead end."""

    def on_mismatch(img: Image, allowed: Sequence[str], e: ParentMismatchError) -> str:
        if FORCE_PARENT_ID not in force:
            raise UnsafeOperationError(
                f"the parent of {img.path} does not carry the unique id the child records ({e.message}); "
                "its data may not be what the child was written over. Pass force "
                f"'{FORCE_PARENT_ID}' (--force {FORCE_PARENT_ID}) to merge anyway",
                path=img.path, offset=e.offset, field=HEADER.field("parent_unique_id"), value=e.value) from None
        ppath = _find_parent_any_id(img, allowed)
        warnings.append(f"{img.path}: parent {ppath} has a different unique id than the child records "
                        f"(merged anyway: force '{FORCE_PARENT_ID}')")
        return ppath

    layers, found = open_layers(child, "r", parent_dirs, strict=strict, on_mismatch=on_mismatch)
    warnings.extend(found)
    return layers


def target_index(layers: list[Image], into: str | os.PathLike[str] | None) -> int:
    """Where the target is in ``layers``: the parent, or the ancestor ``into`` names (by device and inode)."""
    if len(layers) < 2:
        raise ChainError("the disk has no parent", path=layers[0].path)
    if into is None:
        return 1
    want = os.stat(os.fspath(into))
    for i, L in enumerate(layers):
        st = os.fstat(L.fd)
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            if i == 0:
                raise ChainError("cannot coalesce a disk into itself", path=L.path, field="into", value=into)
            return i
    raise ChainError(f"{os.fspath(into)} is not an ancestor of this disk (chain: "
                     f"{' <- '.join(L.path for L in reversed(layers))})", path=layers[0].path, field="into",
                     value=os.fspath(into))



def open_chain(stack: contextlib.ExitStack, child: str, into: str | os.PathLike[str] | None,
               parent_dirs: Sequence[str], strict: bool, force: set[str], warnings: list[str]) -> MergeChain:
    """Open the child's chain (closed by ``stack``) and find the target in it; a child that is not a
    differencing disk, or an ``into`` that is not its ancestor, is a ChainError."""
    layers = _open_layers(child, parent_dirs, strict, force, warnings)
    for layer in reversed(layers):  # closed leaf first
        stack.callback(layer.close)
    leaf = layers[0]
    if not leaf.is_differencing:
        raise ChainError("not a differencing disk: it has no parent to merge into", path=leaf.path,
                         field=FOOTER.field("disk_type"), value=int(leaf.disk_type))
    return MergeChain(layers, target_index(layers, into))
