"""Tar layers crafted to escape the cache (the 2025 tarfile CVEs and the classics), pulled through the real
command line and indexed by the lazy view: each is refused with one line and exit status 6, and nothing
outside the cache changes (a snapshot of the directory around the cache root is taken before and after)."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from modelcache.assemble.options import PullOptions
from modelcache.cache import ModelCache
from modelcache.errors import Kind, ModelCacheError
from modelcache.lazy.model import LazyModel
from modelcache.registry import mediatypes as mt
from modelcache.registry.reference import parse_reference
from modelcache.store.content import ContentStore
from tests.conftest import make_client
from tests.helpers.oci import Entry, Fixtures, compress, make_tar

TAR = mt.Compression.TAR
SYM, LNK, DIR = tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE
STEPS = "abcdefghijklmnop"
UP = "../../.."  # from a staging directory (cache/layers/.tmp-* or cache/trees/.tmp-*) to the test's directory
Snapshot = dict[str, tuple[int, int, int, str]]


def snapshot(top: Path, skip: Path) -> Snapshot:
    """path -> (mode, size, mtime_ns, sha256 or link target) of everything under ``top`` but ``skip``."""
    view: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = ""
            view[str(path.relative_to(top))] = (st.st_mode, st.st_size, st.st_mtime_ns, content)
    return view


def staging_length(cache_root: Path) -> int:
    """The length of the real path of a layer's staging directory, ``layers/.tmp-sha256-<hex>-<8 random>``."""
    return len(os.path.realpath(cache_root / "layers")) + len("/.tmp-sha256-") + 64 + 1 + 8


def path_max_chain(dest_length: int) -> list[Entry]:
    """CVE-2025-4517: sixteen directories with long names, each reached through a one-letter symlink, so that
    resolving ``a/b/.../p`` passes PATH_MAX and ``os.path.realpath`` goes on lexically; then ``a/.../p/lll``
    climbing sixteen levels (back to the extraction directory, which realpath never sees), and ``escape``
    pointing at ``a/.../p/lll/../../..``: lexically inside, physically the test's directory (three levels up)."""
    component = "d" * ((4096 - dest_length) // (len(STEPS) + 1))
    entries, path = [], ""
    for step in STEPS:
        entries.append(Entry(f"{path}{component}", type=DIR, mode=0o755))
        entries.append(Entry(f"{path}{step}", type=SYM, linkname=component))
        path += component + "/"
    linkpath = "/".join(STEPS) + "/" + "l" * 254
    entries.append(Entry(linkpath, type=SYM, linkname="/".join([".."] * len(STEPS))))
    entries.append(Entry("escape", type=SYM, linkname=f"{linkpath}/../../.."))
    return entries


def invalid_header_in_the_middle() -> bytes:
    """CVE-2025-4435's class: a member tarfile gives up on silently (a bad header after the first), so the
    members after it would be left out without a word."""
    first, last = make_tar([Entry("first", b"1")]), make_tar([Entry("after-the-bad-header", b"2")])
    body = first[:1024]  # header and data block of "first", without the end-of-archive blocks
    return body + b"\x7fgarbage" * 64 + last


# case -> (entries, given the staging path length; where an escape would land, relative to the test directory)
Builder = Callable[[int], list[Entry]]
CASES: dict[str, tuple[Builder, str]] = {
    "cve-2025-4517-file-through-chain": (
        lambda n: [*path_max_chain(n), Entry("escape/pwned", b"owned")], "pwned"),
    "cve-2025-4517-hardlink-then-overwrite": (
        lambda n: [*path_max_chain(n), Entry("flag", type=LNK, linkname="escape/outside/victim.txt"),
                   Entry("flag", b"overwritten")], "outside/victim.txt"),
    "cve-2025-4330-symlink-out": (
        lambda n: [*path_max_chain(n), Entry("out", type=SYM, linkname="escape/outside")], "pwned"),
    "cve-2025-4138-hardlink-out": (
        lambda n: [*path_max_chain(n), Entry("copy", type=LNK, linkname="escape/outside/victim.txt")],
        "outside/victim.txt"),
    "cve-2024-12718-metadata-through-link": (
        lambda n: [*path_max_chain(n), Entry("meta", type=LNK, linkname="escape/outside/victim.txt",
                                                  mode=0o777)], "outside/victim.txt"),
    "cve-2025-4435-refused-entry-among-good-ones": (
        lambda n: [Entry("good", b"g"), Entry("abs", type=SYM, linkname="/etc/passwd"), Entry("more", b"m")],
        "pwned"),
    "absolute-path": (lambda n: [Entry(f"/{UP}/pwned", b"x")], "pwned"),
    "dotdot": (lambda n: [Entry(f"{UP}/pwned", b"x")], "pwned"),
    "hardlink-out": (lambda n: [Entry("h", type=LNK, linkname=f"{UP}/outside/victim.txt")], "outside/victim.txt"),
    "symlink-to-absolute-dir-then-file": (
        lambda n: [Entry("etc", type=SYM, linkname=str(OUTSIDE_ROOT)), Entry("etc/pwned", b"x")], "outside/pwned"),
    "symlink-out-then-file": (
        lambda n: [Entry("etc", type=SYM, linkname=f"{UP}/outside"), Entry("etc/pwned", b"x")], "outside/pwned"),
    "char-device": (lambda n: [Entry("null", type=tarfile.CHRTYPE)], "pwned"),
    "fifo": (lambda n: [Entry("pipe", type=tarfile.FIFOTYPE)], "pwned"),
    "setuid": (lambda n: [Entry("bin", b"elf", mode=0o4755)], "pwned"),
    "duplicate-name-replaces-a-link-out": (
        lambda n: [*path_max_chain(n), Entry("l", type=SYM, linkname="escape/outside/victim.txt"),
                   Entry("l", b"written through the link?")], "outside/victim.txt"),
    "directory-replaced-by-a-symlink-then-files": (
        lambda n: [*path_max_chain(n), Entry("d", type=DIR), Entry("d/ok", b"ok"),
                   Entry("d", type=SYM, linkname="escape/outside"), Entry("d/pwned", b"x")], "outside/pwned"),
    "dotdot-after-a-link-to-the-root": (
        lambda n: [Entry("b", type=SYM, linkname="."), Entry("x", type=SYM, linkname="b/.."),
                   Entry("x/pwned", b"x")], "pwned"),
}
OUTSIDE_ROOT = Path("/nonexistent")  # set per test: the absolute path of the outside directory


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    global OUTSIDE_ROOT
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "victim.txt").write_text("the victim's content")
    os.chmod(directory / "victim.txt", 0o640)
    os.utime(directory / "victim.txt", (1_600_000_000, 1_600_000_000))
    OUTSIDE_ROOT = directory
    return directory


