"""Model registry: every trained artifact registered with its metadata, named aliases, an audit of every move.

A registry is a directory, one per model kind (``fraud``, ``recs``)::

    ROOT/versions/<version>.json   one immutable record per version (created once, never rewritten)
    ROOT/aliases.jsonl             the audit log: one line per alias move; the current aliases are its replay
    ROOT/.lock                     held (``flock``) while a move is checked and appended

Why a directory and not PostgreSQL: artifacts are folders already, the demo
and the tests run with no database, and the two writes a registry needs are
safe on one filesystem without a server. A record is written aside and
linked into place (``os.link`` fails if the version exists, so two trainers
cannot overwrite each other's record); an alias move is appended under an
exclusive lock, after checking what the alias points at now (compare-and-set:
a move decided against a champion that has changed since is refused), and
fsynced before the lock is released. Readers take no lock: a line is a move
only once its newline is on disk, so a reader never sees half a move.

Aliases are names (``champion``, ``challenger``, ``shadow``, anything) that
point at versions, as in MLflow's registry: serving loads an alias, never
"the newest folder", and a rollback is one more audited move.

>>> import tempfile; root = tempfile.mkdtemp()
>>> reg = Registry(root, "fraud")
>>> art = Path(root) / "art-1"; art.mkdir(); _ = (art / "meta.json").write_text("{}")
>>> reg.register(ModelRecord.new("fraud", "v1", art, metrics={"average_precision": 0.61})).version
'v1'
>>> reg.move("champion", "v1", who="ana", why="first model", action="promote").to_version
'v1'
>>> reg.resolve("champion").version, [m.action for m in reg.history()]
('v1', ['promote'])
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kestrel.models.gate import GateDecision, GatePolicy, judge

KINDS = ("fraud", "recs")
UNCHECKED = object()  # Registry.move without a compare-and-set
ACTIONS = ("promote", "rollback", "alias", "force", "refused")  # "refused": a gate said no; nothing moved


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked (unknown version, stale move, damaged artifact)."""


def artifact_checksum(path: str | os.PathLike[str]) -> str:
    """sha256 over an artifact folder: every file's relative name, size and bytes, in name order.

    Renaming, adding, removing or changing any file changes it, so a loaded
    artifact can be checked against the version that was registered.
    """
    base = Path(path)
    digest = hashlib.sha256()
    files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
    for p in files:
        name = p.name if p == base else p.relative_to(base).as_posix()
        digest.update(f"{name}\0{p.stat().st_size}\0".encode())
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def code_version() -> str:
    """``git describe`` of the code that trained (``unknown`` outside a git checkout)."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def current_user() -> str:
    """Who an audit line names: ``KESTREL_USER`` if set (a CI job, a service account), else the login."""
    try:
        return os.environ.get("KESTREL_USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ModelRecord:
    """What is known of one registered version; never changed after it is written."""

    kind: str
    version: str
    path: str  # the artifact folder, absolute
    checksum: str
    metrics: dict[str, Any] = field(default_factory=dict)  # on its validation window
    validation_window: dict[str, Any] = field(default_factory=dict)  # first/last event, rows: what metrics cover
    data_range: dict[str, Any] = field(default_factory=dict)  # first/last event trained on
    feature_set: str = ""
    code_version: str = "unknown"
    parent: str | None = None  # the version this one was trained to replace (the champion then)
    seed: int | None = None
    created_at: str = ""
    evaluation: dict[str, Any] = field(default_factory=dict)  # the parent scored on this version's window

    @staticmethod
    def new(kind: str, version: str, path: str | os.PathLike[str], **meta: Any) -> ModelRecord:
        """A record of an artifact on disk, its checksum taken now."""
        if kind not in KINDS:
            raise RegistryError(f"kind must be one of {KINDS}, not {kind!r}")
        full = Path(path).resolve()
        if not full.exists():
            raise RegistryError(f"no artifact at {full}")
        meta.setdefault("created_at", _now())
        return ModelRecord(kind, version, str(full), artifact_checksum(full), **meta)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(doc: Mapping[str, Any]) -> ModelRecord:
        return ModelRecord(**{k: doc[k] for k in ModelRecord.__dataclass_fields__ if k in doc})

    def verify(self) -> None:
        """Raise :class:`RegistryError` unless the artifact's files are the ones registered."""
        if not Path(self.path).exists():
            raise RegistryError(f"{self.kind} {self.version}: artifact {self.path} is gone")
        found = artifact_checksum(self.path)
        if found != self.checksum:
            raise RegistryError(f"{self.kind} {self.version}: artifact checksum {found[:12]} differs from the "
                                f"registered {self.checksum[:12]}: the files changed after registration")


