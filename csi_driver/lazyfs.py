"""The FUSE side of lazy mounts: a read-only pyfuse3 filesystem on trio over a :class:`LazyModel`, and
the server process that serves one mount (``ocimodel fuse-serve``, in a mount pod or a session of its
own: see lazyservers.py), so the mount outlives the plugin."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import json
import logging
import os
import resource
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from csi_driver.lazymount import FUSE_TYPE, write_verdict
from csi_driver.priority import take_priority
from modelcache.assemble.options import PullOptions
from modelcache.assemble.treerules import walk_tree
from modelcache.cache import ModelCache
from modelcache.errors import Kind, ModelCacheError, PullCancelled
from modelcache.lazy.model import LazyModel, Node
from modelcache.lazy.state import Download
from modelcache.mounts import MountInfo, bind_mount_readonly, mounts_at, unmount, unmount_all
from modelcache.progress import Progress
from modelcache.records import tree_key
from modelcache.registry.credentials import CredentialStore
from modelcache.registry.manifest import Descriptor
from modelcache.registry.reference import parse_reference
from modelcache.registry.transport import RetryPolicy
from modelcache.settings import Settings
from modelcache.store.content import ContentStore

log = logging.getLogger(__name__)

ATTR_TIMEOUT = 300.0
PENDING_WAIT = 3600.0
LAZY_RETRY = RetryPolicy(attempts=3, base_delay=0.2, max_delay=2.0, connect_timeout=3.0, read_timeout=10.0)
CHILD_POLL_SECONDS = 0.1
OTHERS_POLL_SECONDS = 0.2  # how often a server checks that another process still downloads its model
VERDICT_POLL_SECONDS = 0.5  # how often a server looks for a verdict another process reached on its model
STOP_GRACE = 2.0  # a download child told to stop ends within this, at its next read or else at once
PR_SET_PDEATHSIG = 1
JOB_WAIT = 600.0  # seconds a server waits for its job before it gives up (its mount pod then ends)
JOB_READ_TIMEOUT = 30.0
SPARE_POLL_SECONDS = 0.5  # how often a spare server checks that the plugin that started it still runs
READAHEAD_KIB = 8192
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


class LazyOperations(pyfuse3.Operations):
    """Inode bookkeeping over the model's tree; reads run in worker threads behind a limiter."""

    enable_writeback_cache = False

    def __init__(self, model: LazyModel, *, threads: int = 8) -> None:
        super().__init__()
        self.model = model
        self.limiter = trio.CapacityLimiter(threads)
        self.nodes: dict[int, Node] = {}
        self.inodes: dict[int, int] = {}
        self.next_inode = pyfuse3.ROOT_INODE + 1
        self._register_root()

    def _register_root(self) -> None:
        self.nodes = {pyfuse3.ROOT_INODE: self.model.root}
        self.inodes = {id(self.model.root): pyfuse3.ROOT_INODE}

    def inode_of(self, node: Node) -> int:
        """The inode number of ``node`` (assigned on first sight, never reused)."""
        inode = self.inodes.get(id(node))
        if inode is None:
            inode = self.next_inode
            self.next_inode += 1
            self.inodes[id(node)] = inode
            self.nodes[inode] = node
        return inode

    def _node(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        """Attributes of ``inode``: read-only, owned by root, immutable content."""
        node = self._node(inode)
        entry = pyfuse3.EntryAttributes()
        kind = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "symlink": stat.S_IFLNK}[node.kind]
        entry.st_mode = kind | node.mode
        entry.st_nlink = 2 if node.kind == "dir" else 1
        entry.st_size = node.size
        entry.st_blksize = 1 << 20
        entry.st_blocks = (node.size + 511) // 512
        entry.st_ino = inode
        entry.generation = 0
        entry.entry_timeout = ATTR_TIMEOUT
        entry.attr_timeout = ATTR_TIMEOUT
        entry.st_uid = entry.st_gid = 0
        return entry

    async def _await_pending(self) -> None:
        """Wait for the background pull when the tree still lacks compressed layers' files."""
        if self.model.pending and not self.model.complete.is_set():
            done = await trio.to_thread.run_sync(self.model.complete.wait, PENDING_WAIT, abandon_on_cancel=True)
            if not done:
                raise pyfuse3.FUSEError(errno.EIO)
        if self.model.pending and self.model.final is not None:
            self.model.adopt_final_tree()
            self.nodes[pyfuse3.ROOT_INODE] = self.model.root
            self.inodes[id(self.model.root)] = pyfuse3.ROOT_INODE

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        text = os.fsdecode(name)
        child = parent.children.get(text) if text not in (".", "..") else parent
        if child is None and self.model.pending:
            await self._await_pending()
            parent = self._node(parent_inode)
            child = parent.children.get(text)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attributes(self.inode_of(child))

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self.attributes(inode)

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        node = self._node(inode)
        if node.kind != "symlink":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(node.target)

    async def opendir(self, inode: int, ctx: Any) -> int:
        if self._node(inode).kind != "dir":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if inode == pyfuse3.ROOT_INODE and self.model.pending:
            await self._await_pending()
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        node = self._node(fh)
        names = sorted(node.children)
        for index in range(start_id, len(names)):
            child = node.children[names[index]]
            if not pyfuse3.readdir_reply(token, os.fsencode(names[index]), self.attributes(self.inode_of(child)),
                                         index + 1):
                break

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        if node.kind != "file":
            raise pyfuse3.FUSEError(errno.EISDIR if node.kind == "dir" else errno.EINVAL)
        try:
            self.model.check_usable()
        except ModelCacheError:
            raise pyfuse3.FUSEError(errno.EIO) from None
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        node = self._node(fh)
        try:
            data = self.model.read_now(node, off, size)  # a pread from page cache or disk: no thread hop
            if data is not None:
                return data
            return await trio.to_thread.run_sync(self.model.read_node, node, off, size, limiter=self.limiter)
        except (ModelCacheError, OSError) as exc:
            log.warning("read of inode %d at %d failed: %s", fh, off, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:  # a bug must fail this read, not end the mount for every reader
            log.exception("read of inode %d at %d failed unexpectedly", fh, off)
            raise pyfuse3.FUSEError(errno.EIO) from None

    def invalidate_files(self) -> None:
        """Drop the kernel's cached pages of every file of the view (blocking: call from a worker thread), so
        that reads of a broken model reach this server and get EIO instead of cached bytes."""
        for inode, node in list(self.nodes.items()):
            if node.kind == "file":
                with contextlib.suppress(OSError):
                    pyfuse3.invalidate_inode(inode, attr_only=False)

    async def release(self, fh: int) -> None:
        return None

    async def releasedir(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_namemax = 255
        return data


def serve(model: LazyModel, target: Path, *, ready: Any = None) -> None:
    """Mount ``model`` at ``target`` and serve until unmounted; when the pull completes, stack a
    read-only bind mount of the finished tree over the FUSE mount so new opens read local files directly."""
    operations = LazyOperations(model)
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {"fsname=ocimodel", "subtype=ocimodel", "ro", "allow_other", "default_permissions"}
    pyfuse3.init(operations, str(target), options)

    own_view: list[MountInfo] = []  # this server's FUSE mount, once the kernel has answered INIT
    mounted = trio.Event()

    async def upgrade_when_complete() -> None:
        while True:
            await trio.to_thread.run_sync(model.complete.wait, abandon_on_cancel=True)
            if model.final is not None and model.failure is None:
                await mounted.wait()
                try:
                    # in a thread: mount(2) looks up the FUSE mountpoint, which this event loop must answer
                    if await trio.to_thread.run_sync(stack_finished, model.final.path, target, own_view):
                        log.info("pull complete: %s now reads the cached files directly", target)
                    else:
                        log.info("pull complete, but %s no longer shows this view: nothing stacked", target)
                except OSError as exc:
                    log.warning("could not stack the finished tree over %s: %s", target, exc)
                return
            if model.failure is not None and model.failure.kind not in (Kind.INTEGRITY, Kind.UNSAFE_CONTENT):
                await trio.sleep(10)
                log.info("retrying the background pull of %s", model.resolved.reference)
                model.retry_background()
                continue
            return

    async def fail_on_verdict() -> None:
        # a verdict on bytes served before verification, reached by whichever process committed a blob of
        # the model, breaks the model here within VERDICT_POLL_SECONDS; cached pages are dropped with it
        while True:
            finished = model.complete.is_set()
            try:
                await trio.to_thread.run_sync(model.check_verdicts)
            except ModelCacheError:
                await trio.to_thread.run_sync(operations.invalidate_files)
                log.error("the kernel's cached pages of %s are dropped: no read gets them again", target)
                return
            if finished:
                return
            await trio.sleep(VERDICT_POLL_SECONDS)

    async def widen_then_announce() -> None:
        await trio.to_thread.run_sync(os.stat, target)  # answered once the kernel's INIT is (which sets read-ahead)
        own_view[:] = await trio.to_thread.run_sync(_view_at, target)
        mounted.set()
        if own_view:
            widen_readahead(target, own_view[0].device)
        if ready is not None:
            ready()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upgrade_when_complete)
            nursery.start_soon(widen_then_announce)
            nursery.start_soon(fail_on_verdict)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=False)


