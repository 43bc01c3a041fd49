"""`msa check`: the bank format's rules (check.py) applied to a whole bank, as SQLite's integrity_check does.

Opening a bank stops at its first problem and skips what it need not read. verify goes on past each problem and
adds what opening skips: the sha256 of every file whose hash the manifest records, the saved lexical index, and
what lies on disk unlisted (leftovers of crashed writers, as notes). It takes no lock and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import lexical
from .check import check_record
from .format import CONTENT, DOCUMENTS, MANIFEST, SEGMENTS, TEMPLATE, Damaged, coarse_file, route_file, \
    router_weights_file
from .snapshot import Segment, check_router_weights, map_template, read_manifest


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)   # one line each: file: what is wrong
    notes: list[str] = field(default_factory=list)      # harmless leftovers worth knowing of
    segments: int = 0
    documents: int = 0


def verify(path: Path) -> Report:
    """Check a whole bank. BankNotFound if there is none; BankMismatch only for a format version this msa does
    not read; everything else is a problem in the report."""
    path = Path(path)
    for _ in range(3):
        before = _manifest_bytes(path)
        report = _verify_once(path)
        if _manifest_bytes(path) == before:
            return report
        # A writer committed while we read (and may have deleted what we were reading): check the new state.
    return report


def _manifest_bytes(path: Path) -> bytes | None:
    try:
        return (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        return None


def _verify_once(path: Path) -> Report:
    report = Report()
    try:
        manifest = read_manifest(path)
    except Damaged as e:
        report.problems.append(_one_line(e.where(path)))
        return report
    settings = manifest["settings"]
    route = route_file(settings["router"]["id"])
    listed = {entry["name"] for entry in manifest["segments"]}
    tombstones = set(manifest["tombstones"])
    live: list[int] = []
    key_shapes = set()
    for entry in manifest["segments"]:
        directory = path / SEGMENTS / entry["name"]
        try:
            segment = Segment(directory, entry, settings, route)
            segment.documents   # parsed and checked (opening a bank leaves that to the first read)
            for name, record in entry.get("files", {}).items():
                if name not in (DOCUMENTS, CONTENT, route, coarse_file(settings["router"]["id"])):
                    raise Damaged(directory / name, "recorded in the manifest, but no file of a segment")
                check_record(directory / name, record)
        except Damaged as e:
            report.problems.append(_one_line(e.where(path)))
            continue
        except OSError as e:
            what = "missing" if isinstance(e, FileNotFoundError) else e.strerror
            report.problems.append(Damaged(e.filename or directory, what).where(path))
            continue
        key_shapes.add(segment.key_shape)
        live += [i for i in segment.doc_ids.tolist() if i not in tombstones]
    if len(key_shapes) > 1:
        report.problems.append(f"{SEGMENTS}: routing keys of several shapes {sorted(key_shapes)}")
    report.problems += _check_bank_files(path, manifest)
    report.notes += _leftovers(path, listed, route, manifest)
    problems, notes = lexical.check_saved(path / lexical.DIRECTORY, live)
    report.problems += [_one_line(p) for p in problems]
    report.notes += notes
    report.segments, report.documents = len(listed), len(live)
    return report


def _check_bank_files(path: Path, manifest: dict) -> list[str]:
    """The template and the router's weights, as opening checks them, plus their hashes when recorded."""
    settings = manifest["settings"]
    records = manifest.get("files", {})
    weights = router_weights_file(settings["router"]["id"])
    problems = [f"{name}: recorded in the manifest, but not a file of the bank"
                for name in records if name not in (TEMPLATE, weights)]
    for name, check_file in ((TEMPLATE, map_template), (weights, check_router_weights)):
        file = path / name
        if not file.is_file():
            if name == TEMPLATE:
                problems.append(f"{name}: missing")
            elif name in records:   # readers fall back on a shipped router of the same id, if there is one
                problems.append(f"{name}: missing, though the manifest records it")
            continue
        try:
            check_file(file, settings, records.get(name))
            if name in records:
                check_record(file, records[name])
        except Damaged as e:
            problems.append(_one_line(e.where(path)))
    return problems


def _leftovers(path: Path, listed: set[str], route: str, manifest: dict) -> list[str]:
    """What crashed writers leave: readers ignore it and the next writer deletes it."""
    notes = []
    if (path / (MANIFEST + ".tmp")).exists():
        notes.append(f"{MANIFEST}.tmp: an uncommitted manifest")
    weights = router_weights_file(manifest["settings"]["router"]["id"])
    notes += [f"{f.name}: weights of another router" for f in sorted(path.glob("router.*.safetensors"))
              if f.name != weights]
    segments = path / SEGMENTS
    for directory in sorted(segments.iterdir()) if segments.is_dir() else []:
        if directory.name not in listed:
            notes.append(f"{SEGMENTS}/{directory.name}: not listed in the manifest")
            continue
        notes += [f"{SEGMENTS}/{directory.name}/{f.name}: keys of another router"
                  for f in sorted(directory.glob("route.*.safetensors")) if f.name != route]
        files = next(e for e in manifest["segments"] if e["name"] == directory.name).get("files", {})
        notes += [f"{SEGMENTS}/{directory.name}/{f.name}: coarse keys not listed in the manifest"
                  for f in sorted(directory.glob("coarse.*.safetensors")) if f.name not in files]
    return [note + " (left by an interrupted writer; the next writer removes it)" for note in notes]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
