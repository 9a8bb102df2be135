"""JIT build of the CUDA kernels into shared libraries with a C ABI, loaded through ctypes.

Why plain nvcc and ctypes rather than torch's cpp_extension: the kernels include no torch
header, so a library builds in seconds, builds on a machine without a GPU (CI compiles every
``.cu``), and does not depend on the exact torch build.  Each C entry point takes raw data
pointers and a ``cudaStream_t`` and returns a ``cudaError_t`` (see `clusterfuse.ops.launch`).

* Sources live under ``clusterfuse/kernels/`` and are named relative to it; headers under
  ``clusterfuse/kernels/include/clusterfuse/`` are included as ``"clusterfuse/x.cuh"``.
* Specialisation is by ``-D`` macros (``defines``); every ``.cu`` has ``#ifndef`` defaults so it
  also compiles with none.
* cudart is linked statically and nothing links libcuda: no kernel library calls the driver API
  (one that comes to need it should take the entry point through
  ``cudaGetDriverEntryPointByVersion`` rather than link libcuda).
* Every library also gets ``common/runtime.cu`` (``cf_error_string`` and friends), so Python
  can turn an error code into text without loading a second cudart.
* Cache: ``$XDG_CACHE_HOME/clusterfuse/kernels`` (else ``~/.cache/clusterfuse/kernels``;
  ``CLUSTERFUSE_CACHE_DIR`` overrides), keyed by a hash of every kernel source and header, the
  defines, the nvcc version, the arch and the flags.  A file lock per library keeps concurrent
  processes from building the same one twice, and the finished file is renamed into place so no
  process ever loads a half-written library.
* Loading a library runs its constructors, so the cache is trusted only as far as its owner:
  the folder is created 0700; a folder, library or digest that is not owned by this user or is
  writable by group/others is refused (`KernelCacheError`); and every library is checked against
  the SHA-256 recorded beside it (``<lib>.so.sha256``, written owner-only and atomically when we
  built it) before ``dlopen`` — a library whose bytes differ, or that has no digest, is rebuilt.
  A prebuilt cache carried to another machine keeps working when it carries the digests and is
  owned by the user who loads it there (``tools/pack_kcache.py`` packs both, owned by root).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from filelock import FileLock

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"
INCLUDE_DIR = KERNEL_DIR / "include"
ARCH_FLAGS = ("-gencode=arch=compute_90a,code=sm_90a",)
#: Sources compiled into every library (relative to KERNEL_DIR).
COMMON_SOURCES = ("common/runtime.cu",)
NVCC_FLAGS = (
    "-O3",
    "-std=c++17",
    "-lineinfo",  # source lines in profiler / sanitizer reports; no effect on the code
    "--expt-relaxed-constexpr",
    "-Xcompiler=-fPIC",
    "-DCF_BUILDING_LIBRARY=1",
)

logger = logging.getLogger(__name__)

Define = int | str | bool
BuildSpec = tuple[str, Sequence[str], Mapping[str, Define]]


class BuildError(RuntimeError):
    """nvcc failed; the message holds its command line and output."""


class KernelCacheError(ValueError):
    """The kernel cache cannot be trusted (foreign owner, writable by others); nothing was loaded."""


#: Suffix of the digest file written beside each library we build (``name-key.so.sha256``).
DIGEST_SUFFIX = ".sha256"


def default_cache_dir() -> Path:
    """The per-user default: ``$XDG_CACHE_HOME/clusterfuse/kernels``, else ``~/.cache/clusterfuse/kernels``.

    A relative ``XDG_CACHE_HOME`` is ignored, as the XDG spec says."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "clusterfuse" / "kernels"


def cache_dir() -> Path:
    """``CLUSTERFUSE_CACHE_DIR`` (a prebuilt cache carried to the GPU machine) or the per-user default."""
    root = os.environ.get("CLUSTERFUSE_CACHE_DIR")
    return Path(root).expanduser() if root else default_cache_dir()