def _view_at(target: Path) -> list[MountInfo]:
    """The topmost FUSE mount of ours at ``target`` (its real path: kubelet's directory may be a symlink)."""
    top = mounts_at(os.path.realpath(target))
    return [top[-1]] if top and top[-1].fstype == FUSE_TYPE else []


def stack_finished(tree: Path, target: Path, own_view: list[MountInfo]) -> bool:
    """Bind ``tree`` read-only over this server's FUSE mount at ``target`` while that mount is what the target
    shows; a bind that landed on anything else (the volume unpublished between the check and the bind) is
    taken off again, so that no mount outlives its volume. False when nothing is stacked (blocking)."""
    if not own_view or [m.mount_id for m in _view_at(target)] != [own_view[0].mount_id]:
        return False
    bind_mount_readonly(tree, target)
    top = mounts_at(os.path.realpath(target))
    if top and top[-1].parent_id != own_view[0].mount_id:
        unmount(target, lazy=True)
        return False
    return True


def widen_readahead(target: Path, device: str, kib: int = READAHEAD_KIB) -> None:
    """Let the kernel read ahead ``kib`` KiB on the new FUSE mount at ``target`` (device ``major:minor``; its
    bdi's 128 KiB default caps every read request at 128 KiB: one Python call and one reply per 128 KiB)."""
    try:
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(f"{kib}\n")
    except OSError as exc:
        log.warning("could not raise the read-ahead of the FUSE mount at %s (%s): reads stay at 128 KiB", target, exc)