def cli_pull(ref: str, root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ocimodel.cli", "pull", ref, "--plain-http", "--root", str(root),
                           *extra], capture_output=True, text=True, timeout=300)


def assert_refused_in_one_line(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 6, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ocimodel: unsafe content: "), proc.stderr[-4000:]


def lazy_outcome(root: Path, ref: str) -> object:
    """The kind of error building the lazy view raises, or the view's paths when it accepts the model."""
    cache = ModelCache(ContentStore(root), make_client())
    try:
        model = LazyModel(cache, cache.client.resolve(parse_reference(ref)), PullOptions())
        model.build()
    except ModelCacheError as exc:
        return exc.kind
    paths = sorted(model.root.children)
    model.close()
    return paths


def assert_cache_clean(root: Path) -> None:
    """Nothing half-written is visible: no tree, no extracted layer, no staging directory, no record."""
    for sub in ("trees", "layers", "models"):
        assert sorted(p.name for p in (root / sub).iterdir()) == [], sub


@pytest.mark.parametrize("case", sorted(CASES))
def test_escape_is_refused_by_the_cli_and_the_lazy_view(fixtures: Fixtures, tmp_path: Path, outside: Path,
                                                        case: str) -> None:
    root = tmp_path / "cache"
    build, target = CASES[case]
    name = f"escape/{case}:v1"
    fixtures.manifest(name, [fixtures.layer(name, make_tar(build(staging_length(root))),
                                            mt.model_layer_type("weight", TAR))])
    before = snapshot(tmp_path, root)
    proc = cli_pull(fixtures.ref(name), root)
    assert snapshot(tmp_path, root) == before
    if target != "outside/victim.txt":
        assert not os.path.lexists(tmp_path / target)
    assert_refused_in_one_line(proc)
    assert_cache_clean(root)
    assert lazy_outcome(root, fixtures.ref(name)) is Kind.UNSAFE_CONTENT
    assert snapshot(tmp_path, root) == before


def test_the_path_max_chain_compressed(fixtures: Fixtures, tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "cache"
    name = "escape/chain-gzip:v1"
    entries = [*path_max_chain(staging_length(root)), Entry("escape/pwned", b"owned")]
    fixtures.manifest(name, [fixtures.layer(name, compress(make_tar(entries), mt.Compression.TAR_GZIP),
                                            mt.model_layer_type("weight", mt.Compression.TAR_GZIP))])
    before = snapshot(tmp_path, root)
    proc = cli_pull(fixtures.ref(name), root)
    assert snapshot(tmp_path, root) == before and not (tmp_path / "pwned").exists()
    assert_refused_in_one_line(proc)
    assert_cache_clean(root)


def test_invalid_header_in_the_middle_is_refused_not_skipped(fixtures: Fixtures, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    name = "escape/bad-header:v1"
    fixtures.manifest(name, [fixtures.layer(name, invalid_header_in_the_middle(),
                                            mt.model_layer_type("weight", TAR))])
    assert_refused_in_one_line(cli_pull(fixtures.ref(name), root))
    assert_cache_clean(root)
    assert lazy_outcome(root, fixtures.ref(name)) is Kind.UNSAFE_CONTENT


@pytest.mark.parametrize("marker", [".wh...", ".wh..", "sub/.wh..."])
def test_whiteout_of_dot_or_dotdot_is_refused(fixtures: Fixtures, tmp_path: Path, outside: Path,
                                              marker: str) -> None:
    """A whiteout names what it removes: ``.wh...`` would remove the directory above the one it is in."""
    root = tmp_path / "cache"
    fixtures.raw_model("escape/bystander:v1", {"keep.bin": b"k"})
    bystander = cli_pull(fixtures.ref("escape/bystander:v1"), root)
    assert bystander.returncode == 0, bystander.stderr
    name = f"escape/whiteout-{len(marker)}-{marker.count('/')}:v1"
    layers = [make_tar([Entry("sub/file", b"f"), Entry("top", b"t")]), make_tar([Entry(marker, b"")])]
    fixtures.manifest(name, [fixtures.layer(name, data, mt.model_layer_type("weight", TAR)) for data in layers])
    trees_before = sorted(p.name for p in (root / "trees").iterdir())
    before = snapshot(tmp_path, root)
    assert_refused_in_one_line(cli_pull(fixtures.ref(name), root))
    assert snapshot(tmp_path, root) == before
    assert sorted(p.name for p in (root / "trees").iterdir()) == trees_before
    assert cli_pull(fixtures.ref("escape/bystander:v1"), root).returncode == 0
    assert lazy_outcome(root, fixtures.ref(name)) is Kind.UNSAFE_CONTENT


def test_dotdot_after_a_link_across_layers(fixtures: Fixtures, tmp_path: Path, outside: Path) -> None:
    """Each layer is fine alone; together ``x -> b/..`` with ``b -> .`` leads above the model."""
    root = tmp_path / "cache"
    name = "escape/across-layers:v1"
    layers = [make_tar([Entry("b", type=SYM, linkname=".")]), make_tar([Entry("x", type=SYM, linkname="b/..")])]
    fixtures.manifest(name, [fixtures.layer(name, data, mt.model_layer_type("weight", TAR)) for data in layers])
    assert_refused_in_one_line(cli_pull(fixtures.ref(name), root))
    assert [p.name for p in (root / "trees").iterdir()] == [] and [p.name for p in (root / "models").iterdir()] == []
    assert lazy_outcome(root, fixtures.ref(name)) is Kind.UNSAFE_CONTENT


def test_a_later_file_replaces_a_link_without_writing_through_it(fixtures: Fixtures, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    name = "escape/replace-link:v1"
    entries = [Entry("x", b"the original"), Entry("l", type=SYM, linkname="x"), Entry("l", b"a new file"),
               Entry("d", type=SYM, linkname="x"), Entry("d", type=DIR), Entry("d/f", b"in a directory")]
    fixtures.manifest(name, [fixtures.layer(name, make_tar(entries), mt.model_layer_type("weight", TAR))])
    proc = cli_pull(fixtures.ref(name), root)
    assert proc.returncode == 0, proc.stderr
    tree = next(p for p in (root / "trees").iterdir())
    assert (tree / "x").read_bytes() == b"the original"
    assert not (tree / "l").is_symlink() and (tree / "l").read_bytes() == b"a new file"
    assert (tree / "d").is_dir() and not (tree / "d").is_symlink() and (tree / "d/f").read_bytes() == b"in a directory"
    assert lazy_outcome(root, fixtures.ref(name)) == ["d", "l", "x"]


# -- per-model caps, counted across layers -------------------------------------------------------------------
def files_layer(prefix: str, count: int, size: int = 1) -> bytes:
    return make_tar([Entry(f"{prefix}/f{i}", os.urandom(size)) for i in range(count)])


def push_tar_layers(fixtures: Fixtures, name: str, layers: list[bytes],
                    compression: mt.Compression = TAR) -> str:
    fixtures.manifest(name, [fixtures.layer(name, compress(data, compression),
                                            mt.model_layer_type("weight", compression)) for data in layers])
    return fixtures.ref(name)


def capped(root: Path, **caps: int) -> ModelCache:
    return ModelCache(ContentStore(root), make_client(), **caps)  # type: ignore[arg-type]


def refusal(cache: ModelCache, ref: str) -> ModelCacheError:
    """The pull's error; no tree, record or staging directory is left of it."""
    def listing() -> list[list[str]]:
        return [sorted(p.name for p in d.iterdir()) for d in (cache.store.trees, cache.store.models)]
    before = listing()
    with pytest.raises(ModelCacheError) as info:
        cache.pull(ref)
    assert info.value.kind is Kind.UNSAFE_CONTENT, info.value
    assert listing() == before
    assert not [p.name for p in cache.store.layers.iterdir() if p.name.startswith(".tmp-")]
    return info.value


def lazy_refusal(cache: ModelCache, ref: str) -> str:
    model = LazyModel(cache, cache.client.resolve(parse_reference(ref)), PullOptions())
    with pytest.raises(ModelCacheError) as info:
        model.build()
    assert info.value.kind is Kind.UNSAFE_CONTENT, info.value
    return str(info.value)


def test_the_file_cap_counts_every_layer(fixtures: Fixtures, tmp_path: Path) -> None:
    """Three layers of 41 entries (40 files and their directory): each fits in 100, the model does not."""
    ref = push_tar_layers(fixtures, "caps/files:v1", [files_layer(d, 40) for d in ("a", "b", "c")])
    assert "maxModelFiles" in str(refusal(capped(tmp_path / "bind", max_model_files=100), ref))
    assert "maxModelFiles" in lazy_refusal(capped(tmp_path / "lazy", max_model_files=100), ref)
    assert capped(tmp_path / "roomy", max_model_files=123).pull(ref).record.files == 120


def test_the_byte_cap_counts_raw_and_tar_layers(fixtures: Fixtures, tmp_path: Path) -> None:
    """A raw layer and two tar layers of 60 kB each against a cap of 150 kB. The tar layers are compressed for
    the pull (their declared sizes are within the cap; what they hold is not), uncompressed for the lazy view."""
    raw = os.urandom(60_000)
    for compression in (mt.Compression.TAR_GZIP, TAR):
        name = f"caps/bytes-{compression.name.lower()}:v1"
        layers = [fixtures.layer(name, raw, mt.model_layer_type("weight", mt.Compression.RAW),
                                 {mt.ANNOTATION_FILEPATH: "raw.bin"}),
                  *(fixtures.layer(name, compress(make_tar([Entry(f"{d}/zeros", bytes(60_000))]), compression),
                                   mt.model_layer_type("weight", compression)) for d in "ab")]
        fixtures.manifest(name, layers)
    gzipped, plain = fixtures.ref("caps/bytes-tar_gzip:v1"), fixtures.ref("caps/bytes-tar:v1")
    assert "maxModelGiB" in str(refusal(capped(tmp_path / "bind", max_model_bytes=150_000), gzipped))
    assert "maxModelGiB" in lazy_refusal(capped(tmp_path / "lazy", max_model_bytes=150_000), plain)
    assert capped(tmp_path / "roomy", max_model_bytes=180_000).pull(gzipped).record.total_bytes == 180_000


def test_the_expansion_slack_is_granted_once_per_model(fixtures: Fixtures, tmp_path: Path) -> None:
    """Three gzip layers of 25 MB of zeros (tens of KB each): each is within 2x its size plus the 64 MiB
    slack, as the old per-layer limit allowed; the model is not."""
    zeros = make_tar([Entry("zeros.bin", bytes(25 << 20))])
    ref = push_tar_layers(fixtures, "caps/slack:v1", [make_tar([Entry(f"{d}/zeros.bin", bytes(25 << 20))])
                                                      for d in "abc"], mt.Compression.TAR_GZIP)
    assert len(compress(zeros, mt.Compression.TAR_GZIP)) < 100_000
    assert "decompression bomb" in str(refusal(capped(tmp_path / "bind", expand_ratio=2), ref))


def test_a_shared_layer_counts_for_every_model_that_uses_it(fixtures: Fixtures, tmp_path: Path) -> None:
    """Two layers of 61 entries: alone each fits in 100. The first was extracted for another model before."""
    shared = files_layer("shared", 60)
    first = push_tar_layers(fixtures, "caps/first:v1", [shared])
    second = push_tar_layers(fixtures, "caps/second:v1", [shared, files_layer("own", 60)])
    cache = capped(tmp_path / "cache", max_model_files=100)
    cache.pull(first)
    assert "maxModelFiles" in str(refusal(cache, second))
    # the shared layer, extracted for the first model, was charged again (61 entries), so its own 61 were too many
    assert len(list(cache.store.layers.iterdir())) == 1


def test_the_cap_from_the_node_settings_through_the_cli(fixtures: Fixtures, tmp_path: Path) -> None:
    ref = push_tar_layers(fixtures, "caps/settings:v1", [files_layer("w", 60)])
    config = tmp_path / "node.yaml"
    config.write_text("maxModelFiles: 50\n")
    proc = cli_pull(ref, tmp_path / "cache", "--config", str(config))
    assert_refused_in_one_line(proc)
    assert "maxModelFiles" in proc.stderr


# -- headers tarfile would act on before any member check (sizes, pax records, sparse maps) -----------------
def header(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> bytes:
    """One ustar header block for ``name``."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(tarfile.USTAR_FORMAT)


def with_data(block: bytes, data: bytes) -> bytes:
    return block + data + b"\0" * (-len(data) % 512)


def negative_size(name: str, size: int) -> bytes:
    """A header whose size field is base-256 ``size`` (below zero), its checksum recomputed."""
    block = bytearray(header(name))
    block[124:136] = (size % 256 ** 12).to_bytes(12, "big")
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def pax(records: dict[str, str], kind: bytes = tarfile.XHDTYPE) -> bytes:
    body = b""
    for key, value in records.items():
        tail = f" {key}={value}\n".encode()
        length = len(tail) + len(str(len(tail)))
        length += len(str(length)) - len(str(len(tail)))
        body += str(length).encode() + tail
    return with_data(header("PaxHeaders/x", len(body), kind), body)


END = b"\0" * 1024
FILE = with_data(header("after", 1), b"x")
HOSTILE_HEADERS: dict[str, bytes] = {
    "negative-size-dot": with_data(header("a", 1), b"a") + negative_size(".", -512) + FILE + END,
    "negative-size-outside-the-model": negative_size("../elsewhere", -512) + FILE + END,
    "pax-size-below-zero": pax({"size": "-512"}) + header("f") + FILE + END,
    "pax-global-headers": pax({f"g{i}": "1" for i in range(1000)}, tarfile.XGLTYPE) + FILE + END,
    "cve-2024-6232-pax-digits": with_data(header("PaxHeaders/x", 1 << 17, tarfile.XHDTYPE), b"1" * (1 << 17))
    + FILE + END,
    "gnu-sparse-1.0-map-without-newline": pax({"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                               "GNU.sparse.name": "s", "GNU.sparse.realsize": "1"})
    + with_data(header("GNUSparseFile.0/s", 4096), b"9" * 4096) + END,
    "gnu-sparse-type": with_data(header("s", 512, tarfile.GNUTYPE_SPARSE), bytes(512)) + END,
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_headers_are_refused_before_tarfile_acts_on_them(fixtures: Fixtures, tmp_path: Path,
                                                               case: str) -> None:
    """A negative size sent tarfile's offset backwards (the lazy index read one header forever), a pax header
    of digits took tarfile's regex minutes, global headers piled up, a GNU sparse map was read unbounded (or
    failed as 'internal'): each is refused, by the CLI with exit 6 and by the lazy view."""
    name = f"headers/{case}:v1"
    fixtures.manifest(name, [fixtures.layer(name, HOSTILE_HEADERS[case], mt.model_layer_type("weight", TAR))])
    root = tmp_path / "cache"
    assert lazy_outcome(root, fixtures.ref(name)) is Kind.UNSAFE_CONTENT
    assert_refused_in_one_line(cli_pull(fixtures.ref(name), root))
    assert_cache_clean(root)


def test_well_formed_pax_headers_still_work(fixtures: Fixtures, tmp_path: Path) -> None:
    long_name = "d/" + "n" * 200
    info = tarfile.TarInfo(long_name)
    info.size = 2
    info.pax_headers = {"comment": "1" * 5000, "mtime": "1700000000.5"}
    name = "headers/pax:v1"
    data = with_data(info.tobuf(tarfile.PAX_FORMAT), b"ok") + END
    fixtures.manifest(name, [fixtures.layer(name, data, mt.model_layer_type("weight", TAR))])
    assert lazy_outcome(tmp_path / "lazy", fixtures.ref(name)) == ["d"]
    path = ModelCache(ContentStore(tmp_path / "cache"), make_client()).pull(fixtures.ref(name)).path
    assert (path / long_name).read_bytes() == b"ok"
