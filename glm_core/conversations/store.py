"""The conversation store: workspaces, conversations and messages in one SQLite file (WAL) under GLM_DATA_DIR.

Every read and write names its workspace, and every query filters by it: a conversation id from another
workspace finds nothing. A connection per operation keeps it safe to share one Store between the threads of
every browser session (and between processes: the portal and the CLI may use the same file at once).
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .conversation import (
    STATS_FIELDS, TITLE_MAX_CHARS, ChatMessage, Conversation, new_conversation_id, title_from_prompt,
)
from ..settings import load_settings
from .workspace import new_workspace_id

DB_NAME = "conversations.sqlite3"
SCHEMA_VERSION = 2
ROLES = ("system", "user", "assistant")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS workspaces (
    id TEXT PRIMARY KEY,
    owner TEXT UNIQUE,              -- signed-in identity (Streamlit auth); NULL for a browser's URL workspace
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    workspace TEXT NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    title TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    backend TEXT                    -- the backend (by its name in GLM_BACKENDS) it talks to; NULL: the default
);
CREATE INDEX IF NOT EXISTS conversations_by_workspace ON conversations(workspace, updated_at DESC);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('complete', 'partial', 'interrupted')),
    finish_reason TEXT,
    error TEXT,
    model TEXT,
    precision TEXT,
    params TEXT,                    -- JSON: sampling parameters and system prompt
    {", ".join(f"{name} REAL" for name in STATS_FIELDS)},
    UNIQUE (conversation_id, position)
);
"""

# Steps from one schema version to the next, applied in order to an existing file (a new file gets _SCHEMA).
_MIGRATIONS = {
    2: ["ALTER TABLE conversations ADD COLUMN backend TEXT"],  # each conversation remembers its backend
}

_ROW_FIELDS = ("role", "content", "created_at", "updated_at", "status", "finish_reason", "error", "model", "precision",
               "params", *STATS_FIELDS)
_MESSAGE_COLUMNS = "id, position, " + ", ".join(_ROW_FIELDS)
_INT_STATS = {"prompt_tokens", "reused_tokens", "prefill_tokens", "completion_tokens"}


class NotFound(LookupError):
    """No such conversation or message in this workspace."""


class StorageError(RuntimeError):
    """The database could not be read or written (disk full, locked too long, I/O error, corrupt file);
    str(error) is one line for the user. Whatever the operation was, it changed nothing."""


class ConversationChanged(RuntimeError):
    """A turn was asked for on a conversation that has changed since the page that asked was drawn (a stale
    Regenerate or Edit in a second tab); nothing was changed."""


CONVERSATION_CHANGED = ("This conversation changed in another tab or window after this page was drawn, so nothing "
                        "was changed; the page now shows what is stored.")
# begin_turn's `expected_last_id` when the caller does not check (the CLI, tests)
ANY_LAST = object()


@dataclass
class ConversationSummary:
    id: str
    title: str
    created_at: float
    updated_at: float
    message_count: int
    models: list[str]
    prompt_tokens: int
    completion_tokens: int
    unfinished: int  # assistant messages partial or interrupted
    backend: str | None = None  # the backend it talks to (None: the default)


