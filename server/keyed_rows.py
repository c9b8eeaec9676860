"""Rows of a table with a unique key, as the fold job adds into them (:mod:`server.fold`,
:mod:`server.fleet_rollup`): the rows of many keys read at once (locked, in key order, on
PostgreSQL), rows for new keys inserted unless another transaction made them first, and rows
updated by id, each a statement for the whole set.

So two writers adding into the same new row never fail on the unique key: the one that inserts
second gets the key back as taken (``ON CONFLICT DO NOTHING``, which waits for the first to
commit), reads the row the first made, locked, and adds into it like any stored row. Every writer
locks existing rows in key order and inserts in key order, so two writers at once wait for each
other rather than deadlock.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar, cast

import orjson
from sqlalchemy import JSON, Integer, String, Table, TypeDecorator, bindparam, text, tuple_, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.sql.elements import TextClause
from sqlmodel import Session

Key = tuple[str, ...]
#: The key type of a caller's rows (say four strings).
K = TypeVar("K", bound=Key)

#: Keys a SQLite read names at once (a row-value IN list; four bound values each).
_SQLITE_CHUNK = 500


def locked(
    session: Session, table: Table, key: Sequence[str], keys: Iterable[K], columns: Sequence[str]
) -> dict[K, dict[str, Any]]:
    """The stored rows of ``keys`` (``key`` names the columns of the table's unique constraint, in
    its order, all strings), each as a dict
    of the key columns and ``columns``; locked until the transaction ends on PostgreSQL, where
    they are read in key order. (SQLite's one writer needs no row locks: the caller already
    holds the database's write lock.)"""
    wanted = sorted(set(keys))
    if not wanted:
        return {}
    found: dict[K, dict[str, Any]] = {}
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        statement = _pg_statement("lock", table, tuple(key), tuple(columns))
        keys_doc = _dumps([dict(zip(key, k, strict=True)) for k in wanted])
        # One json value: psycopg decodes it (with server.db.json_loads).
        for row in conn.execute(statement, {"rows": keys_doc}).scalar() or []:
            found[cast(K, tuple(row[c] for c in key))] = row
        return found
    key_columns = [table.c[c] for c in key]
    for i in range(0, len(wanted), _SQLITE_CHUNK):
        query = (
            table.select()
            .with_only_columns(*key_columns, *(table.c[c] for c in columns))
            .where(tuple_(*key_columns).in_(wanted[i : i + _SQLITE_CHUNK]))
        )
        for row in conn.execute(query).mappings():
            found[cast(K, tuple(row[c] for c in key))] = dict(row)
    return found


def insert_new(
    session: Session, table: Table, key: Sequence[str], rows: list[dict[str, Any]]
) -> set[Key]:
    """Insert ``rows`` (in key order) except those whose key another transaction stored first;
    returns the keys inserted. A key taken by a transaction still running waits for it."""
    if not rows:
        return set()
    ordered = sorted(rows, key=lambda r: tuple(r[c] for c in key))
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        statement = _pg_statement("insert", table, tuple(key), tuple(ordered[0]))
        return {tuple(r) for r in conn.execute(statement, {"rows": _dumps(ordered)})}
    one_by_one = (
        sqlite_insert(table)
        .on_conflict_do_nothing(index_elements=list(key))
        .returning(*(table.c[c] for c in key))
    )
    return {tuple(r) for r in conn.execute(one_by_one, ordered)}


def update_by_id(session: Session, table: Table, rows: list[dict[str, Any]]) -> None:
    """Set the columns each row names (every row the same ones) on the row of its ``id``."""
    if not rows:
        return
    conn = session.connection()
    columns = tuple(rows[0])
    if conn.dialect.name == "postgresql":
        conn.execute(_pg_statement("update", table, (), columns), {"rows": _dumps(rows)})
        return
    statement = (
        update(table)
        .where(table.c.id == bindparam("_id"))
        .values({c: bindparam(c) for c in columns if c != "id"})
    )
    conn.execute(
        statement, [{"_id": r["id"], **{c: r[c] for c in columns if c != "id"}} for r in rows]
    )


# PostgreSQL: a set of rows (or keys) goes as one JSON document, encoded here with orjson in one
# call and taken apart by json_to_recordset, and rows read come back as one (json_agg): one
# statement of a fixed, short text however many rows, with no per-row work in the driver.

_statements: dict[tuple[str, str, tuple[str, ...], tuple[str, ...]], TextClause] = {}


def _pg_type(table: Table, column: str) -> str:
    kind = table.c[column].type
    if isinstance(kind, TypeDecorator):  # SQLModel's strings
        kind = kind.impl_instance
    if isinstance(kind, JSON):
        return "json"
    if isinstance(kind, Integer):
        return "bigint"
    if isinstance(kind, String):
        return "text"
    raise TypeError(f"{table.name}.{column}: no PostgreSQL type known for {kind!r}")


def _pg_statement(
    what: str, table: Table, key: tuple[str, ...], columns: tuple[str, ...]
) -> TextClause:
    cache_key = (what, table.name, key, columns)
    statement = _statements.get(cache_key)
    if statement is not None:
        return statement
    given = key if what == "lock" else columns
    typed = ", ".join(f"{c} {_pg_type(table, c)}" for c in given)
    source = f"json_to_recordset(CAST(:rows AS json)) AS v({typed})"
    names = ", ".join(key)
    if what == "lock":
        selected = ", ".join(f"t.{c}" for c in (*key, *columns))
        ours = f"({', '.join(f't.{c}' for c in key)})"
        theirs = f"({', '.join(f'v.{c}' for c in key)})"
        # Equality written as two row comparisons: only an index on the key's columns in that
        # order (its unique constraint's) can serve them, so the plan does not hinge on the
        # statistics (a table never analysed since a burst of new rows had PostgreSQL probe an
        # index on three of the columns and filter thousands of rows per key).
        statement = text(
            f"SELECT json_agg(r) FROM (SELECT {selected} FROM {table.name} t"
            f" JOIN {source} ON {ours} >= {theirs} AND {ours} <= {theirs}"
            f" ORDER BY {ours} FOR UPDATE OF t) r"
        )
    elif what == "insert":
        statement = text(
            f"INSERT INTO {table.name} ({', '.join(columns)}) SELECT {', '.join(columns)}"
            f" FROM {source} ON CONFLICT ({names}) DO NOTHING RETURNING {names}"
        )
    else:
        assigned = ", ".join(f"{c} = v.{c}" for c in columns if c != "id")
        statement = text(f"UPDATE {table.name} t SET {assigned} FROM {source} WHERE t.id = v.id")
    _statements[cache_key] = statement
    return statement


def _dumps(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # what orjson does not take (say a key not a string): as json writes it
        return json.dumps(value)
