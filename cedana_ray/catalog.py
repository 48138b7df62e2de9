"""The checkpoint catalog of a registry: what a checkpoint id stands for in its store.

Shared by local mode (the Engine) and the cluster's Coordinator, which keep the same
tables.
"""

from __future__ import annotations

from contextlib import suppress

from .errors import CheckpointNotFound, JobNotFound
from .models import CheckpointInfo, Manifest
from .registry import Registry
from .signing import Signer
from .store import CheckpointStore, split_url


def inspect(registry: Registry, ckpt: str, signer: Signer) -> Manifest:
    root, name = split_url(registry.checkpoint(ckpt).path)
    return CheckpointStore(root, signer).manifest(name)


def delete(registry: Registry, ckpt: str, signer: Signer) -> CheckpointInfo:
    """Remove checkpoint ``ckpt`` from its store and the catalog; its job falls back to the one before."""
    info = registry.checkpoint(ckpt)
    root, name = split_url(info.path)
    with suppress(CheckpointNotFound):  # gone from the store: drop it from the catalog too
        CheckpointStore(root, signer).delete(name)
    registry.delete_checkpoint(ckpt)
    try:
        job = registry.job(info.jid)
    except JobNotFound:
        return info
    if job.last_checkpoint == info.checkpoint:
        rest = registry.checkpoints(info.jid)
        registry.update_job(job.jid, last_checkpoint=rest[-1].checkpoint if rest else None)
    return info


def adopt(registry: Registry, url: str, signer: Signer) -> CheckpointInfo:
    """Import the checkpoint at ``url``, made by another cluster or state dir: once every chunk
    matches its manifest, sign the manifest with ``signer``'s key too and catalog it.

    Whoever imports vouches for the checkpoint's origin: the chunks' digests only prove that
    the images are the ones its manifest describes.
    """
    root, name = split_url(url)
    store = CheckpointStore(root, signer)
    manifest = store.manifest(name, verify=False)
    store.verify(manifest)
    store.endorse(manifest)
    info = CheckpointInfo.of(manifest, store.url_of(name))
    registry.add_checkpoint(info)
    return info


def recover(registry: Registry, url: str, signer: Signer) -> list[CheckpointInfo]:
    """Catalog the checkpoints of known jobs found in the store at ``url`` but not in the catalog.

    A dump that finished while its catalog was away (a restarted coordinator) is not lost.
    Only checkpoints signed with ``signer``'s key count: one planted in the store is ignored.
    """
    store = CheckpointStore(url, signer)
    known = {c.checkpoint for c in registry.checkpoints()}
    jobs = {j.jid for j in registry.jobs()}
    found = []
    for m in store.list():
        if m.checkpoint in known or m.jid not in jobs:
            continue
        info = CheckpointInfo.of(m, store.url_of(m.checkpoint))
        registry.add_checkpoint(info)
        found.append(info)
        if registry.checkpoints(m.jid)[-1].checkpoint == m.checkpoint:  # the newest: restores start there
            registry.update_job(m.jid, last_checkpoint=m.checkpoint)
    return found
