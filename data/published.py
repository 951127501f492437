"""The published toolkit's 35 evaluation files: fetched, checked against data/published.sha256, installed.

    python data/build.py --published                 # download from GitHub at the pinned commit
    python data/build.py --published --from DIR      # or install from a local copy (offline mirror, shared disk)
    python data/build.py --published --out DIR       # into DIR instead of data/eval

Every file is read into memory and checked before anything is written: a missing file or one whose sha256 is not
the manifest's is refused (one line naming it) and data/eval is left as it was. The checked files are then written
beside their targets as temporary files and renamed into place; a file that already holds the published bytes is
left alone, so a second install changes nothing.

Two names overlap with files the project makes itself: nlgraph.json (data/build.py generates one; it keeps an
installed published file) and human_phd_application.json (tracked, with the project's own prompts; the published
one replaces it in the working tree, `git checkout -- data/eval/human_phd_application.json` brings ours back).
"""

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

PUBLISHED_REPO = "RKS-2804/test-fin"
PUBLISHED_COMMIT = "75897bcf68f2609b8eed776217947180085a8edb"
RAW_URL = f"https://raw.githubusercontent.com/{PUBLISHED_REPO}/{PUBLISHED_COMMIT}/data/eval/{{name}}"
MANIFEST = Path(__file__).resolve().parent / "published.sha256"
DOWNLOAD_TIMEOUT_S = 30


class PublishedDataError(RuntimeError):
    """A published file that could not be fetched (exit_status 2) or failed its checksum (exit_status 1)."""

    def __init__(self, message, exit_status):
        super().__init__(message)
        self.exit_status = exit_status


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def read_manifest(path=MANIFEST):
    """{file name: sha256} from the sha256sum-format manifest (paths data/eval/NAME.json)."""
    entries = {}
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split(maxsplit=1)
            entries[Path(name.strip().lstrip("*")).name] = digest
    return entries


def is_published_file(path, manifest=None):
    """Whether path holds the published bytes of the file of its name."""
    path = Path(path)
    expected = (manifest or read_manifest()).get(path.name)
    return expected is not None and path.is_file() and sha256(path.read_bytes()) == expected


def download(name, timeout=DOWNLOAD_TIMEOUT_S):
    """The bytes of one published file, from GitHub at the pinned commit."""
    url = RAW_URL.format(name=name)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise PublishedDataError(f"cannot download {url} ({reason}); with a copy of the published data/eval/ "
                                 f"(another machine, a cluster's shared disk) install it with: "
                                 f"python data/build.py --published --from DIR", 2) from None


def fetch(names, source=None):
    """{name: bytes} of every name, from the folder source, or downloaded when source is None."""
    if source is None:
        return {name: download(name) for name in names}
    folder = Path(source)
    if not folder.is_dir():
        raise PublishedDataError(f"--from {folder}: no such folder (it should hold the published data/eval/*.json)",
                                 2)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more of the {len(names)} published files" if len(missing) > 1 else ""
        raise PublishedDataError(f"{folder / missing[0]}: missing{more}; nothing was installed", 2)
    return {name: (folder / name).read_bytes() for name in names}


def verify(blobs, manifest, source):
    """Raise PublishedDataError naming the first file whose sha256 is not the manifest's."""
    bad = [name for name, data in blobs.items() if sha256(data) != manifest[name]]
    if bad:
        name = bad[0]
        more = f" ({len(bad) - 1} more files fail too)" if len(bad) > 1 else ""
        where = Path(source) / name if source is not None else RAW_URL.format(name=name)
        raise PublishedDataError(f"{where}: sha256 {sha256(blobs[name])[:16]}... is not the published file's "
                                 f"{manifest[name][:16]}... ({MANIFEST.name}): refused, nothing was installed{more}", 1)


def install(blobs, out_dir):
    """Write the verified files into out_dir: all temporary files first, then one rename each. Returns
    {dataset name: "installed" | "replaced" | "unchanged"} ("replaced": out_dir held other bytes under that name)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    status, staged = {}, []
    try:
        for name, data in sorted(blobs.items()):
            target = out / name
            if target.is_file() and target.read_bytes() == data:
                status[target.stem] = "unchanged"
                continue
            status[target.stem] = "replaced" if target.exists() else "installed"
            tmp = out / f".{name}.tmp{os.getpid()}"
            staged.append((tmp, target))
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, target in staged:
            os.replace(tmp, target)
    finally:
        for tmp, _ in staged:
            if tmp.exists():
                tmp.unlink()
    return status


def install_published(out_dir, source=None, manifest_path=MANIFEST):
    """Fetch (source folder or GitHub), verify every file, then install them into out_dir."""
    manifest = read_manifest(manifest_path)
    blobs = fetch(sorted(manifest), source)
    verify(blobs, manifest, source)
    return install(blobs, out_dir)