def _refuse_untrusted(path: Path, st: os.stat_result, what: str) -> None:
    """Raise unless ``path`` (stat ``st``) is owned by this user and not writable by group or others."""
    uid = os.geteuid()
    if st.st_uid != uid:
        raise KernelCacheError(f"kernel cache: {what} {path} is owned by uid {st.st_uid}, not by you (uid {uid}); "
                               "refusing to load kernels from it (use a cache folder of your own: "
                               "CLUSTERFUSE_CACHE_DIR or the default ~/.cache/clusterfuse/kernels)")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KernelCacheError(f"kernel cache: {what} {path} is writable by group or others "
                               f"(mode {stat.S_IMODE(st.st_mode):o}); refusing to load kernels from it "
                               f"(chmod go-w {path}, or use another cache folder)")


def secure_cache_dir(path: Path | None = None) -> Path:
    """``path`` (default `cache_dir`), created with mode 0700 if missing, checked: a directory owned
    by this user and not writable by group/others, else `KernelCacheError`."""
    path = cache_dir() if path is None else path
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:  # another process made it meanwhile: checked below like any folder
            pass
    st = os.stat(path)  # follows a symlink: the folder that is used is the one checked
    if not stat.S_ISDIR(st.st_mode):
        raise KernelCacheError(f"kernel cache: {path} is not a directory")
    _refuse_untrusted(path, st, "folder")
    _refuse_untrusted_ancestors(path.resolve())
    return path


def _refuse_untrusted_ancestors(path: Path) -> None:
    """Whoever can rename entries of a folder above the cache can swap the cache for their own: every
    ancestor must be owned by this user or root and not writable by others (unless sticky, as /tmp is)."""
    uid = os.geteuid()
    for parent in path.parents:
        st = os.stat(parent)
        if st.st_uid not in (uid, 0):
            raise KernelCacheError(f"kernel cache: {path} lies under {parent}, which is owned by uid {st.st_uid} "
                                   "(neither you nor root); refusing to load kernels from it")
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise KernelCacheError(f"kernel cache: {path} lies under {parent}, which anyone may write to (and is not "
                                   "sticky); refusing to load kernels from it")


def _checked_file(path: Path, what: str) -> bool:
    """False if ``path`` does not exist; True if it is a regular file we may trust; else `KernelCacheError`
    (a symlink, a foreign owner, group/other write permission)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        raise KernelCacheError(f"kernel cache: {what} {path} is not a regular file (a symlink?); refusing it")
    _refuse_untrusted(path, st, what)
    return True


def file_digest(path: Path) -> str:
    """SHA-256 of the file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digest_path(library: Path) -> Path:
    return library.with_name(library.name + DIGEST_SUFFIX)


def _write_digest(library: Path, digest: str) -> None:
    """Write ``library``'s digest file atomically, owner-only (mkstemp makes it 0600)."""
    fd, tmp = tempfile.mkstemp(dir=library.parent, prefix=f".{library.name}-", suffix=DIGEST_SUFFIX)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(digest + "\n")
        os.replace(tmp, digest_path(library))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library_is_intact(library: Path) -> bool:
    """True if ``library`` exists and its bytes match the digest recorded when it was built; False if it
    is missing, has no digest or differs (to be rebuilt). Untrusted files raise `KernelCacheError`."""
    if not _checked_file(library, "library"):
        return False
    record = digest_path(library)
    if not _checked_file(record, "digest"):
        return False
    recorded = record.read_text(errors="replace").strip()
    return bool(re.fullmatch(r"[0-9a-f]{64}", recorded)) and recorded == file_digest(library)


@functools.cache
def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME / $CUDA_PATH, then PATH, then /usr/local/cuda; None if absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def _require_nvcc() -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH); the fused kernels need CUDA >= 12.4")
    return nvcc


