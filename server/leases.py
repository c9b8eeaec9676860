"""Leases on periodic jobs: one process at a time runs each job (the rollout evaluator, the
telemetry fold, threshold checks, outbound delivery), whichever server process or fold child
holds its row of ``job_lock`` (:class:`~server.models.JobLock`) until it expires or is given up.

Its own small module, so a process that only folds (:mod:`server.fold_worker`) imports no more
than it needs.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from server.models import JobLock

#: Who holds a lease: host, process id and a random tag (a new process never reuses a holder).
_HOLDER = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def take_lease(session: Session, name: str, *, now: datetime, ttl_s: float) -> bool:
    """Take or renew the lease ``name`` for this process; False while another holds it."""
    expires = now + timedelta(seconds=ttl_s)
    taken = session.exec(
        update(JobLock)
        .where(
            col(JobLock.name) == name,
            (col(JobLock.holder) == _HOLDER) | (col(JobLock.expires_at) < now),
        )
        .values(holder=_HOLDER, expires_at=expires)
    ).rowcount
    if taken:
        session.commit()
        return True
    try:
        session.add(JobLock(name=name, holder=_HOLDER, expires_at=expires))
        session.commit()
        return True
    except IntegrityError:
        session.rollback()
        return False


def release_leases(session: Session, names: Iterable[str]) -> int:
    """Give up the leases ``names`` where this process holds them (at shutdown), so another
    process, or this server started again, takes their jobs over at once rather than when the
    leases expire. Returns how many were held."""
    wanted = list(names)
    if not wanted:
        return 0
    released = session.exec(
        delete(JobLock).where(col(JobLock.name).in_(wanted), col(JobLock.holder) == _HOLDER)
    ).rowcount
    session.commit()
    return int(released)
