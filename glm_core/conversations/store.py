"""The conversation store: workspaces, conversations and messages in one SQLite file (WAL) under GLM_DATA_DIR.

Every read and write names its workspace, and every query filters by it: a conversation id from another
workspace finds nothing. A connection per operation keeps it safe to share one Store between the threads of
every browser session (and between processes: the portal and the CLI may use the same file at once).

The schema is version 1 plus migrations, applied in order in one transaction when a file is opened (a new file
goes through the same steps): version 2 makes messages a tree (reply versions and branches) and adds pins,
archives, share links, workspace settings and system-prompt presets; 3 the backend a conversation talks to; 4 tool
calls and results (the `tool` role, an assistant's calls, a result's call) and a conversation's tools.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..settings import load_settings
from .conversation import (
    STATS_FIELDS,
    TITLE_MAX_CHARS,
    ChatMessage,
    Conversation,
    new_conversation_id,
    title_from_prompt,
)
from .workspace import new_workspace_id

DB_NAME = "conversations.sqlite3"
SCHEMA_VERSION = 4
ROLES = ("system", "user", "assistant", "tool")
SHARE_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{32}")  # secrets.token_urlsafe(24): 192 random bits
PRESET_NAME_MAX_CHARS = 60
PRESET_TEXT_MAX_CHARS = 32_000
MAX_PRESETS = 100  # per workspace

_SCHEMA_V1 = f"""
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
    updated_at REAL NOT NULL
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

_ROW_FIELDS = (
    "role",
    "content",
    "created_at",
    "updated_at",
    "status",
    "finish_reason",
    "error",
    "model",
    "precision",
    "params",
    *STATS_FIELDS,
)

# Version 2: a message's place is its parent, not a position, so one prompt can have several replies and one reply
# several follow-ups. SQLite cannot drop the UNIQUE (conversation_id, position) constraint, so the table is rebuilt
# (SQLite's documented procedure) and each message's parent is the one before it. `chosen_at` is when a version was
# last chosen (made, or flipped to): the chosen path takes the child chosen last at each step (conversation.chosen_path).
_MIGRATE_TO_2 = f"""
CREATE TABLE messages_v2 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    parent_id INTEGER REFERENCES messages_v2(id) ON DELETE CASCADE,
    chosen_at REAL,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('complete', 'partial', 'interrupted')),
    finish_reason TEXT,
    error TEXT,
    model TEXT,
    precision TEXT,
    params TEXT,
    {", ".join(f"{name} REAL" for name in STATS_FIELDS)}
);
INSERT INTO messages_v2 (id, conversation_id, parent_id, chosen_at, {", ".join(_ROW_FIELDS)})
    SELECT id, conversation_id, LAG(id) OVER (PARTITION BY conversation_id ORDER BY position), created_at,
           {", ".join(_ROW_FIELDS)}
    FROM messages;
DROP TABLE messages;
ALTER TABLE messages_v2 RENAME TO messages;
CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
CREATE INDEX messages_by_parent ON messages(parent_id);
ALTER TABLE conversations ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE conversations ADD COLUMN archived INTEGER NOT NULL DEFAULT 0;
ALTER TABLE conversations ADD COLUMN share_token TEXT;
CREATE UNIQUE INDEX conversations_by_share_token ON conversations(share_token) WHERE share_token IS NOT NULL;
CREATE TABLE workspace_settings (
    workspace TEXT NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value TEXT NOT NULL,            -- JSON
    PRIMARY KEY (workspace, name)
);
CREATE TABLE system_prompt_presets (
    workspace TEXT NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    text TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (workspace, name)
);
"""

# Version 3: each conversation remembers the backend (by its name in GLM_BACKENDS) it talks to; NULL: the default.
_MIGRATE_TO_3 = "ALTER TABLE conversations ADD COLUMN backend TEXT;\n"