def _cache_for(job: dict[str, Any]) -> ModelCache:
    settings = Settings.from_mapping(job["settings"], "lazy job")
    credentials = CredentialStore()
    credentials.add_docker_config(job.get("docker_config") or {"auths": {}}, source="lazy job credentials")
    return settings.cache(credentials, LAZY_RETRY, for_volume=bool(job.get("for_volume", True)))


def _options_for(job: dict[str, Any]) -> PullOptions:
    return PullOptions(tuple(job.get("include", ())), tuple(job.get("exclude", ())), job.get("path"),
                       tuple(job.get("layers", ())))


def download_in_child(job: dict[str, Any], store: ContentStore, model: str, blobs: list[Descriptor]) -> Download:
    """The background download of a lazy mount, run as ``ocimodel fuse-pull`` in a child process: FUSE
    replies are written with the GIL held, so a download in the serving process would crawl while a pod
    reads. The child's ranged downloads are visible to the helper through their state files. While another
    process pulls model ``model`` (the plugin, which starts the pull at publish, before this server gets its
    job), or fetches every missing blob, no child is started: another Python process on the node's CPUs
    would slow that download while a pod reads."""
    def download(stopping: threading.Event) -> None:
        if not _needs_own_download(store, model, blobs, stopping):
            return
        child = subprocess.Popen([sys.executable, "-m", "ocimodel.cli", "fuse-pull"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE)
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(json.dumps({**job, "helper_pid": os.getpid()}).encode())
        child.stdin.close()
        while child.poll() is None:
            if stopping.wait(CHILD_POLL_SECONDS):
                child.terminate()
                child.wait()
                raise PullCancelled(f"{job['reference']}: pull stopped; it resumes on the next start")
        reply = child.stdout.read().decode(errors="replace").strip()
        child.stdout.close()
        if child.returncode != 0:
            kind_name, _, message = reply.removeprefix("ERROR ").partition(" ")
            kind = Kind[kind_name] if kind_name in Kind.__members__ else Kind.INTERNAL
            raise ModelCacheError(message or f"the download process exited with {child.returncode}", kind=kind)
    return download


def _needs_own_download(store: ContentStore, model: str, blobs: list[Descriptor], stopping: threading.Event) -> bool:
    """Wait while another process pulls ``model`` or fetches every missing blob of ``blobs``; True as soon as
    one is missing that nobody fetches (that pull ended or failed), False when all are committed."""
    while True:
        missing = [d for d in blobs if not store.has_blob(d.digest, d.size)]
        if not missing:
            return False
        if not store.pull_in_progress(model) and not all(store.fetch_in_progress(d.digest) for d in missing):
            return True
        if stopping.wait(OTHERS_POLL_SECONDS):
            raise PullCancelled("lazy mount stopped while another process downloaded its model")


def _stop_with_parent() -> None:
    """Be sent SIGTERM when the helper that started this process ends, however it ends (kill -9 too)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def pull_main() -> int:
    """``ocimodel fuse-pull``: download the model of a lazy-mount job (JSON on stdin) into the cache; print
    ``ERROR <kind> <message>`` on failure. SIGTERM stops it at its next read (the download resumes later),
    or after STOP_GRACE seconds at the latest: a child waiting on a lock held by another process's download
    of the same blob (the plugin's, say) reads nothing, and must not outlive its helper for that download."""
    job = json.loads(sys.stdin.read())
    stop = threading.Event()

    def on_term(*_: object) -> None:
        stop.set()
        threading.Timer(STOP_GRACE, os._exit, (143,)).start()  # partial downloads survive this, as kill -9
    signal.signal(signal.SIGTERM, on_term)
    _stop_with_parent()
    if os.getppid() != job.get("helper_pid"):  # the helper was gone before that took effect: no one to pull for
        print("ERROR UNAVAILABLE the lazy mount's server ended before its download started", flush=True)
        return 1
    try:
        cache = _cache_for(job)
        cache.materialise(cache.client.resolve(parse_reference(job["reference"])), _options_for(job), Progress(),
                          cancel=stop)
    except ModelCacheError as exc:
        print(f"ERROR {exc.kind.name} {exc}", flush=True)
        return 1
    return 0


def receive_job(path: Path, timeout: float = JOB_WAIT, *, spare_of: int = 0) -> tuple[dict[str, Any], socket.socket]:
    """Wait on the unix socket ``path`` (mode 0600) for a job sent by a root process (SO_PEERCRED); return
    it and the connection to answer on. The socket is gone once a job has arrived. A spare (of the process
    ``spare_of``) waits for as long as that process is its parent, not ``timeout``, and never makes its
    directory (gone with that process, it must stay gone)."""
    if not spare_of:  # a spare's directory is its plugin's: gone with it, not made again
        path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(umask)
    listener.listen(4)
    listener.settimeout(SPARE_POLL_SECONDS if spare_of else timeout)
    try:
        while True:
            if spare_of and os.getppid() != spare_of:
                raise TimeoutError("the plugin that started this spare server has ended")
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                if spare_of:
                    continue
                raise
            _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
            if uid != 0:
                conn.sendall(b"ERROR PERMISSION_DENIED only root may start lazy mounts\n")
                conn.close()
                continue
            conn.settimeout(JOB_READ_TIMEOUT)
            data = b""
            while chunk := conn.recv(1 << 16):
                data += chunk
            return json.loads(data), conn
    finally:
        listener.close()
        path.unlink(missing_ok=True)


def _take_up(job: dict[str, Any]) -> None:
    """A spare server given its job: log where the job says, and take the plugin's CPU priority."""
    if job.get("log"):
        fd = os.open(job["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    take_priority(int(job.get("nice", 0)))


def _allow_open_files() -> None:
    """Raise the soft limit of open files to the hard one: a server keeps a descriptor per committed blob it
    reads, and a model of thousands of files (a container's default soft limit is often 1024) would
    otherwise turn reads into EIO."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def helper_main(socket_path: Path, spare_of: int = 0) -> int:
    """``ocimodel fuse-serve --socket PATH``: wait there for the job (settings, credentials, reference),
    mount, answer ``READY <files> <bytes>`` (or ``ERROR <kind> <message>``), then serve until unmounted. A
    spare (``--spare-of PID``) waits while that process lives, then takes up its job (see ProcessRunner)."""
    try:
        job, conn = receive_job(socket_path, spare_of=spare_of)
    except (OSError, ValueError) as exc:
        log.log(logging.DEBUG if spare_of else logging.ERROR, "no lazy-mount job arrived on %s: %s", socket_path, exc)
        return 1
    if spare_of:
        _take_up(job)
    _allow_open_files()
    target = Path(job["target"])
    try:
        cache = _cache_for(job)
        options = _options_for(job)
        resolved = cache.client.resolve(parse_reference(job["reference"]))
        cache.check_declared_size(resolved, options)  # before a file is shown or a byte fetched
        child_job = {**job, "reference": str(resolved.reference.by_digest(resolved.digest))}
        model = LazyModel(cache, resolved, options, strict=bool(job.get("strict")),
                          published_at=float(job.get("published_at", 0)))
        model.download = download_in_child(child_job, cache.store, tree_key(resolved.digest, options),
                                           [step.descriptor for step in model.plan.needed(options.path_filter)])
        if job.get("verdict"):
            model.on_broken = functools.partial(write_verdict, job["verdict"])
        model.build()
    except ModelCacheError as exc:
        with contextlib.suppress(OSError):
            conn.sendall(f"ERROR {exc.kind.name} {exc}\n".encode())
        conn.close()
        return 1
    files = sum(1 for _ in _walk_files(model.root))
    total = sum(n.size for n in _walk_files(model.root))

    def announce() -> None:
        with contextlib.suppress(OSError):
            conn.sendall(f"READY {files} {total}\n".encode())
        conn.close()
        log.info("serving %s at %s (%d files, %d bytes)", job["reference"], target, files, total)

    signal.signal(signal.SIGTERM, lambda *_: unmount_all(target, lazy=True))
    # The volume uses the model's tree from the moment the download records it, before the tree is stacked
    # over the view (from then on the mount keeps it): a lease held while serving keeps eviction, gc and
    # `cache rm` away in between, where an eviction pass took it (and the view served a second download).
    with cache.store.lease(f"tree-{tree_key(resolved.digest, options)}"):
        model.start_background()
        target.mkdir(parents=True, exist_ok=True)
        try:
            serve(model, target, ready=announce)
        finally:
            model.discard()
    return 0


def _walk_files(node: Node) -> list[Node]:
    return [child for _, child in walk_tree(node) if child.kind == "file"]  # not recursive: trees may be deep
