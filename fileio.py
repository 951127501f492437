"""Crash-safe file operations shared by the search driver (search.py), its workers (workers.py) and merge.py.

Nothing is modified in place: a file or folder is written under a temporary name next to its destination and
renamed into place, so a kill at any instant leaves the old or the new version, never a torn one. durable=True adds
the fsyncs that make the new version survive a power cut as well; sync_filesystem makes a whole staging folder
durable in one system call. A search directory has one owner at a time: DirectoryLock."""
import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
import uuid


def atomic_write(path, write, durable=True):
    """write(tmp) fills a temporary file next to path, which is then renamed over path. durable=False skips the two
    fsyncs, for files derived from others that are rewritten anyway: a process kill still leaves old or new content;
    a power cut may leave the old one. A failed write (a full disk, a file size limit) leaves no temporary file,
    and its OSError names path."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        write(tmp)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror or str(e), path) from None
        raise
    if durable:
        fsync_path(directory)  # make the rename itself durable


def atomic_write_text(path, text, durable=True):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write, durable)


def write_json(path, obj, durable=True):
    atomic_write_text(path, json.dumps(obj, indent=2), durable=durable)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_json_object(path):
    """(object, None), or (None, why it is not a readable JSON object): for files a user or a crash may have
    damaged, which are refused with one line rather than a traceback."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, OSError) as e:
        text = str(e).strip()
        return None, text.splitlines()[0] if text else type(e).__name__
    if not isinstance(value, dict):
        return None, f"a JSON object expected, found {type(value).__name__}"
    return value, None


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)  # files and folders alike
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path):
    """fsync every file and folder under path, and path itself."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def sync_filesystem(path):
    """Make everything written so far on path's filesystem durable, path's own entry included: one syncfs(2) where
    the system has it (Linux), else fsync_tree(path) and its parent folder. One syncfs costs about one device flush
    (2-4 ms on the development machine), an fsync per file one flush each (65-80 ms for six staged adapters)."""
    import ctypes
    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        fsync_tree(path)
        fsync_path(os.path.dirname(os.path.abspath(path)))
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"syncfs: {os.strerror(errno)}", path)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path, durable=True):
    """Yield a temporary folder next to path; on success it becomes path (replacing an old one).

    Files are fsynced before the rename and the parent after it, so a crash leaves either the old folder or the
    complete new one. Linux cannot atomically swap two non-empty folders, so an existing folder is first moved
    aside and restored if the second rename fails. durable=False leaves out the fsyncs, for a caller that syncs
    the folder itself later."""
    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        yield tmp
        if durable:
            for name in os.listdir(tmp):
                fsync_path(os.path.join(tmp, name))
            fsync_path(tmp)
        if os.path.isdir(path):
            old = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex}")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
        if durable:
            fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src, dst, discard=shutil.rmtree):
    """Folder src takes the place of folder dst (dst moved aside to dst.old, then discarded). Idempotent: run again
    after a kill anywhere inside it, it completes the replacement. discard(path) disposes of the replaced folder:
    deleted at once by default, or handed to the search's Trash."""
    old = dst + ".old"
    if os.path.exists(src):
        if os.path.exists(dst):
            if os.path.exists(old):
                discard(old)
            os.replace(dst, old)
        os.replace(src, dst)
    if os.path.exists(old):
        discard(old)


def apply_moves(moves, discard=shutil.rmtree):
    """Redo log of a search's commit: each [src, dst] move replaces a folder (replace_dir), so a commit cut short
    is finished on resume by applying the same moves again."""
    for src, dst in moves:
        replace_dir(src, dst, discard)


def link_tree(src, dst, ignore=None):
    """dst: a new folder of hard links to src's files, O(1) whatever the model size. Sharing files is safe because
    nothing in a search directory is modified in place: every write is a new file or folder renamed over the old
    one, so replacing candidate_i/ later leaves global_best/'s files as they were. Copies where links fail (a
    filesystem without hard links)."""
    try:
        shutil.copytree(src, dst, copy_function=os.link, ignore=ignore)
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=ignore)


# ----------------------------------------------------------------------------------------------------------------
# One owner per search directory

LOCK_FILE = ".lock"             # empty; the operating system's lock on it is what counts
HOLDER_FILE = ".lock_holder.json"  # who holds the lock: host, pid, since (removed when the lock is released)


class DirectoryBusy(Exception):
    """The directory is locked by another process; holder: its HOLDER_FILE record ({} if it could not be read)."""

    def __init__(self, directory, holder):
        super().__init__(directory)
        self.directory = directory
        self.holder = holder


def _holder_record(raw):
    """HOLDER_FILE's contents as a dict; {} when missing or unreadable."""
    try:
        record = json.loads(raw) if raw is not None else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


class DirectoryLock:
    """An exclusive advisory lock (flock) on <directory>/.lock, held for the life of one process.

    The kernel releases it however the holder ends, SIGKILL included, so a dead holder never blocks a resume. The lock
    file is never removed or rewritten (removing it would let a third process lock a fresh file while a second still
    holds the old one); who holds it is written beside it, in HOLDER_FILE, which a clean release removes: finding
    HOLDER_FILE when taking the lock means the previous holder died holding it (`previous`). The descriptor is
    close-on-exec and workers are spawned, not forked, so no child ever shares the lock. On Linux, flock on NFS
    is carried out as a whole-file POSIX lock by the server (NFSv4 and NFSv3 with lockd): it holds across hosts
    there; a file system mounted without working locks (NFS's local_lock=all, some FUSE file systems) gives each
    host its own lock and no protection across hosts."""

    def __init__(self, directory, wait=0.0, poll=0.2):
        self.directory = directory
        self.fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise DirectoryBusy(directory, self._read_holder()) from None
                time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        # kept as bytes too, so that a process that gives the directory back untouched can put it back as it was
        self.previous_bytes = self._holder_bytes()
        self.previous = _holder_record(self.previous_bytes)
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        atomic_write_text(os.path.join(directory, HOLDER_FILE), json.dumps(self.holder))

    def _holder_bytes(self):
        try:
            with open(os.path.join(self.directory, HOLDER_FILE), "rb") as f:
                return f.read()
        except OSError:
            return None

    def _read_holder(self):
        """The other holder's record; one that has just taken the lock writes it a moment later (waits up to 1 s)."""
        for _ in range(10):
            record = _holder_record(self._holder_bytes())
            if record:
                return record
            time.sleep(0.1)
        return {}

    def release(self, untouched=False):
        """Remove the holder record, then unlock. untouched: this process changed nothing in the directory (it
        refused to resume it), so a dead holder's record is put back as it was. Idempotent; the directory may have
        been removed meanwhile."""
        if self.fd is None:
            return
        path = os.path.join(self.directory, HOLDER_FILE)
        if untouched and self.previous_bytes is not None:
            def write(tmp):
                with open(tmp, "wb") as f:
                    f.write(self.previous_bytes)
            atomic_write(path, write)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        os.close(self.fd)  # closing the last descriptor of the open file releases the flock
        self.fd = None