# Version 4: tool calls. The role CHECK gains 'tool', which SQLite can only change by rebuilding the table (as in
# version 2); an assistant's calls (JSON), a result's call id and function name become columns, and a conversation
# keeps the tools its turns offer (JSON). Every existing row keeps its id, parent and values.
_COLUMNS_V3 = "id, conversation_id, parent_id, chosen_at, " + ", ".join(_ROW_FIELDS)
_MIGRATE_TO_4 = f"""
CREATE TABLE messages_v4 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    parent_id INTEGER REFERENCES messages_v4(id) ON DELETE CASCADE,
    chosen_at REAL,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('complete', 'partial', 'interrupted')),
    finish_reason TEXT,
    error TEXT,
    model TEXT,
    precision TEXT,
    params TEXT,
    {", ".join(f"{name} REAL" for name in STATS_FIELDS)},
    tool_calls TEXT,                -- JSON: [{{"id", "name", "arguments"}}] an assistant's calls
    tool_call_id TEXT,              -- a tool's result: the call it answers
    tool_name TEXT                  -- a tool's result: the function called
);
INSERT INTO messages_v4 ({_COLUMNS_V3}) SELECT {_COLUMNS_V3} FROM messages;
DROP TABLE messages;
ALTER TABLE messages_v4 RENAME TO messages;
CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
CREATE INDEX messages_by_parent ON messages(parent_id);
ALTER TABLE conversations ADD COLUMN tools TEXT;
"""

MIGRATIONS = {
    1: _SCHEMA_V1,
    2: _MIGRATE_TO_2,
    3: _MIGRATE_TO_3,
    4: _MIGRATE_TO_4,
}  # version -> the SQL that brings the version before it there

_TOOL_FIELDS = ("tool_calls", "tool_call_id", "tool_name")
_MESSAGE_COLUMNS = "id, parent_id, chosen_at, " + ", ".join(_ROW_FIELDS + _TOOL_FIELDS)
_CONVERSATION_COLUMNS = "id, title, created_at, updated_at, pinned, archived, backend, tools"
# A message and its ancestors: choosing a version chooses the path down to it.
_MARK_CHOSEN = """WITH RECURSIVE up(id) AS (
    SELECT ? UNION ALL SELECT m.parent_id FROM messages m JOIN up ON m.id = up.id WHERE m.parent_id IS NOT NULL)
UPDATE messages SET chosen_at = ? WHERE id IN (SELECT id FROM up)"""
_INT_STATS = {"prompt_tokens", "reused_tokens", "prefill_tokens", "completion_tokens"}


class NotFound(LookupError):
    """No such conversation or message in this workspace."""


class StorageError(RuntimeError):
    """The database could not be read or written (disk full, locked too long, I/O error, corrupt file);
    str(error) is one line for the user. Whatever the operation was, it changed nothing."""


class ConversationChanged(RuntimeError):
    """A turn was asked for on a conversation that has changed since the page that asked was drawn (a stale
    Regenerate or Edit in a second tab); nothing was changed."""


