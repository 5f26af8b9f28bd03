"""Jobs and their items, in the metadata database (storage.database: SQLite by default, PostgreSQL
when configured), so every process sees them: API replicas, the in-process runner, Celery workers.

An item moves queued -> running -> done | failed, or to cancelled from queued or running. The state
changes are single conditional UPDATEs, so they hold across processes:
- `claim` takes queued items (FOR UPDATE SKIP LOCKED where the database has it);
- `start` marks an item running for a worker that received it (again, after a redelivery);
- `finish` records a result only while the item is still queued or running: the first result
  wins, and a second run of the same item (a worker died after generating, its task was delivered
  again) learns that its output is not wanted.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import sqlalchemy as sa

from ..errors import NotFound
from ..storage.database import autocommit, open_database


class ItemState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"  # every item done
    PARTIAL = "partial"  # finished, some items failed or were cancelled
    FAILED = "failed"  # finished, no item done
    CANCELLED = "cancelled"


OPEN_ITEM_STATES = (ItemState.QUEUED.value, ItemState.RUNNING.value)
BACK_TO_QUEUE = {"state": ItemState.QUEUED.value, "worker": None, "started_at": None}  # a run given up

metadata = sa.MetaData()

jobs_table = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=True, index=True),
    sa.Column("label", sa.Text, nullable=True),
    sa.Column("total", sa.Integer, nullable=False),
    sa.Column("cancelled", sa.Boolean, nullable=False, default=False),
    sa.Column("webhook_url", sa.Text, nullable=True),
    sa.Column("webhook_state", sa.String(16), nullable=True),  # None, sending, sent, failed
    sa.Column("created_at", sa.Float, nullable=False, index=True),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
)

items_table = sa.Table(
    "job_items",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("idx", sa.Integer, nullable=False),
    sa.Column("custom_id", sa.Text, nullable=True),
    sa.Column("mode", sa.String(32), nullable=False),
    sa.Column("spec", sa.Text, nullable=False),  # the item's request body, JSON
    sa.Column("state", sa.String(16), nullable=False, default=ItemState.QUEUED.value),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("worker", sa.String(128), nullable=True),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("file_id", sa.String(64), nullable=True),
    sa.Column("duration_s", sa.Float, nullable=True),
    sa.Column("finish_reason", sa.String(16), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.UniqueConstraint("job_id", "idx"),
    sa.Index("job_items_state", "state", "job_id"),
)

# In-process runners say here that they are alive, so that another can take up what a dead one left running
# (a server killed without its shutdown, perhaps back under another host name). A table of its own: an
# existing database gains it without a migration.
runners_table = sa.Table(
    "job_runners",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("seen_at", sa.Float, nullable=False),
)


@dataclass(frozen=True)
class NewItem:
    mode: str
    spec: dict[str, Any]
    custom_id: str | None = None


@dataclass(frozen=True)
class Item:
    id: str
    job_id: str
    idx: int
    custom_id: str | None
    mode: str
    spec: dict[str, Any]
    state: ItemState
    attempts: int
    started_at: float | None
    finished_at: float | None
    file_id: str | None
    duration_s: float | None
    finish_reason: str | None
    error: str | None
    owner: str | None = None  # the job's

    @property
    def finished(self) -> bool:
        return self.state.value not in OPEN_ITEM_STATES


@dataclass(frozen=True)
class Progress:
    total: int
    queued: int
    running: int
    done: int
    failed: int
    cancelled: int
    audio_s: float
    eta_s: float | None

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.cancelled


@dataclass(frozen=True)
class Job:
    id: str
    owner: str | None
    label: str | None
    total: int
    cancelled: bool
    webhook_url: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    progress: Progress

    @property
    def state(self) -> JobState:
        p = self.progress
        if p.finished < p.total:
            if self.cancelled:
                return JobState.CANCELLED
            return JobState.QUEUED if p.queued == p.total else JobState.RUNNING
        if self.cancelled and p.done < p.total:
            return JobState.CANCELLED
        if p.done == p.total:
            return JobState.COMPLETED
        return JobState.FAILED if p.done == 0 else JobState.PARTIAL

    @property
    def over(self) -> bool:
        return self.progress.finished == self.progress.total


@dataclass(frozen=True)
class Finished:
    """What `finish` did: whether this result was recorded, and whether it ended its job."""

    recorded: bool
    job_over: bool


class JobStore:
    def __init__(self, database_url: str, clock: Callable[[], float] = time.time) -> None:
        self._db = open_database(database_url, metadata)
        self._reads = autocommit(self._db)  # plain reads: no transaction (on SQLite, no write lock)
        self._clock = clock
        self._postgres = self._db.dialect.name == "postgresql"

    # --- jobs ---

    def create(self, items: Sequence[NewItem], *, owner: str | None, label: str | None, webhook_url: str | None) -> Job:
        job_id = f"job-{uuid.uuid4().hex}"
        now = self._clock()
        rows = [
            {
                "id": uuid.uuid4().hex,
                "job_id": job_id,
                "idx": i,
                "custom_id": item.custom_id,
                "mode": item.mode,
                "spec": json.dumps(item.spec, ensure_ascii=False),
                "state": ItemState.QUEUED.value,
                "attempts": 0,
            }
            for i, item in enumerate(items)
        ]
        with self._db.begin() as conn:
            conn.execute(
                jobs_table.insert().values(
                    id=job_id,
                    owner=owner,
                    label=label,
                    total=len(rows),
                    cancelled=False,
                    webhook_url=webhook_url,
                    created_at=now,
                )
            )
            conn.execute(items_table.insert(), rows)
        return self.get(job_id)

    def get(self, job_id: str, *, owner: str | None = None, check_owner: bool = False) -> Job:
        """The job; NotFound if it does not exist (or, with `check_owner`, belongs to someone else)."""
        with self._reads.connect() as conn:
            row = conn.execute(sa.select(jobs_table).where(jobs_table.c.id == job_id)).mappings().first()
            if row is None or (check_owner and row["owner"] != owner):
                raise NotFound(f"job {_quote(job_id)} does not exist; GET /api/v1/jobs lists your jobs")
            return self._job(conn, row)

    def list(self, owner: str | None, limit: int = 100) -> list[Job]:
        """The owner's jobs, newest first."""
        query = sa.select(jobs_table).where(_owner_is(owner)).order_by(jobs_table.c.created_at.desc()).limit(limit)
        with self._reads.connect() as conn:
            return [self._job(conn, row) for row in conn.execute(query).mappings().all()]

    def items(self, job_id: str) -> list[Item]:
        query = sa.select(items_table).where(items_table.c.job_id == job_id).order_by(items_table.c.idx)
        with self._reads.connect() as conn:
            return [_item(row) for row in conn.execute(query).mappings().all()]

    def item(self, item_id: str) -> Item | None:
        with self._reads.connect() as conn:
            row = conn.execute(_with_owner().where(items_table.c.id == item_id)).mappings().first()
        return None if row is None else _item(row)

    def cancel(self, job_id: str) -> list[str]:
        """Cancel the job: queued and running items become cancelled (running ones are stopped by
        whoever runs them, who sees the state). Returns the ids of the items that were running."""
        now = self._clock()
        with self._db.begin() as conn:
            self._lock_job(conn, job_id)
            running = [
                r[0]
                for r in conn.execute(
                    sa.select(items_table.c.id).where(
                        items_table.c.job_id == job_id, items_table.c.state == ItemState.RUNNING.value
                    )
                )
            ]
            conn.execute(jobs_table.update().where(jobs_table.c.id == job_id).values(cancelled=True))
            conn.execute(
                items_table.update()
                .where(items_table.c.job_id == job_id, items_table.c.state.in_(OPEN_ITEM_STATES))
                .values(state=ItemState.CANCELLED.value, finished_at=now, error="cancelled")
            )
            self._close_if_over(conn, job_id, now)
        return running

    def delete(self, job_id: str) -> None:
        """Forget a job and its items (one that could not be queued)."""
        with self._db.begin() as conn:
            conn.execute(items_table.delete().where(items_table.c.job_id == job_id))
            conn.execute(jobs_table.delete().where(jobs_table.c.id == job_id))

    def delete_before(self, cutoff: float) -> int:
        """Forget jobs that finished before `cutoff` (their outputs expire with the files' TTL)."""
        with self._db.begin() as conn:
            ids = [r[0] for r in conn.execute(sa.select(jobs_table.c.id).where(jobs_table.c.finished_at < cutoff))]
            if ids:
                conn.execute(items_table.delete().where(items_table.c.job_id.in_(ids)))
                conn.execute(jobs_table.delete().where(jobs_table.c.id.in_(ids)))
        return len(ids)

    def finished_items(self, job_id: str, seen: set[str]) -> list[Item]:
        """The job's finished items whose ids are not in `seen` (an event stream's next items)."""
        finished = sa.select(items_table.c.id).where(
            items_table.c.job_id == job_id, items_table.c.state.not_in(OPEN_ITEM_STATES)
        )
        with self._reads.connect() as conn:
            new = [row[0] for row in conn.execute(finished) if row[0] not in seen]
            if not new:
                return []
            rows = conn.execute(_with_owner().where(items_table.c.id.in_(new)).order_by(items_table.c.idx))
            return [_item(row) for row in rows.mappings().all()]

    # --- items, as runners see them ---

    def claim(self, limit: int, worker: str) -> list[Item]:
        """Take up to `limit` queued items, oldest job first, and mark them running for `worker`."""
        if limit <= 0:
            return []
        now = self._clock()
        query = _oldest_queued(limit, items_table, jobs_table.c.owner)
        if self._postgres:
            query = query.with_for_update(of=items_table, skip_locked=True)
        with self._db.begin() as conn:
            rows = conn.execute(query).mappings().all()
            if not rows:
                return []
            ids = [row["id"] for row in rows]
            conn.execute(
                items_table.update()
                .where(items_table.c.id.in_(ids))
                .values(
                    state=ItemState.RUNNING.value,
                    worker=worker,
                    started_at=now,
                    attempts=items_table.c.attempts + 1,
                )
            )
        self._mark_started({row["job_id"] for row in rows}, now)
        return [_item({**row, "state": ItemState.RUNNING.value, "started_at": now}) for row in rows]

    def start(self, item_id: str, worker: str, *, take_over_after_s: float | None = 0.0) -> Item | None:
        """Mark an item running for `worker` (a delivered task); None if there is nothing to run: it is
        finished or cancelled, or running and not to be taken over. A run started over `take_over_after_s`
        ago is taken over (a task delivered again after the visibility timeout: its worker is gone);
        None: never (a task sent again for an item nobody had started)."""
        now = self._clock()
        runnable = items_table.c.state == ItemState.QUEUED.value
        if take_over_after_s is not None:
            stale = sa.and_(
                items_table.c.state == ItemState.RUNNING.value, items_table.c.started_at <= now - take_over_after_s
            )
            runnable = sa.or_(runnable, stale)
        with self._db.begin() as conn:
            updated = conn.execute(
                items_table.update()
                .where(items_table.c.id == item_id, runnable)
                .values(
                    state=ItemState.RUNNING.value,
                    worker=worker,
                    started_at=now,
                    attempts=items_table.c.attempts + 1,
                )
            ).rowcount
            if not updated:
                return None
            row = conn.execute(_with_owner().where(items_table.c.id == item_id)).mappings().one()
        self._mark_started({row["job_id"]}, now)
        return _item(row)

    def requeue(self, item_ids: Sequence[str], worker: str) -> None:
        """Put back in the queue the items `worker` is running (it stops without finishing them); those
        another runner has taken up since are left to it."""
        if not item_ids:
            return
        with self._db.begin() as conn:
            conn.execute(
                items_table.update()
                .where(
                    items_table.c.id.in_(list(item_ids)),
                    items_table.c.state == ItemState.RUNNING.value,
                    items_table.c.worker == worker,
                )
                .values(**BACK_TO_QUEUE)
            )

    def requeue_worker(self, worker: str) -> int:
        """Put back every item `worker` left running (a runner that restarts takes them back)."""
        with self._db.begin() as conn:
            return conn.execute(
                items_table.update()
                .where(items_table.c.state == ItemState.RUNNING.value, items_table.c.worker == worker)
                .values(**BACK_TO_QUEUE)
            ).rowcount

    def beat(self, runner: str) -> None:
        """Record that `runner` is alive now."""
        now = self._clock()
        with self._db.begin() as conn:
            seen = runners_table.update().where(runners_table.c.name == runner).values(seen_at=now)
            if not conn.execute(seen).rowcount:
                conn.execute(runners_table.insert().values(name=runner, seen_at=now))

    def requeue_dead(self, prefix: str, lease_s: float) -> int:
        """Put back every item started over `lease_s` ago by a runner named `prefix`... not seen for
        `lease_s` (or ever: a server of an older version, which does not beat, loses only items older
        than the lease); forget such runners. Returns how many items went back."""
        dead_before = self._clock() - lease_s
        alive = sa.select(runners_table.c.name).where(runners_table.c.seen_at >= dead_before)
        with self._db.begin() as conn:
            taken = conn.execute(
                items_table.update()
                .where(
                    items_table.c.state == ItemState.RUNNING.value,
                    items_table.c.worker.startswith(prefix, autoescape=True),
                    items_table.c.worker.not_in(alive),
                    items_table.c.started_at < dead_before,
                )
                .values(**BACK_TO_QUEUE)
            ).rowcount
            conn.execute(runners_table.delete().where(runners_table.c.seen_at < dead_before))
        return taken

    def finish(
        self,
        item_id: str,
        *,
        file_id: str | None = None,
        duration_s: float | None = None,
        finish_reason: str | None = None,
        error: str | None = None,
    ) -> Finished:
        """Record an item's result (`file_id`) or failure (`error`), once: a result for an item
        already finished or cancelled is not recorded (`recorded` False: delete its output)."""
        now = self._clock()
        state = ItemState.FAILED if error is not None else ItemState.DONE
        job_id = self._job_of(item_id)
        if job_id is None:
            return Finished(recorded=False, job_over=False)
        with self._db.begin() as conn:
            self._lock_job(conn, job_id)
            updated = conn.execute(
                items_table.update()
                .where(items_table.c.id == item_id, items_table.c.state.in_(OPEN_ITEM_STATES))
                .values(
                    state=state.value,
                    finished_at=now,
                    file_id=file_id,
                    duration_s=duration_s,
                    finish_reason=finish_reason,
                    error=error,
                )
            ).rowcount
            if not updated:
                return self._finished_before(conn, item_id, state, file_id, error)
            over = self._close_if_over(conn, job_id, now)
        return Finished(recorded=True, job_over=over)

    @staticmethod
    def _finished_before(
        conn: sa.Connection, item_id: str, state: ItemState, file_id: str | None, error: str | None
    ) -> Finished:
        """A finish that finds the item ended: recorded if it ended with this very outcome (this call is
        the retry of one whose commit went through but whose reply was lost), else not."""
        row = conn.execute(
            sa.select(items_table.c.state, items_table.c.file_id, items_table.c.error, jobs_table.c.finished_at)
            .join(jobs_table, jobs_table.c.id == items_table.c.job_id)
            .where(items_table.c.id == item_id)
        ).one_or_none()
        if row is None or (row.state, row.file_id, row.error) != (state.value, file_id, error):
            return Finished(recorded=False, job_over=False)
        return Finished(recorded=True, job_over=row.finished_at is not None)

    def _job_of(self, item_id: str) -> str | None:
        with self._reads.connect() as conn:
            return conn.execute(sa.select(items_table.c.job_id).where(items_table.c.id == item_id)).scalar()

    def open_items(self) -> int:
        """Items queued or running, over all jobs (what admission of a new job weighs)."""
        query = sa.select(sa.func.count()).where(items_table.c.state.in_(OPEN_ITEM_STATES))
        with self._reads.connect() as conn:
            return conn.execute(query).scalar_one()

    def queued_ids(self, limit: int) -> list[str]:
        """Up to `limit` items no runner has started, oldest job first (what a broker may have lost)."""
        with self._reads.connect() as conn:
            return list(conn.execute(_oldest_queued(limit, items_table.c.id)).scalars())

    def open_states(self, item_ids: Sequence[str]) -> dict[str, ItemState]:
        """The current state of each of these items (runners poll it to stop cancelled work)."""
        if not item_ids:
            return {}
        query = sa.select(items_table.c.id, items_table.c.state).where(items_table.c.id.in_(list(item_ids)))
        with self._reads.connect() as conn:
            return {row[0]: ItemState(row[1]) for row in conn.execute(query)}

    def claim_webhook(self, job_id: str, claim: str) -> str | None:
        """The job's webhook URL if this caller is the one to send it (at most one sender per job). `claim`
        (a few characters, the same on every try) makes a retry after a lost reply find its own claim."""
        mine = f"sending:{claim}"[:16]
        with self._db.begin() as conn:
            conn.execute(
                jobs_table.update()
                .where(
                    jobs_table.c.id == job_id,
                    jobs_table.c.webhook_url.is_not(None),
                    jobs_table.c.webhook_state.is_(None),
                )
                .values(webhook_state=mine)
            )
            row = conn.execute(
                sa.select(jobs_table.c.webhook_url, jobs_table.c.webhook_state).where(jobs_table.c.id == job_id)
            ).one_or_none()
        return row.webhook_url if row is not None and row.webhook_state == mine else None

    def webhook_done(self, job_id: str, ok: bool) -> None:
        with self._db.begin() as conn:
            conn.execute(
                jobs_table.update().where(jobs_table.c.id == job_id).values(webhook_state="sent" if ok else "failed")
            )

    # --- internals ---

    def _job(self, conn: sa.Connection, row: Any) -> Job:
        counts = dict(
            conn.execute(
                sa.select(items_table.c.state, sa.func.count())
                .where(items_table.c.job_id == row["id"])
                .group_by(items_table.c.state)
            ).all()
        )
        audio_s = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(items_table.c.duration_s), 0.0)).where(
                items_table.c.job_id == row["id"], items_table.c.state == ItemState.DONE.value
            )
        ).scalar_one()
        progress = self._progress(row, counts, float(audio_s))
        return Job(
            id=row["id"],
            owner=row["owner"],
            label=row["label"],
            total=row["total"],
            cancelled=bool(row["cancelled"]),
            webhook_url=row["webhook_url"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            progress=progress,
        )

    def _progress(self, row: Any, counts: dict[str, int], audio_s: float) -> Progress:
        p = Progress(
            total=row["total"],
            queued=counts.get(ItemState.QUEUED.value, 0),
            running=counts.get(ItemState.RUNNING.value, 0),
            done=counts.get(ItemState.DONE.value, 0),
            failed=counts.get(ItemState.FAILED.value, 0),
            cancelled=counts.get(ItemState.CANCELLED.value, 0),
            audio_s=round(audio_s, 3),
            eta_s=None,
        )
        left = p.total - p.finished
        started = row["started_at"]
        if left == 0 or started is None or p.finished == 0 or row["cancelled"]:
            return p if left else dataclasses.replace(p, eta_s=0.0)
        per_item = (self._clock() - started) / p.finished
        return dataclasses.replace(p, eta_s=round(per_item * left, 1))

    def _mark_started(self, job_ids: set[str], now: float) -> None:
        """Stamp when the jobs started, in a transaction of its own: item locks are never held while
        waiting for a job row (finish and cancel take the job row first, then items)."""
        with self._db.begin() as conn:
            conn.execute(
                jobs_table.update()
                .where(jobs_table.c.id.in_(list(job_ids)), jobs_table.c.started_at.is_(None))
                .values(started_at=now)
            )

    @staticmethod
    def _lock_job(conn: sa.Connection, job_id: str) -> None:
        """Serialise the state changes of one job (finish, cancel) on PostgreSQL: without it two workers
        finishing the last two items each see the other's item still open, and neither ends the job.
        (SQLite's writers are serialised already: FOR UPDATE is left out there.)"""
        conn.execute(sa.select(jobs_table.c.id).where(jobs_table.c.id == job_id).with_for_update())

    @staticmethod
    def _close_if_over(conn: sa.Connection, job_id: str, now: float) -> bool:
        """Stamp the job finished when no item is open; True if this call did it."""
        open_items = conn.execute(
            sa.select(sa.func.count()).where(items_table.c.job_id == job_id, items_table.c.state.in_(OPEN_ITEM_STATES))
        ).scalar_one()
        if open_items:
            return False
        return bool(
            conn.execute(
                jobs_table.update()
                .where(jobs_table.c.id == job_id, jobs_table.c.finished_at.is_(None))
                .values(finished_at=now)
            ).rowcount
        )


def _with_owner() -> sa.Select:
    return sa.select(items_table, jobs_table.c.owner).join(jobs_table, jobs_table.c.id == items_table.c.job_id)


def _owner_is(owner: str | None) -> sa.ColumnElement[bool]:
    return jobs_table.c.owner.is_(None) if owner is None else jobs_table.c.owner == owner


def _oldest_queued(limit: int, *columns: Any) -> sa.Select:
    """Up to `limit` queued items' `columns`, oldest job first and in item order: the order runners take
    them in (claim) and the sweeper looks at them (queued_ids)."""
    return (
        sa.select(*columns)
        .join(jobs_table, jobs_table.c.id == items_table.c.job_id)
        .where(items_table.c.state == ItemState.QUEUED.value)
        .order_by(jobs_table.c.created_at, items_table.c.idx)
        .limit(limit)
    )


def _item(row: Any) -> Item:
    return Item(
        id=row["id"],
        job_id=row["job_id"],
        idx=row["idx"],
        custom_id=row["custom_id"],
        mode=row["mode"],
        spec=json.loads(row["spec"]),
        state=ItemState(row["state"]),
        attempts=row["attempts"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        file_id=row["file_id"],
        duration_s=row["duration_s"],
        finish_reason=row["finish_reason"],
        error=row["error"],
        owner=row.get("owner"),
    )


def _quote(job_id: str) -> str:
    return repr(job_id if len(job_id) <= 64 else job_id[:64] + "...")