@functools.cache
def nvcc_version() -> str:
    """The release line of ``nvcc --version`` (part of the cache key)."""
    out = subprocess.run([_require_nvcc(), "--version"], capture_output=True, text=True, check=True).stdout
    lines = [ln for ln in out.splitlines() if "release" in ln or ln.startswith("Build")]
    return " ".join(lines) or out.strip()


def define_flags(defines: Mapping[str, Define]) -> list[str]:
    """``-DNAME=value`` flags, sorted so the same defines always give the same key."""
    flags = []
    for name in sorted(defines):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"define name {name!r} is not a C identifier")
        value = defines[name]
        if isinstance(value, bool):  # before int: bool is an int
            value = int(value)
        if not isinstance(value, int | str):
            raise ValueError(f"define {name}: value {value!r} must be int, str or bool")
        flags.append(f"-D{name}={value}")
    return flags


_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def _dependencies(sources: Sequence[Path]) -> list[Path]:
    """The sources and every quoted header they include, transitively (what the build reads).

    Hashing these rather than the whole kernel folder keeps one engineer's edit to an
    unrelated kernel from invalidating everybody's cached libraries."""
    seen: dict[Path, None] = {}
    todo = list(sources)
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen[p] = None
        for inc in _INCLUDE_RE.findall(p.read_text(errors="replace")):
            for base in (p.parent, INCLUDE_DIR):
                cand = (base / inc).resolve()
                if cand.is_file():
                    todo.append(cand)
                    break
    return sorted(seen)


def _resolve(sources: Sequence[str]) -> list[Path]:
    paths = []
    for s in [*sources, *COMMON_SOURCES]:
        p = Path(s) if Path(s).is_absolute() else KERNEL_DIR / s
        if not p.is_file():
            raise FileNotFoundError(f"kernel source {s!r} not found (looked for {p})")
        if p not in paths:
            paths.append(p)
    return paths


def build_key(name: str, sources: Sequence[str], defines: Mapping[str, Define]) -> str:
    """Hash of everything that can change the built library: the sources and the headers they
    include (contents), the defines, nvcc's version, the arch and the flags."""
    h = hashlib.sha256()
    paths = _resolve(sources)
    for part in (name, nvcc_version(), *ARCH_FLAGS, *NVCC_FLAGS, *define_flags(defines),
                 *(str(p.relative_to(KERNEL_DIR)) for p in paths)):
        h.update(part.encode() + b"\0")
    for p in _dependencies(paths):
        h.update(str(p.relative_to(KERNEL_DIR)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def _run_nvcc(args: list[str], what: str) -> None:
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"nvcc failed building {what} (exit {proc.returncode}):\n  {' '.join(args)}\n"
                         f"{proc.stdout}{proc.stderr}")


def build_library(name: str, sources: Sequence[str], defines: Mapping[str, Define] | None = None) -> Path:
    """Build (or find in the cache) the shared library; returns its path. Loads nothing."""
    defines = dict(defines or {})
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"library name {name!r}: use letters, digits, '.', '_', '-'")
    target = secure_cache_dir() / f"{name}-{build_key(name, sources, defines)}.so"
    if library_is_intact(target):
        return target
    with FileLock(str(target) + ".lock"):
        if library_is_intact(target):  # another process built it while we waited
            return target
        if target.exists():
            if find_nvcc() is None:
                raise KernelCacheError(f"kernel cache: {target} does not match the digest recorded when it was "
                                       "built (or has none), and nvcc is not available to rebuild it; delete it, "
                                       "or carry the cache with its .sha256 files")
            logger.warning("kernel library %s does not match its recorded digest (or has none): rebuilding it",
                           target)
        args = [_require_nvcc(), *ARCH_FLAGS, *NVCC_FLAGS, "-shared", "-cudart=static", f"-I{INCLUDE_DIR}",
                *define_flags(defines), *(str(p) for p in _resolve(sources))]
        shown = " ".join(f"{k}={v}" for k, v in sorted(defines.items()))
        print(f"clusterfuse: building kernel library {name} ({shown or 'defaults'}) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}-", suffix=".so")
        os.close(fd)
        try:
            _run_nvcc([*args, "-o", tmp], f"library {name}")
            os.chmod(tmp, 0o700)  # the linker may have recreated it with the umask's mode
            # The digest first: a reader between the two renames sees a mismatch and waits on the lock.
            _write_digest(target, file_digest(Path(tmp)))
            os.replace(tmp, target)  # atomic: readers see no file or the whole file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        print(f"clusterfuse: built {name} in {time.perf_counter() - t0:.1f}s -> {target}", file=sys.stderr, flush=True)
    return target