@dataclass(frozen=True)
class AliasMove:
    """One line of the audit log: an alias moved (or, for ``refused``, a move a gate did not allow)."""

    seq: int
    at: str
    alias: str
    from_version: str | None
    to_version: str | None  # None: the alias was removed
    who: str
    why: str
    action: str
    gate: dict[str, Any] | None = None  # the gate's decision and numbers, when a gate was asked

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Registry:
    """The registry of one model kind under ``root`` (``root`` may hold both kinds: ``root/<kind>/``)."""

    def __init__(self, root: str | os.PathLike[str], kind: str) -> None:
        if kind not in KINDS:
            raise RegistryError(f"kind must be one of {KINDS}, not {kind!r}")
        self.kind = kind
        self.root = Path(root) / kind
        self.versions_dir = self.root / "versions"
        self.log_path = self.root / "aliases.jsonl"

    # -- versions ------------------------------------------------------------
    def register(self, record: ModelRecord) -> ModelRecord:
        """Add a version; refused if the version exists (records are immutable)."""
        if record.kind != self.kind:
            raise RegistryError(f"a {record.kind} record cannot go in the {self.kind} registry")
        if not record.version or "/" in record.version or record.version.startswith("."):
            raise RegistryError(f"not a version name: {record.version!r}")
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        target = self.versions_dir / f"{record.version}.json"
        fd, tmp = tempfile.mkstemp(dir=self.versions_dir, prefix=".rec.")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(record.to_json(), fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, target)  # atomic, and fails if another writer registered this version first
            except FileExistsError:
                raise RegistryError(f"{self.kind} {record.version} is already registered") from None
        finally:
            os.unlink(tmp)
        _fsync_dir(self.versions_dir)
        return record

    def get(self, version: str) -> ModelRecord:
        path = self.versions_dir / f"{version}.json"
        if not path.exists():
            raise RegistryError(f"no {self.kind} version {version!r} in {self.root}")
        return ModelRecord.from_json(json.loads(path.read_text()))

    def versions(self) -> list[ModelRecord]:
        """Every registered version, oldest first."""
        if not self.versions_dir.exists():
            return []
        records = [ModelRecord.from_json(json.loads(p.read_text())) for p in self.versions_dir.glob("*.json")]
        return sorted(records, key=lambda r: (r.created_at, r.version))

    # -- aliases -------------------------------------------------------------
    def history(self) -> list[AliasMove]:
        """The audit log, oldest first (complete lines only: a move being appended is not one yet)."""
        if not self.log_path.exists():
            return []
        text = self.log_path.read_text()
        lines = text.split("\n")[:-1]  # what follows the last newline is a write in progress, or nothing
        return [AliasMove(**json.loads(line)) for line in lines if line.strip()]

    def aliases(self) -> dict[str, str]:
        """Each alias and the version it points at now."""
        return aliases_after(self.history())

    def resolve(self, name: str) -> ModelRecord:
        """The record an alias points at, or a version by its own name."""
        version = self.aliases().get(name)
        if version is not None:
            return self.get(version)
        if (self.versions_dir / f"{name}.json").exists():
            return self.get(name)
        raise RegistryError(f"{self.kind}: {name!r} is neither an alias nor a registered version")

    def move(self, alias: str, to_version: str | None, *, who: str | None = None, why: str = "",
             action: str = "alias", gate: Mapping[str, Any] | None = None,
             expect_from: object = UNCHECKED) -> AliasMove:
        """Point ``alias`` at ``to_version`` (None removes it) and append the move to the audit log.

        ``expect_from``: the version the caller decided against; if the alias
        points elsewhere now (another operator moved it meanwhile) nothing
        moves and :class:`RegistryError` is raised. ``action="refused"``
        records a gate's refusal without moving anything.
        """
        if action not in ACTIONS:
            raise RegistryError(f"action must be one of {ACTIONS}, not {action!r}")
        if not alias or any(c.isspace() for c in alias) or "/" in alias:
            raise RegistryError(f"not an alias name: {alias!r}")
        if to_version is not None:
            self.get(to_version)  # it must exist
        with self._locked():
            moves = self.history()
            current = aliases_after(moves).get(alias)
            if expect_from is not UNCHECKED and current != expect_from:
                raise RegistryError(f"{self.kind} alias {alias!r} points at {current!r} now, not {expect_from!r}: "
                                    "it moved meanwhile; decide again")
            to = current if action == "refused" else to_version
            move = AliasMove(seq=(moves[-1].seq + 1) if moves else 1, at=_now(), alias=alias, from_version=current,
                             to_version=to, who=who or current_user(), why=why, action=action,
                             gate=dict(gate) if gate is not None else None)
            with self.log_path.open("a") as fh:
                _drop_torn_tail(fh)
                fh.write(json.dumps(move.to_json(), separators=(",", ":")) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        return move

    def previous(self, alias: str) -> str | None:
        """The version ``alias`` pointed at before its current one (what a rollback returns to)."""
        seen = [m for m in self.history() if m.alias == alias and m.action != "refused"]
        return seen[-1].from_version if seen else None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def aliases_after(moves: list[AliasMove]) -> dict[str, str]:
    """The aliases a sequence of moves leaves (pure: the replay of the audit log).

    >>> m = lambda seq, alias, to, action="alias": AliasMove(seq, "", alias, None, to, "", "", action)
    >>> aliases_after([m(1, "champion", "v1"), m(2, "shadow", "v2"), m(3, "champion", "v2"),
    ...                m(4, "champion", "v9", "refused"), m(5, "shadow", None)])
    {'champion': 'v2'}
    """
    current: dict[str, str] = {}
    for move in moves:
        if move.action == "refused":
            continue
        if move.to_version is None:
            current.pop(move.alias, None)
        else:
            current[move.alias] = move.to_version
    return current


def is_registry(root: str | os.PathLike[str], kind: str) -> bool:
    """Whether ``root`` holds a registry of ``kind`` (a versions folder)."""
    return (Path(root) / kind / "versions").is_dir()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def promote(registry: Registry, version: str, *, alias: str = "champion", policy: GatePolicy | None = None,
            force: bool = False, who: str | None = None, why: str = "") -> dict[str, Any]:
    """Ask the gate whether ``version`` may take ``alias``; move it if so. Recorded in the audit log either way.

    The numbers are those measured when the candidate was registered, on its
    held-out window, against the champion of that moment (its record's
    ``evaluation``). If the alias has moved since, they compare against the
    wrong version: the move is refused (train or evaluate the candidate
    again) unless ``force``, which is audited as such.
    """
    record = registry.get(version)
    record.verify()
    policy = policy or GatePolicy.for_kind(registry.kind)
    current = registry.aliases().get(alias)
    if current == version:
        raise RegistryError(f"{alias} already points at {version}")
    evaluation = record.evaluation or {}
    if current is None:
        decision = judge(record.metrics, None, policy)
    elif evaluation.get("champion") != current:
        decision = GateDecision(False, [f"{version} was evaluated against {evaluation.get('champion')!r}, but "
                                        f"{alias} is {current!r} now: evaluate the candidate against it first"], [])
    else:
        decision = judge(record.metrics, evaluation.get("champion_metrics"), policy)
    gate = {"policy": policy.to_json(), **decision.to_json(),
            "window": evaluation.get("window", record.validation_window),
            "champion_saw_window": evaluation.get("champion_saw_window")}
    if decision.passed or force:
        action = "promote" if decision.passed else "force"
        move = registry.move(alias, version, who=who, action=action, gate=gate, expect_from=current,
                             why=why or ("gate passed" if decision.passed else "forced past the gate"))
    else:
        move = registry.move(alias, None, who=who, why=why or "; ".join(decision.reasons), action="refused",
                             gate=gate, expect_from=current)
    return {"moved": move.action != "refused", "alias": alias, "from": current, "to": move.to_version,
            "candidate": version, "action": move.action, "reasons": decision.reasons, "gate": gate, "seq": move.seq}


def rollback(registry: Registry, alias: str = "champion", *, who: str | None = None, why: str = "") -> AliasMove:
    """Point ``alias`` back at the version it held before its last move (audited; no gate: it served before)."""
    current = registry.aliases().get(alias)
    back = registry.previous(alias)
    if current is None or back is None:
        raise RegistryError(f"{registry.kind} alias {alias!r} has no earlier version to roll back to")
    return registry.move(alias, back, who=who, why=why or f"rollback from {current}", action="rollback",
                         expect_from=current)



def _drop_torn_tail(fh: Any) -> None:
    """Cut what a writer that died mid-line left after the last newline (the caller holds the lock)."""
    size = fh.seek(0, os.SEEK_END)
    if size == 0:
        return
    with open(fh.name, "rb") as raw:
        raw.seek(max(0, size - (1 << 16)))
        tail = raw.read()
    if tail.endswith(b"\n"):
        return
    cut = tail.rfind(b"\n")
    keep = size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= len(tail) else None)
    if keep is None:  # a torn line longer than 64 KiB: find its start the slow way
        data = Path(fh.name).read_bytes()
        keep = data.rfind(b"\n") + 1
    fh.truncate(keep)
