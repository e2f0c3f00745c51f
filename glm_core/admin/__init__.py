"""Team administration: personal API keys, usage accounting, quotas, the audit log and access per backend, kept
in the data folder's admin.sqlite3. One `Admin` per data folder and process (`admin_for`), shared by the pages, the
API and their threads, so the running-replies count and the usage writer are the process's."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from ..settings import load_settings
from .audit import AuditLog
from .backend_access import BackendAccess
from .db import AdminDB
from .keys import KeyStore
from .quotas import Quotas
from .usage import UsageRecorder

SELF_SERVICE_KEYS = "self_service_keys"  # admin setting: a signed-in person may make their own keys


class Admin:
    def __init__(self, data_dir: Path | str):
        self.db = AdminDB(data_dir)
        self.keys = KeyStore(self.db)
        self.usage = UsageRecorder(self.db)
        self.quotas = Quotas(self.db, self.usage)
        self.audit = AuditLog(self.db)
        self.backend_access = BackendAccess(self.db)

    def setting(self, name: str, default=None):
        with self.db.connect() as db:
            row = db.execute("SELECT value FROM admin_settings WHERE name = ?", (name,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_setting(self, name: str, value) -> None:
        with self.db.connect() as db:
            db.execute(
                "INSERT INTO admin_settings (name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                (name, json.dumps(value)),
            )

    def close(self) -> None:
        self.usage.close()


_admins: dict[str, Admin] = {}
_lock = threading.Lock()


def admin_for(data_dir: Path | str | None = None) -> Admin:
    """The process's Admin of a data folder (default: GLM_DATA_DIR's)."""
    folder = str(Path(data_dir if data_dir is not None else load_settings().data_dir).resolve())
    with _lock:
        if folder not in _admins:
            _admins[folder] = Admin(folder)
        return _admins[folder]