_loaded: dict[str, ctypes.CDLL] = {}
_load_lock = threading.Lock()


def load_library(name: str, sources: Sequence[str], defines: Mapping[str, Define] | None = None) -> ctypes.CDLL:
    """Build on first use (cached on disk) and load; memoised per process by the build key."""
    defines = dict(defines or {})
    with _load_lock:
        key = f"{name}-{build_key(name, sources, defines)}"
        lib = _loaded.get(key)
        if lib is None:
            path = build_library(name, sources, defines)  # checked: owner, mode and digest
            lib = ctypes.CDLL(str(path))
            lib.cf_error_string.argtypes = [ctypes.c_int]
            lib.cf_error_string.restype = ctypes.c_char_p
            _loaded[key] = lib
        return lib


def any_loaded_library() -> ctypes.CDLL | None:
    """A loaded library (each exports ``cf_error_string``), for `launch.check`."""
    return next(iter(_loaded.values()), None)


def compile_check(source: str, defines: Mapping[str, Define] | None = None, extra_flags: Sequence[str] = ()) -> str:
    """Compile one source to an object file (no link) and return nvcc's output (e.g. ptxas -v).

    Used by CI to check that every ``.cu`` compiles with its defaults; raises `BuildError`."""
    with tempfile.TemporaryDirectory(prefix="clusterfuse-check-") as tmp:
        return compile_one(source, Path(tmp) / "out.o", defines, ["-c", *extra_flags])


def compile_one(source: str, out: Path, defines: Mapping[str, Define] | None = None,
                extra_flags: Sequence[str] = ("-c",)) -> str:
    """Compile one source with the library's flags to ``out`` (``-c``: an object file, ``-cubin``:
    machine code to disassemble) and return nvcc's output; raises `BuildError`."""
    path = _resolve([source])[0]
    args = [_require_nvcc(), *ARCH_FLAGS, *NVCC_FLAGS, *extra_flags, f"-I{INCLUDE_DIR}",
            *define_flags(defines or {}), str(path), "-o", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"nvcc failed compiling {source} (exit {proc.returncode}):\n  {' '.join(args)}\n"
                         f"{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


def all_kernel_sources() -> list[str]:
    """Every ``.cu`` under the kernel folder, relative to it (what CI compiles)."""
    return sorted(str(p.relative_to(KERNEL_DIR)) for p in KERNEL_DIR.rglob("*.cu"))


def unique_specs(specs: Iterable[BuildSpec]) -> list[BuildSpec]:
    """``specs`` without repeats (same name, sources and defines: the same library), first
    occurrence first. Different batch sizes or models often share a build."""
    unique: dict[tuple, BuildSpec] = {}
    for name, sources, defines in specs:
        unique.setdefault((name, tuple(sources), tuple(sorted(defines.items()))), (name, sources, dict(defines)))
    return list(unique.values())


def prebuild(specs: Iterable[BuildSpec], jobs: int | None = None) -> list[Path]:
    """Build ``(name, sources, defines)`` libraries into the cache, each distinct one once, in
    parallel (``clusterfuse build``); returns their paths (unique_specs order)."""
    from concurrent.futures import ThreadPoolExecutor

    specs = unique_specs(specs)
    with ThreadPoolExecutor(max_workers=jobs or min(len(specs), os.cpu_count() or 1) or 1) as pool:
        return list(pool.map(lambda s: build_library(s[0], s[1], s[2]), specs))