CONVERSATION_CHANGED = (
    "This conversation changed in another tab or window after this page was drawn, so nothing "
    "was changed; the page now shows what is stored."
)
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
    pinned: bool = False
    archived: bool = False
    shared: bool = False
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
            if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                self._migrate(db)

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Bring the file to SCHEMA_VERSION in one transaction (another process opening it at once waits, then
        finds it done). Foreign keys are off meanwhile, as SQLite's table-rebuild procedure requires."""
        db.execute("PRAGMA foreign_keys=OFF")
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{DB_NAME} is schema version {version}, newer than this app ({SCHEMA_VERSION})")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step].split(";\n"):  # executescript would commit half-way
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={step}")
            if db.execute("PRAGMA foreign_key_check").fetchone() is not None:
                raise RuntimeError(f"{DB_NAME}: the migration left a dangling reference; nothing was changed")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        db.execute("PRAGMA foreign_keys=ON")

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
            db.execute(
                "INSERT OR IGNORE INTO workspaces (id, owner, created_at) VALUES (?, NULL, ?)",
                (workspace_id, time.time()),
            )
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
            db.execute(
                "INSERT INTO workspaces (id, owner, created_at) VALUES (?, ?, ?)", (workspace_id, owner, time.time())
            )
            return workspace_id

    def list_workspaces(self) -> list[WorkspaceSummary]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT w.id, w.owner, w.created_at, COUNT(c.id) FROM workspaces w "
                "LEFT JOIN conversations c ON c.workspace = w.id GROUP BY w.id ORDER BY w.created_at"
            ).fetchall()
        return [WorkspaceSummary(*row) for row in rows]

    # ---- conversations -------------------------------------------------------------------------------------

    def list_conversations(
        self, workspace: str, search: str = "", archived: bool | None = None
    ) -> list[ConversationSummary]:
        """The workspace's conversations, pinned first, then newest activity first; `search` matches titles and the
        text of every version of every message; `archived` True or False lists only those (None: all)."""
        where, args = "c.workspace = ?", [workspace]
        if archived is not None:
            where += " AND c.archived = ?"
            args.append(int(archived))
        if search.strip():
            pattern = f"%{_escape_like(search.strip())}%"
            where += (
                " AND (c.title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages s "
                "WHERE s.conversation_id = c.id AND s.content LIKE ? ESCAPE '\\'))"
            )
            args += [pattern, pattern]
        with self._connect() as db:
            rows = db.execute(
                f"""SELECT c.id, c.title, c.created_at, c.updated_at, c.backend, COUNT(m.id),
                           GROUP_CONCAT(DISTINCT m.model), COALESCE(SUM(m.prompt_tokens), 0),
                           COALESCE(SUM(m.completion_tokens), 0),
                           SUM(CASE WHEN m.status != 'complete' THEN 1 ELSE 0 END),
                           c.pinned, c.archived, c.share_token IS NOT NULL
                    FROM conversations c LEFT JOIN messages m ON m.conversation_id = c.id
                    WHERE {where} GROUP BY c.id ORDER BY c.pinned DESC, c.updated_at DESC, c.rowid DESC""",
                args,
            ).fetchall()
        return [
            ConversationSummary(
                cid,
                title,
                created,
                updated,
                count,
                sorted((models or "").split(",")) if models else [],
                int(prompt),
                int(completion),
                int(unfinished or 0),
                bool(pinned),
                bool(archived),
                bool(shared),
                backend,
            )
            for cid, title, created, updated, backend, count, models, prompt, completion, unfinished, pinned, archived, shared in rows
        ]

    def get_conversation(self, workspace: str, conversation_id: str) -> Conversation | None:
        found = self.get_conversations(workspace, [conversation_id])
        return found[0] if found else None

    def get_conversations(self, workspace: str, ids: Iterable[str] | None = None) -> list[Conversation]:
        """Conversations with every version of their messages and the chosen path, newest first: `ids` of this
        workspace (unknown ones are skipped), or all of it."""
        with self._connect() as db:
            query = f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE workspace = ?"
            args: list = [workspace]
            if ids is not None:
                ids = list(ids)
                if not ids:
                    return []
                query += f" AND id IN ({','.join('?' * len(ids))})"
                args += ids
            heads = db.execute(query + " ORDER BY updated_at DESC, rowid DESC", args).fetchall()
            return [self._conversation_from_row(db, head) for head in heads]

    def _conversation_from_row(self, db: sqlite3.Connection, head: tuple) -> Conversation:
        cid, title, created, updated, pinned, archived, backend, tools = head
        rows = db.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? ORDER BY id", (cid,)
        ).fetchall()
        return Conversation.from_tree(
            [self._message_from_row(row) for row in rows],
            id=cid,
            title=title,
            created_at=created,
            updated_at=updated,
            pinned=bool(pinned),
            archived=bool(archived),
            backend=backend,
            tools=json.loads(tools) if tools else [],
        )

    def choose_version(self, workspace: str, conversation_id: str, message_id: int) -> None:
        """Show the path through `message_id` (a version of a reply, a branch of a prompt) from now on, with the
        versions below it that were chosen last."""
        with self._transaction() as db:
            owned = db.execute(
                "SELECT 1 FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                "WHERE m.id = ? AND c.id = ? AND c.workspace = ?",
                (message_id, conversation_id, workspace),
            ).fetchone()
            if owned is None:
                raise NotFound("no such message in this conversation")
            db.execute(_MARK_CHOSEN, (message_id, time.time()))

    def set_pinned(self, workspace: str, conversation_id: str, pinned: bool) -> None:
        self._set_flag(workspace, conversation_id, "pinned", pinned)

    def set_archived(self, workspace: str, conversation_id: str, archived: bool) -> None:
        self._set_flag(workspace, conversation_id, "archived", archived)

    def _set_flag(self, workspace: str, conversation_id: str, column: str, value: bool) -> None:
        with self._connect() as db:
            changed = db.execute(
                f"UPDATE conversations SET {column} = ? WHERE id = ? AND workspace = ?",
                (int(value), conversation_id, workspace),
            ).rowcount
        if not changed:
            raise NotFound("no such conversation in this workspace")

    # ---- share links: a random token per conversation, revocable; it opens that conversation only, read-only ---

    def share(self, workspace: str, conversation_id: str) -> str:
        """The conversation's share token, made on first use."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT share_token FROM conversations WHERE id = ? AND workspace = ?", (conversation_id, workspace)
            ).fetchone()
            if row is None:
                raise NotFound("no such conversation in this workspace")
            if row[0]:
                return row[0]
            token = secrets.token_urlsafe(24)
            db.execute("UPDATE conversations SET share_token = ? WHERE id = ?", (token, conversation_id))
            return token

    def share_token(self, workspace: str, conversation_id: str) -> str | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT share_token FROM conversations WHERE id = ? AND workspace = ?", (conversation_id, workspace)
            ).fetchone()
        return row[0] if row else None

    def revoke_share(self, workspace: str, conversation_id: str) -> None:
        """The old link stops working at once; sharing again makes a new token."""
        with self._connect() as db:
            db.execute(
                "UPDATE conversations SET share_token = NULL WHERE id = ? AND workspace = ?",
                (conversation_id, workspace),
            )

    def shared_conversation(self, token: object) -> Conversation | None:
        """The one conversation a share token opens, or None (malformed, unknown or revoked)."""
        if not isinstance(token, str) or not SHARE_TOKEN_RE.fullmatch(token):
            return None
        with self._connect() as db:
            head = db.execute(
                f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE share_token = ?", (token,)
            ).fetchone()
            return self._conversation_from_row(db, head) if head else None

    # ---- per-workspace settings and system-prompt presets ------------------------------------------------------

    def get_setting(self, workspace: str, name: str, default=None):
        with self._connect() as db:
            row = db.execute(
                "SELECT value FROM workspace_settings WHERE workspace = ? AND name = ?", (workspace, name)
            ).fetchone()
        return json.loads(row[0]) if row else default

    def set_setting(self, workspace: str, name: str, value) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT OR IGNORE INTO workspaces (id, owner, created_at) VALUES (?, NULL, ?)", (workspace, time.time())
            )
            db.execute(
                "INSERT INTO workspace_settings (workspace, name, value) VALUES (?, ?, ?) "
                "ON CONFLICT (workspace, name) DO UPDATE SET value = excluded.value",
                (workspace, name, json.dumps(value, ensure_ascii=False)),
            )

    def list_presets(self, workspace: str) -> dict[str, str]:
        """The workspace's system-prompt presets, by name, in name order."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT name, text FROM system_prompt_presets WHERE workspace = ? ORDER BY name COLLATE NOCASE",
                (workspace,),
            ).fetchall()
        return dict(rows)

    def save_preset(self, workspace: str, name: str, text: str) -> str:
        """Add or replace a preset; returns its cleaned name. ValueError when the name or text does not fit."""
        name = " ".join(str(name).split())
        if not name or len(name) > PRESET_NAME_MAX_CHARS:
            raise ValueError(f"a preset needs a name of 1 to {PRESET_NAME_MAX_CHARS} characters")
        if len(text) > PRESET_TEXT_MAX_CHARS:
            raise ValueError(f"a preset holds at most {PRESET_TEXT_MAX_CHARS:,} characters")
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO workspaces (id, owner, created_at) VALUES (?, NULL, ?)", (workspace, time.time())
            )
            count = db.execute(
                "SELECT COUNT(*) FROM system_prompt_presets WHERE workspace = ? AND name != ?", (workspace, name)
            ).fetchone()[0]
            if count >= MAX_PRESETS:
                raise ValueError(f"a workspace keeps at most {MAX_PRESETS} presets; delete one first")
            db.execute(
                "INSERT INTO system_prompt_presets (workspace, name, text, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (workspace, name) DO UPDATE SET text = excluded.text",
                (workspace, name, text, time.time()),
            )
        return name

    def delete_preset(self, workspace: str, name: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM system_prompt_presets WHERE workspace = ? AND name = ?", (workspace, name))

    def rename_conversation(self, workspace: str, conversation_id: str, title: str) -> None:
        title = clean_title(title)
        with self._connect() as db:
            changed = db.execute(
                "UPDATE conversations SET title = ? WHERE id = ? AND workspace = ?", (title, conversation_id, workspace)
            ).rowcount
        if not changed:
            raise NotFound("no such conversation in this workspace")

    def set_backend(self, workspace: str, conversation_id: str, backend: str | None) -> None:
        """Switch the backend a conversation talks to (its history goes along; replies keep their model)."""
        with self._connect() as db:
            changed = db.execute(
                "UPDATE conversations SET backend = ? WHERE id = ? AND workspace = ?",
                (backend, conversation_id, workspace),
            ).rowcount
        if not changed:
            raise NotFound("no such conversation in this workspace")

    def set_tools(self, workspace: str, conversation_id: str, tools: list[dict]) -> None:
        """The tools the conversation's next turns offer the model (checked by glm_core.tool_calls.check_tools)."""
        with self._connect() as db:
            changed = db.execute(
                "UPDATE conversations SET tools = ? WHERE id = ? AND workspace = ?",
                (_tools_json(tools), conversation_id, workspace),
            ).rowcount
        if not changed:
            raise NotFound("no such conversation in this workspace")

    def delete_conversation(self, workspace: str, conversation_id: str) -> bool:
        with self._connect() as db:
            return (
                db.execute(
                    "DELETE FROM conversations WHERE id = ? AND workspace = ?", (conversation_id, workspace)
                ).rowcount
                > 0
            )

    # ---- one chat turn -------------------------------------------------------------------------------------

    def begin_turn(
        self,
        workspace: str,
        conversation: Conversation,
        keep: int,
        prompt: ChatMessage | list[ChatMessage] | None,
        reply: ChatMessage,
        expected_last_id=ANY_LAST,
    ) -> tuple[int | None, int, bool]:
        """In one transaction: create the conversation if it is new, then after the first `keep` messages of its
        chosen path add `prompt` (None: reply to them as they are; a list: several in a row, e.g. the results of
        a reply's tool calls) and the `reply` row, marked partial. Nothing is
        deleted: a regenerated reply becomes another version, an edited prompt another branch, and the new reply
        is where the chosen path now goes.

        With `expected_last_id` (the id of the last message the page showed, None for an empty conversation), a
        conversation whose last message is another one now raises ConversationChanged and nothing is written:
        a Regenerate drawn before another tab added turns must not delete them.

        Returns the row id of the prompt (the first, of a list; or None) and of the reply, and whether the
        conversation was created.
        """
        now = time.time()
        created = False
        prompts = prompt if isinstance(prompt, list) else [prompt] if prompt is not None else []
        first_user = next((p.content for p in prompts if p.role == "user"), "")
        with self._transaction() as db:
            row = db.execute("SELECT workspace FROM conversations WHERE id = ?", (conversation.id,)).fetchone()
            if row is None:
                title = clean_title(conversation.title or title_from_prompt(first_user))
                db.execute(
                    "INSERT OR IGNORE INTO workspaces (id, owner, created_at) VALUES (?, NULL, ?)", (workspace, now)
                )
                db.execute(
                    "INSERT INTO conversations (id, workspace, title, created_at, updated_at, backend, tools) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        conversation.id,
                        workspace,
                        title,
                        conversation.created_at,
                        now,
                        conversation.backend,
                        _tools_json(conversation.tools),
                    ),
                )
                conversation.title, created = title, True
            elif row[0] != workspace:
                raise NotFound("no such conversation in this workspace")
            if expected_last_id is not ANY_LAST:
                head = db.execute(
                    f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = ?", (conversation.id,)
                ).fetchone()
                path = self._conversation_from_row(db, head).messages
                if (path[-1].id if path else None) != expected_last_id:
                    raise ConversationChanged(CONVERSATION_CHANGED)
            parent = conversation.messages[keep - 1].id if keep > 0 else None
            if (
                parent is not None
                and db.execute(
                    "SELECT 1 FROM messages WHERE id = ? AND conversation_id = ?", (parent, conversation.id)
                ).fetchone()
                is None
            ):
                raise NotFound("that message was deleted meanwhile")
            prompt_id = None
            for message in prompts:
                message.status, message.parent_id, message.chosen_at = "complete", parent, now
                parent = self._insert_message(db, conversation.id, message)
                prompt_id = parent if prompt_id is None else prompt_id
            reply.status, reply.parent_id, reply.chosen_at = "partial", parent, now
            reply_id = self._insert_message(db, conversation.id, reply)
            db.execute(_MARK_CHOSEN, (reply_id, now))  # the path the reply was asked on, even if another tab moved
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

    def finish_reply(
        self,
        workspace: str,
        message_id: int,
        content: str,
        stats: dict,
        finish_reason: str,
        error: str | None,
        tool_calls: list[dict] | None = None,
    ) -> ChatMessage:
        """The reply's final text (less its tool calls, when it made some: `tool_calls`) and figures."""
        now = time.time()
        with self._transaction() as db:
            conversation_id = self._owned_message(db, workspace, message_id)
            db.execute(
                f"UPDATE messages SET content = ?, updated_at = ?, status = 'complete', finish_reason = ?, error = ?, "
                f"tool_calls = ?, {', '.join(f'{name} = ?' for name in STATS_FIELDS)} WHERE id = ?",
                (
                    content,
                    now,
                    finish_reason,
                    error,
                    _calls_json(tool_calls),
                    *(stats.get(name) for name in STATS_FIELDS),
                    message_id,
                ),
            )
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
            row = db.execute(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (message_id,)).fetchone()
        return self._message_from_row(row)

    def delete_messages(self, workspace: str, message_ids: Iterable[int], chosen_before: int | None = None) -> None:
        """Take back a turn that produced nothing (the prompt is handed back to the user to edit). Their replies
        go with them; the chosen path goes back through `chosen_before` (where it went before the turn)."""
        with self._transaction() as db:
            for message_id in message_ids:
                conversation_id = self._owned_message(db, workspace, message_id)
                db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            if (
                chosen_before is not None
                and db.execute(
                    "SELECT 1 FROM messages WHERE id = ? AND conversation_id = ?", (chosen_before, conversation_id)
                ).fetchone()
            ):
                db.execute(_MARK_CHOSEN, (chosen_before, time.time()))

    def recover_interrupted(self) -> int:
        """Mark every reply left partial as interrupted: call when a server starts, before it generates anything
        (a partial row then can only belong to a process that died)."""
        with self._connect() as db:
            return db.execute("UPDATE messages SET status = 'interrupted' WHERE status = 'partial'").rowcount

    # ---- import --------------------------------------------------------------------------------------------

    def import_conversations(self, workspace: str, conversations: list[Conversation]) -> list[str]:
        """Add whole conversations, all or none (one transaction). Each gets a new id; times are kept.

        A conversation with a `tree` keeps every version: its messages' `id` and `parent_id` are the file's own
        numbers (parents first), mapped to new rows; `messages` (the chosen path) stays the chosen path. Without a
        tree, `messages` is one line.
        """
        ids = []
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO workspaces (id, owner, created_at) VALUES (?, NULL, ?)", (workspace, time.time())
            )
            for conversation in conversations:
                conversation.id = new_conversation_id()
                updated = conversation.updated_at or max(
                    [conversation.created_at] + [m.created_at for m in conversation.messages]
                )
                db.execute(
                    "INSERT INTO conversations (id, workspace, title, created_at, updated_at, pinned, archived, "
                    "backend, tools) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        conversation.id,
                        workspace,
                        clean_title(conversation.title),
                        conversation.created_at,
                        updated,
                        int(conversation.pinned),
                        int(conversation.archived),
                        conversation.backend,
                        _tools_json(conversation.tools),
                    ),
                )
                now, on_path = time.time(), {id(m) for m in conversation.messages}
                new_ids: dict[int, int] = {}
                previous = None
                for message in conversation.tree or conversation.messages:
                    if message.status == "partial":  # nobody is generating it here
                        message.status = "interrupted"
                    message.chosen_at = now if id(message) in on_path else message.created_at
                    if conversation.tree:
                        local_id, parent = message.id, message.parent_id
                        message.parent_id = new_ids[parent] if parent is not None else None
                    else:  # one line: each message follows the one before
                        local_id, message.parent_id = None, previous
                    previous = self._insert_message(db, conversation.id, message)
                    if local_id is not None:
                        new_ids[local_id] = previous
                ids.append(conversation.id)
        return ids

    # ---- rows ----------------------------------------------------------------------------------------------

    @staticmethod
    def _owned_message(db: sqlite3.Connection, workspace: str, message_id: int) -> str:
        row = db.execute(
            "SELECT m.conversation_id FROM messages m JOIN conversations c ON c.id = m.conversation_id "
            "WHERE m.id = ? AND c.workspace = ?",
            (message_id, workspace),
        ).fetchone()
        if row is None:
            raise NotFound("no such message in this workspace")
        return row[0]

    @staticmethod
    def _insert_message(db: sqlite3.Connection, conversation_id: str, m: ChatMessage) -> int:
        if m.role not in ROLES:
            raise ValueError(f"unknown role {m.role!r}")
        stats = m.stats or {}
        cursor = db.execute(
            f"INSERT INTO messages (conversation_id, parent_id, chosen_at, {', '.join(_ROW_FIELDS + _TOOL_FIELDS)}) "
            f"VALUES ({', '.join('?' * (len(_ROW_FIELDS) + len(_TOOL_FIELDS) + 3))})",
            (
                conversation_id,
                m.parent_id,
                m.chosen_at if m.chosen_at is not None else m.created_at,
                m.role,
                m.content,
                m.created_at,
                m.updated_at or m.created_at,
                m.status,
                m.finish_reason,
                m.error,
                m.model,
                m.precision,
                json.dumps(m.params, ensure_ascii=False) if m.params is not None else None,
                *(stats.get(name) for name in STATS_FIELDS),
                _calls_json(m.tool_calls),
                m.tool_call_id,
                m.tool_name,
            ),
        )
        m.id = cursor.lastrowid
        return m.id

    @staticmethod
    def _message_from_row(row: tuple) -> ChatMessage:
        (
            mid,
            parent_id,
            chosen_at,
            role,
            content,
            created,
            updated,
            status,
            finish,
            error,
            model,
            precision,
            params,
            *stat_values,
        ) = row
        stat_values, (tool_calls, tool_call_id, tool_name) = stat_values[: len(STATS_FIELDS)], stat_values[-3:]
        stats = None
        if any(v is not None for v in stat_values):
            stats = {
                name: (int(v) if name in _INT_STATS else float(v)) if v is not None else 0
                for name, v in zip(STATS_FIELDS, stat_values)
            }
        return ChatMessage(
            role=role,
            content=content,
            created_at=created,
            updated_at=updated,
            params=json.loads(params) if params else None,
            model=model,
            precision=precision,
            stats=stats,
            finish_reason=finish,
            error=error,
            status=status,
            id=mid,
            parent_id=parent_id,
            chosen_at=chosen_at,
            tool_calls=json.loads(tool_calls) if tool_calls else None,
            tool_call_id=tool_call_id,
            tool_name=tool_name,
        )


def _tools_json(tools: list[dict] | None) -> str | None:
    return json.dumps(tools, ensure_ascii=False) if tools else None


def _calls_json(calls: list[dict] | None) -> str | None:
    return json.dumps(calls, ensure_ascii=False) if calls else None


def clean_title(title: str) -> str:
    """One line, trimmed, at most TITLE_MAX_CHARS; an empty title becomes "New conversation"."""
    title = " ".join(str(title).split())
    return title[:TITLE_MAX_CHARS] or "New conversation"