@dataclass
class WorkspaceSummary:
    id: str
    owner: str | None
    created_at: float
    conversations: int


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class Store:
    def __init__(self, data_dir: Path | str | None = None):
        self.data_dir = Path(data_dir) if data_dir is not None else load_settings().data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / DB_NAME
        with self._connect() as db:
            # WAL: readers never block the writer, and a committed transaction survives a killed process.
            db.execute("PRAGMA journal_mode=WAL")
            if db.execute("PRAGMA user_version").fetchone()[0] == 0:  # new file
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._migrate()

    def _migrate(self) -> None:
        """Bring an older file up to SCHEMA_VERSION, one step per version, each in one transaction (a second process
        opening the file meanwhile waits, then finds it done)."""
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS.get(step, []):
                    db.execute(statement)
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise StorageError(f"the conversation store could not be opened: {exc}") from exc
        try:
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across a killed process, fast
            yield db
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.IntegrityError):  # a bug, not the disk: keep its traceback
                raise
            # "database or disk is full", "database is locked" (after the 30 s timeout), "disk I/O error", ...
            raise StorageError(f"the conversation store could not be written: {exc}") from exc
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:  # a failed COMMIT or I/O error may have ended the transaction already
                    pass
                raise
            db.execute("COMMIT")

    # ---- workspaces ----------------------------------------------------------------------------------------

    def create_workspace(self, workspace_id: str | None = None) -> str:
        """A new workspace (a random id unless one is given); giving an existing id is a no-op."""
        workspace_id = workspace_id or new_workspace_id()
        with self._connect() as db:
            db.execute("INSERT OR IGNORE INTO workspaces (id, owner, created_at) VALUES (?, NULL, ?)",
                       (workspace_id, time.time()))
        return workspace_id

    def workspace_exists(self, workspace_id: str) -> bool:
        with self._connect() as db:
            return db.execute("SELECT 1 FROM workspaces WHERE id = ?", (workspace_id,)).fetchone() is not None

    def workspace_owner(self, workspace_id: str) -> str | None:
        with self._connect() as db:
            row = db.execute("SELECT owner FROM workspaces WHERE id = ?", (workspace_id,)).fetchone()
        return row[0] if row else None

    def workspace_for_owner(self, owner: str) -> str:
        """The workspace of a signed-in identity, created on first sign-in with a random id (so it cannot be
        derived from the identity, and a URL never reaches it: see app_shared.open_workspace)."""
        with self._transaction() as db:
            row = db.execute("SELECT id FROM workspaces WHERE owner = ?", (owner,)).fetchone()
            if row:
                return row[0]
            workspace_id = new_workspace_id()
            db.execute("INSERT INTO workspaces (id, owner, created_at) VALUES (?, ?, ?)", (workspace_id, owner, time.time()))
            return workspace_id

    def list_workspaces(self) -> list[WorkspaceSummary]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT w.id, w.owner, w.created_at, COUNT(c.id) FROM workspaces w "
                "LEFT JOIN conversations c ON c.workspace = w.id GROUP BY w.id ORDER BY w.created_at"
            ).fetchall()
        return [WorkspaceSummary(*row) for row in rows]

    # ---- conversations -------------------------------------------------------------------------------------

    def list_conversations(self, workspace: str, search: str = "") -> list[ConversationSummary]:
        """The workspace's conversations, newest activity first; `search` matches titles and message text."""
        where, args = "c.workspace = ?", [workspace]
        if search.strip():
            pattern = f"%{_escape_like(search.strip())}%"
            where += (" AND (c.title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages s "
                      "WHERE s.conversation_id = c.id AND s.content LIKE ? ESCAPE '\\'))")
            args += [pattern, pattern]
        with self._connect() as db:
            rows = db.execute(
                f"""SELECT c.id, c.title, c.created_at, c.updated_at, c.backend, COUNT(m.id),
                           GROUP_CONCAT(DISTINCT m.model), COALESCE(SUM(m.prompt_tokens), 0),
                           COALESCE(SUM(m.completion_tokens), 0),
                           SUM(CASE WHEN m.status != 'complete' THEN 1 ELSE 0 END)
                    FROM conversations c LEFT JOIN messages m ON m.conversation_id = c.id
                    WHERE {where} GROUP BY c.id ORDER BY c.updated_at DESC, c.rowid DESC""",
                args,
            ).fetchall()
        return [
            ConversationSummary(cid, title, created, updated, count, sorted((models or "").split(",")) if models else [],
                                int(prompt), int(completion), int(unfinished or 0), backend)
            for cid, title, created, updated, backend, count, models, prompt, completion, unfinished in rows
        ]

    def get_conversation(self, workspace: str, conversation_id: str) -> Conversation | None:
        found = self.get_conversations(workspace, [conversation_id])
        return found[0] if found else None

    def get_conversations(self, workspace: str, ids: Iterable[str] | None = None) -> list[Conversation]:
        """Conversations with their messages, newest first: `ids` of this workspace (unknown ones are skipped),
        or all of it."""
        with self._connect() as db:
            query = "SELECT id, title, created_at, updated_at, backend FROM conversations WHERE workspace = ?"
            args: list = [workspace]
            if ids is not None:
                ids = list(ids)
                if not ids:
                    return []
                query += f" AND id IN ({','.join('?' * len(ids))})"
                args += ids
            heads = db.execute(query + " ORDER BY updated_at DESC, rowid DESC", args).fetchall()
            conversations = [Conversation(id=i, title=t, created_at=c, updated_at=u, backend=b) for i, t, c, u, b in heads]
            for conversation in conversations:
                rows = db.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? ORDER BY position",
                                  (conversation.id,)).fetchall()
                conversation.messages = [self._message_from_row(row) for row in rows]
        return conversations

    def rename_conversation(self, workspace: str, conversation_id: str, title: str) -> None:
        title = clean_title(title)
        with self._connect() as db:
            changed = db.execute("UPDATE conversations SET title = ? WHERE id = ? AND workspace = ?",
                                 (title, conversation_id, workspace)).rowcount
        if not changed:
            raise NotFound("no such conversation in this workspace")

    def set_backend(self, workspace: str, conversation_id: str, backend: str | None) -> None:
        """Switch the backend a conversation talks to (its history goes along; replies keep their model)."""
        with self._connect() as db:
            changed = db.execute("UPDATE conversations SET backend = ? WHERE id = ? AND workspace = ?",
                                 (backend, conversation_id, workspace)).rowcount
        if not changed:
            raise NotFound("no such conversation in this workspace")

    def delete_conversation(self, workspace: str, conversation_id: str) -> bool:
        with self._connect() as db:
            return db.execute("DELETE FROM conversations WHERE id = ? AND workspace = ?",
                              (conversation_id, workspace)).rowcount > 0

    # ---- one chat turn -------------------------------------------------------------------------------------

    def begin_turn(self, workspace: str, conversation: Conversation, keep: int, prompt: ChatMessage | None,
                   reply: ChatMessage, expected_last_id=ANY_LAST) -> tuple[int | None, int, bool]:
        """In one transaction: create the conversation if it is new, drop its messages from position `keep` on
        (regenerate, edit), append `prompt` (None: reply to the kept messages) and the `reply` row, marked partial.

        With `expected_last_id` (the id of the last message the page showed, None for an empty conversation), a
        conversation whose last message is another one now raises ConversationChanged and nothing is written:
        a Regenerate drawn before another tab added turns must not delete them.

        Returns the row ids of the prompt (or None) and of the reply, and whether the conversation was created.
        """
        now = time.time()
        created = False
        with self._transaction() as db:
            row = db.execute("SELECT workspace FROM conversations WHERE id = ?", (conversation.id,)).fetchone()
            if row is None:
                title = clean_title(conversation.title or title_from_prompt(prompt.content if prompt else ""))
                db.execute("INSERT OR IGNORE INTO workspaces (id, owner, created_at) VALUES (?, NULL, ?)",
                           (workspace, now))
                db.execute("INSERT INTO conversations (id, workspace, title, created_at, updated_at, backend) "
                           "VALUES (?, ?, ?, ?, ?, ?)",
                           (conversation.id, workspace, title, conversation.created_at, now, conversation.backend))
                conversation.title, created = title, True
            elif row[0] != workspace:
                raise NotFound("no such conversation in this workspace")
            if expected_last_id is not ANY_LAST:
                last = db.execute("SELECT id FROM messages WHERE conversation_id = ? ORDER BY position DESC LIMIT 1",
                                  (conversation.id,)).fetchone()
                if (last[0] if last else None) != expected_last_id:
                    raise ConversationChanged(CONVERSATION_CHANGED)
            db.execute("DELETE FROM messages WHERE conversation_id = ? AND position >= ?", (conversation.id, keep))
            position, prompt_id = keep, None
            if prompt is not None:
                prompt.status = "complete"
                prompt_id = self._insert_message(db, conversation.id, position, prompt)
                position += 1
            reply.status = "partial"
            reply_id = self._insert_message(db, conversation.id, position, reply)
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation.id))
        return prompt_id, reply_id, created

    def write_partial(self, workspace: str, message_id: int, content: str) -> None:
        """The reply so far (also the heartbeat that tells a live partial reply from an interrupted one)."""
        with self._connect() as db:
            # status: a portal that started meanwhile marked the row interrupted, yet its writer is alive.
            db.execute(
                "UPDATE messages SET content = ?, updated_at = ?, status = 'partial' WHERE id = ? AND status != 'complete' "
                "AND conversation_id IN (SELECT id FROM conversations WHERE workspace = ?)",
                (content, time.time(), message_id, workspace),
            )

    def finish_reply(self, workspace: str, message_id: int, content: str, stats: dict, finish_reason: str,
                     error: str | None) -> ChatMessage:
        now = time.time()
        with self._transaction() as db:
            conversation_id = self._owned_message(db, workspace, message_id)
            db.execute(
                f"UPDATE messages SET content = ?, updated_at = ?, status = 'complete', finish_reason = ?, error = ?, "
                f"{', '.join(f'{name} = ?' for name in STATS_FIELDS)} WHERE id = ?",
                (content, now, finish_reason, error, *(stats.get(name) for name in STATS_FIELDS), message_id),
            )
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
            row = db.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)).fetchone()
        return self._message_from_row(row)

    def delete_messages(self, workspace: str, message_ids: Iterable[int]) -> None:
        """Take back a turn that produced nothing (the prompt is handed back to the user to edit)."""
        with self._transaction() as db:
            for message_id in message_ids:
                self._owned_message(db, workspace, message_id)
                db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    def recover_interrupted(self) -> int:
        """Mark every reply left partial as interrupted: call when a server starts, before it generates anything
        (a partial row then can only belong to a process that died)."""
        with self._connect() as db:
            return db.execute("UPDATE messages SET status = 'interrupted' WHERE status = 'partial'").rowcount

    # ---- import --------------------------------------------------------------------------------------------

    def import_conversations(self, workspace: str, conversations: list[Conversation]) -> list[str]:
        """Add whole conversations, all or none (one transaction). Each gets a new id; times are kept."""
        ids = []
        with self._transaction() as db:
            db.execute("INSERT OR IGNORE INTO workspaces (id, owner, created_at) VALUES (?, NULL, ?)",
                       (workspace, time.time()))
            for conversation in conversations:
                conversation.id = new_conversation_id()
                updated = conversation.updated_at or max([conversation.created_at] + [m.created_at for m in conversation.messages])
                db.execute("INSERT INTO conversations (id, workspace, title, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                           (conversation.id, workspace, clean_title(conversation.title), conversation.created_at, updated))
                for position, message in enumerate(conversation.messages):
                    if message.status == "partial":  # nobody is generating it here
                        message.status = "interrupted"
                    self._insert_message(db, conversation.id, position, message)
                ids.append(conversation.id)
        return ids

    # ---- rows ----------------------------------------------------------------------------------------------

    @staticmethod
    def _owned_message(db: sqlite3.Connection, workspace: str, message_id: int) -> str:
        row = db.execute(
            "SELECT m.conversation_id FROM messages m JOIN conversations c ON c.id = m.conversation_id "
            "WHERE m.id = ? AND c.workspace = ?", (message_id, workspace),
        ).fetchone()
        if row is None:
            raise NotFound("no such message in this workspace")
        return row[0]

    @staticmethod
    def _insert_message(db: sqlite3.Connection, conversation_id: str, position: int, m: ChatMessage) -> int:
        if m.role not in ROLES:
            raise ValueError(f"unknown role {m.role!r}")
        stats = m.stats or {}
        cursor = db.execute(
            f"INSERT INTO messages (conversation_id, position, {', '.join(_ROW_FIELDS)}) "
            f"VALUES ({', '.join('?' * (len(_ROW_FIELDS) + 2))})",
            (conversation_id, position, m.role, m.content, m.created_at, m.updated_at or m.created_at, m.status,
             m.finish_reason, m.error, m.model, m.precision,
             json.dumps(m.params, ensure_ascii=False) if m.params is not None else None,
             *(stats.get(name) for name in STATS_FIELDS)),
        )
        m.id = cursor.lastrowid
        return m.id

    @staticmethod
    def _message_from_row(row: tuple) -> ChatMessage:
        (mid, _position, role, content, created, updated, status, finish, error, model, precision, params,
         *stat_values) = row
        stats = None
        if any(v is not None for v in stat_values):
            stats = {name: (int(v) if name in _INT_STATS else float(v)) if v is not None else 0
                     for name, v in zip(STATS_FIELDS, stat_values)}
        return ChatMessage(role=role, content=content, created_at=created, updated_at=updated,
                           params=json.loads(params) if params else None, model=model, precision=precision,
                           stats=stats, finish_reason=finish, error=error, status=status, id=mid)


def clean_title(title: str) -> str:
    """One line, trimmed, at most TITLE_MAX_CHARS; an empty title becomes "New conversation"."""
    title = " ".join(str(title).split())
    return title[:TITLE_MAX_CHARS] or "New conversation"
