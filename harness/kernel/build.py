"""Build a tree's ``arch/arm64/kvm/hyp/pgtable.c`` exactly as kbuild does: out of tree, cached.

    objs = build_objects(locate_tree(debian_tree("6.12")), BuildConfig(4096, "gcc"))
    objs.nvhe_obj      # BUILD/arch/arm64/kvm/hyp/pgtable.nvhe.o: the nVHE hypervisor's build
    objs.kernel_obj    # BUILD/arch/arm64/kvm/hyp/pgtable.o: the kernel-proper (VHE) build
    compile_c(objs, "nvhe", Path("host.c"), Path("host.o"), objs.tree.api.c_defines())

The build directory (``O=``) is keyed by the tree's path and version, the page size and the compiler:
``<base>/<linux-VERSION>-<granule>-<cc>-<hash of the path>``, where ``<base>`` is the ``cache``
argument, else ``$HARNESS_KBUILD_DIR``, else ``$XDG_CACHE_HOME/pgtable-harness/kbuild`` (``~/.cache``).
``make defconfig`` (then ``scripts/config`` and ``olddefconfig`` for 16K/64K) and ``make prepare`` run
once per directory; a stamp file written last marks them done, so a directory a killed run left behind is
wiped and redone. The two objects are asked of make on every call, so its own dependency tracking rebuilds
exactly what changed (an edited pgtable.c: that object only). A ``flock`` on ``<base>/<key>.lock`` keeps
two processes building the same key from corrupting it (:func:`compile_c` takes it shared). The tree is
never written.

``python -m harness.kernel.build --tree DIR --granule 4K --cc gcc`` prints the :class:`BuiltObjects` as JSON.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from harness.errors import HarnessError, InputError, MachineryError
from harness.kernel.tree import DEBIAN_SERIES, KernelTree, debian_tree, locate_tree
from harness.target import process
from harness.target.errors import ToolMissing

CROSS_COMPILE = "aarch64-linux-gnu-"
KBUILD_ENV = "HARNESS_KBUILD_DIR"
GRANULES = {"4K": 4096, "16K": 16384, "64K": 65536}
COMPILERS = ("gcc", "clang")
# Targets as kbuild names them: the nVHE build's object only has a rule through nvhe/../ (its output
# lands in arch/arm64/kvm/hyp/pgtable.nvhe.o).
NVHE_TARGET = "arch/arm64/kvm/hyp/nvhe/../pgtable.nvhe.o"
KERNEL_TARGET = "arch/arm64/kvm/hyp/pgtable.o"
NVHE_OBJ = "arch/arm64/kvm/hyp/pgtable.nvhe.o"
KERNEL_OBJ = "arch/arm64/kvm/hyp/pgtable.o"
CPUCAP_HEADERS = ("arch/arm64/include/generated/asm/cpucap-defs.h",  # 6.3 and later
                  "arch/arm64/include/generated/asm/cpucaps.h")      # 5.19-6.2
STAMP = ".harness-prepared"
LOG = "harness-make.log"
BUILD_TOOLS = ("make", "flex", "bison", "bc", "gcc")  # gcc: kbuild's host compiler (HOSTCC)
# Inherited variables that would change what kbuild does (or where it writes): never passed on.
_SCRUBBED_ENV = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEFILES", "GNUMAKEFLAGS", "LLVM", "LLVM_IAS", "KCFLAGS",
                 "KCPPFLAGS", "KAFLAGS", "KRUSTFLAGS", "ARCH", "CROSS_COMPILE", "CC", "LD", "O", "M", "V", "W", "C")


class TreeBuildError(MachineryError):
    """make or the compiler failed: the first line has the first ``error:`` line (or make's) and the log path."""


@dataclass(frozen=True)
class BuildConfig:
    """What a build directory is for besides its tree: the page size and the compiler."""

    page_size: int
    compiler: Literal["gcc", "clang"] = "gcc"

    def __post_init__(self) -> None:
        if self.page_size not in GRANULES.values():
            raise InputError(f"--granule: page size {self.page_size} is not one of 4096, 16384, 65536 (4K/16K/64K)")
        if self.compiler not in COMPILERS:
            raise InputError(f"--cc: {self.compiler!r} is not one of {', '.join(COMPILERS)}")

    @classmethod
    def parse(cls, granule: str, compiler: str = "gcc") -> BuildConfig:
        size = GRANULES.get(granule.upper())
        if size is None:
            raise InputError(f"--granule: {granule!r} is not one of {', '.join(GRANULES)}")
        if compiler not in COMPILERS:
            raise InputError(f"--cc: {compiler!r} is not one of {', '.join(COMPILERS)}")
        return cls(size, "clang" if compiler == "clang" else "gcc")

    @property
    def granule(self) -> str:
        return f"{self.page_size // 1024}K"

    def make_vars(self) -> list[str]:
        """The variables given to every make call (clang: also to kbuild's config, or it is redone for gcc)."""
        out = ["ARCH=arm64", f"CROSS_COMPILE={CROSS_COMPILE}"]
        if self.compiler == "clang":
            # clang with ld.lld; ar/nm/objcopy stay binutils' (gcc-aarch64-linux-gnu's), so LLVM=1's full set
            # of llvm-* tools is not needed.
            out += ["CC=clang", "LD=ld.lld"]
        return out


@dataclass(frozen=True)
class BuiltObjects:
    """The tree's pgtable.c built for one configuration, with what kbuild used to build it."""

    tree: KernelTree
    config: BuildConfig
    build_dir: Path
    nvhe_obj: Path
    kernel_obj: Path
    nvhe_cmd: list[str]      # kbuild's compiler argv for each object, without -Wp,-MMD,…, -o OUT and the source
    kernel_cmd: list[str]
    cpucaps: dict[str, int]  # HAS_LPA2 -> its number in this tree (ARM64_ prefix dropped)
    kconfig: dict[str, str]  # BUILD/.config: CONFIG_NAME -> value (strings unquoted)
    log: Path                # every make call's output, appended
    timings: dict[str, float] = field(default_factory=dict)  # seconds: lock, defconfig, prepare, objects, total

    def cmd(self, which: Literal["nvhe", "kernel"]) -> list[str]:
        return list(self.nvhe_cmd if which == "nvhe" else self.kernel_cmd)

    def as_json(self) -> dict[str, object]:
        return {
            "tree": self.tree.as_json(),
            "config": {"page_size": self.config.page_size, "granule": self.config.granule,
                       "compiler": self.config.compiler},
            "build_dir": str(self.build_dir), "nvhe_obj": str(self.nvhe_obj), "kernel_obj": str(self.kernel_obj),
            "nvhe_cmd": self.nvhe_cmd, "kernel_cmd": self.kernel_cmd, "cpucaps": self.cpucaps,
            "kconfig": self.kconfig, "log": str(self.log), "timings": self.timings,
        }


# ----------------------------------------------------------------------------------------------------------
# Where

def cache_base(cache: Path | None = None) -> Path:
    if cache is not None:
        return Path(cache)
    if os.environ.get(KBUILD_ENV):
        return Path(os.environ[KBUILD_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "pgtable-harness" / "kbuild"


def cache_key(tree: KernelTree, config: BuildConfig) -> str:
    digest = hashlib.sha256(str(tree.path).encode()).hexdigest()[:10]
    return f"{tree.label}-{config.granule}-{config.compiler}-{digest}"


def build_dir_for(tree: KernelTree, config: BuildConfig, cache: Path | None = None) -> Path:
    return (cache_base(cache) / cache_key(tree, config)).absolute()


# ----------------------------------------------------------------------------------------------------------
# Tools

def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


def check_tools(tree: KernelTree, config: BuildConfig) -> None:
    """ToolMissing unless the build tools and the compiler are there and new enough for this tree."""
    missing = [t for t in BUILD_TOOLS if shutil.which(t) is None]
    if missing:
        raise ToolMissing(f"building {tree.label}: {', '.join(missing)} not on PATH "
                          "(apt-get install flex bison bc make gcc; bash ci/setup.sh installs them)")
    if config.compiler == "gcc":
        cc, need = CROSS_COMPILE + "gcc", [CROSS_COMPILE + "gcc", CROSS_COMPILE + "ld", CROSS_COMPILE + "objcopy"]
        hint = "apt-get install gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu"
    else:
        cc, need = "clang", ["clang", "ld.lld", CROSS_COMPILE + "objcopy", CROSS_COMPILE + "ar"]
        hint = "apt-get install clang lld binutils-aarch64-linux-gnu"
    absent = [t for t in need if shutil.which(t) is None]
    if absent:
        raise ToolMissing(f"--cc {config.compiler}: {', '.join(absent)} not on PATH ({hint}; bash ci/setup.sh)")
    have = compiler_version(cc)
    want = min_tool_version(tree, "gcc" if config.compiler == "gcc" else "llvm")
    if have is not None and want is not None and _version_tuple(have) < _version_tuple(want):
        raise ToolMissing(f"--cc {config.compiler}: {cc} {have} is older than {tree.label} accepts "
                          f"(its scripts/min-tool-version.sh asks for {config.compiler} {want} or newer)")


def compiler_version(cc: str) -> str | None:
    try:
        out = process.run([cc, "--version"], name=f"{cc} --version", timeout=30,
                          env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"(?:clang version|\)) (\d+\.\d+\.\d+)", out) or re.search(r"\b(\d+\.\d+\.\d+)\b", out)
    return m.group(1) if m else None


def min_tool_version(tree: KernelTree, tool: str) -> str | None:
    """What the tree's ``scripts/min-tool-version.sh TOOL`` prints for arm64 (None: no such script)."""
    script = tree.path / "scripts" / "min-tool-version.sh"
    if not script.is_file():
        return None
    try:
        out = process.run(["sh", str(script), tool], name="min-tool-version.sh", timeout=30,
                          env={**os.environ, "ARCH": "arm64", "SRCARCH": "arm64"}).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out if re.fullmatch(r"\d+(\.\d+)*", out) else None


# ----------------------------------------------------------------------------------------------------------
# Running make

_COMPILER_ERROR = re.compile(r"^\S+?:\d+(?::\d+)?: (?:fatal )?error: .*$", re.MULTILINE)
_MAKE_ERROR = re.compile(r"^make(?:\[\d+\])?: \*\*\* .*$", re.MULTILINE)


def first_error(output: str) -> str:
    """The compiler's first ``file:line: error:`` line, else make's first ``***`` line, else the last line."""
    for pattern in (_COMPILER_ERROR, _MAKE_ERROR):
        m = pattern.search(output)
        if m:
            return m.group(0).strip()
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _SCRUBBED_ENV and not k.startswith(("KBUILD_", "KCONFIG_"))}
    env["LC_ALL"] = "C"  # untranslated "error:" lines
    return env


def _run_logged(argv: Sequence[str], cwd: Path, log: Path, what: str) -> None:
    """Run ``argv`` with its output appended to ``log``; TreeBuildError (first error, log path) on failure."""
    with log.open("ab") as f:
        f.write(f"\n$ cd {shlex.quote(str(cwd))} && {shlex.join(argv)}\n".encode())
        f.flush()
        start = f.tell()
        try:  # a registered child in its own process group: make and its compilers end with the harness
            proc = process.spawn(list(argv), name=Path(argv[0]).name, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                 env=_env())
        except FileNotFoundError as exc:
            raise ToolMissing(f"{what}: {argv[0]} is not on PATH") from exc
        try:
            rc = proc.wait()
        finally:
            process.kill(proc)
    if rc != 0:
        with log.open("rb") as f:
            f.seek(start)
            output = f.read().decode(errors="replace")
        tail = "\n".join(output.rstrip().splitlines()[-15:])
        raise TreeBuildError(f"{what} failed (exit {rc}): {first_error(output)} (whole output: {log})\n"
                             f"--- output (tail) ---\n{tail}")


@contextmanager
def _locked(lock_path: Path, exclusive: bool) -> Iterator[float]:
    """Hold ``lock_path``'s flock; yields the seconds spent waiting for it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as f:
        t0 = time.monotonic()
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield time.monotonic() - t0
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _stamp_text(tree: KernelTree, config: BuildConfig) -> str:
    return json.dumps({"tree": str(tree.path), "version": tree.version, "page_size": config.page_size,
                       "compiler": config.compiler, "make_vars": config.make_vars()}, sort_keys=True) + "\n"


def build_objects(tree: KernelTree, config: BuildConfig, cache: Path | None = None, jobs: int = 2) -> BuiltObjects:
    """Configure and prepare the build directory (once), then have make bring both objects up to date."""
    if jobs < 1:
        raise InputError(f"--jobs: {jobs} is not a positive number of make jobs")
    check_tools(tree, config)
    build = build_dir_for(tree, config, cache)
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    make = ["make", "-C", str(tree.path), f"O={build}", *config.make_vars()]
    where = f"{tree.label} ({config.granule}, {config.compiler})"
    try:
        with _locked(build.parent / f"{build.name}.lock", exclusive=True) as waited:
            timings["lock"] = round(waited, 3)
            stamp = build / STAMP
            want = _stamp_text(tree, config)
            if not (stamp.is_file() and stamp.read_text() == want):
                if build.exists():
                    shutil.rmtree(build)  # a partial directory (killed run) or another configuration
                build.mkdir(parents=True)
                log = build / LOG
                t = time.monotonic()
                _run_logged([*make, "defconfig"], build, log, f"make defconfig for {where}")
                if config.page_size != 4096:
                    _run_logged(["bash", str(tree.path / "scripts" / "config"), "--file", str(build / ".config"),
                                 "-d", "ARM64_4K_PAGES", "-e", f"ARM64_{config.granule}_PAGES"], build, log,
                                f"scripts/config ({config.granule} pages) for {where}")
                    _run_logged([*make, "olddefconfig"], build, log, f"make olddefconfig for {where}")
                timings["defconfig"] = round(time.monotonic() - t, 3)
                _check_config(build, config, where, log)
                t = time.monotonic()
                _run_logged([*make, f"-j{jobs}", "prepare"], build, log, f"make prepare for {where}")
                timings["prepare"] = round(time.monotonic() - t, 3)
                tmp = stamp.with_name(STAMP + ".tmp")
                tmp.write_text(want)
                tmp.replace(stamp)
            log = build / LOG
            t = time.monotonic()
            _run_logged([*make, f"-j{jobs}", NVHE_TARGET, KERNEL_TARGET], build, log,
                        f"building pgtable.c's objects of {where}")
            timings["objects"] = round(time.monotonic() - t, 3)
            for rel in (NVHE_OBJ, KERNEL_OBJ):
                if not (build / rel).is_file():
                    raise TreeBuildError(f"make left no {build / rel} for {where} (whole output: {log})")
            nvhe_cmd = read_cmd(build, NVHE_TARGET)
            kernel_cmd = read_cmd(build, KERNEL_TARGET)
            cpucaps = read_cpucaps(build)
            kconfig = read_kconfig(build / ".config")
    except OSError as exc:
        raise MachineryError(f"building {where} in {build}: {exc}") from exc
    timings["total"] = round(time.monotonic() - t_start, 3)
    return BuiltObjects(tree=tree, config=config, build_dir=build, nvhe_obj=build / NVHE_OBJ,
                        kernel_obj=build / KERNEL_OBJ, nvhe_cmd=nvhe_cmd, kernel_cmd=kernel_cmd, cpucaps=cpucaps,
                        kconfig=kconfig, log=log, timings=timings)


def _check_config(build: Path, config: BuildConfig, where: str, log: Path) -> None:
    kconfig = read_kconfig(build / ".config")
    want = {f"CONFIG_ARM64_{config.granule}_PAGES": "y",
            "CONFIG_CC_IS_CLANG" if config.compiler == "clang" else "CONFIG_CC_IS_GCC": "y"}
    wrong = [f"{k}={kconfig.get(k, '(unset)')}" for k, v in want.items() if kconfig.get(k) != v]
    if wrong:
        raise TreeBuildError(f"configuring {where}: {build / '.config'} has {', '.join(wrong)} after defconfig "
                             f"(expected {', '.join(f'{k}={v}' for k, v in want.items())}; whole output: {log})")


# ----------------------------------------------------------------------------------------------------------
# What kbuild left

def _unmake(value: str) -> str:
    """Undo kbuild's escaping of a saved command for make (``$$`` -> ``$``, ``$(pound)`` -> ``#``)."""
    return value.replace("$(pound)", "#").replace("$$", "$")


def read_cmd(build: Path, target: str) -> list[str]:
    """kbuild's compiler argv for ``target`` (from ``.NAME.cmd`` beside the object: ``savedcmd_TARGET :=``
    in 6.12, ``cmd_TARGET :=`` in 6.1), without ``-Wp,-MMD,…``, ``-o OUT`` and the source file."""
    obj = Path(os.path.normpath(target))
    cmd_file = build / obj.parent / f".{obj.name}.cmd"
    try:
        text = cmd_file.read_text(errors="replace")
    except OSError as exc:
        raise TreeBuildError(f"kbuild left no readable {cmd_file} ({exc.strerror})") from exc
    m = re.search(rf"^(?:savedcmd|cmd)_{re.escape(target)} := (.*)$", text, re.MULTILINE)
    src_m = re.search(rf"^source_{re.escape(target)} := (.*)$", text, re.MULTILINE)
    if not m:
        raise TreeBuildError(f"{cmd_file}: no savedcmd_{target} (or cmd_{target}) line")
    lexer = shlex.shlex(_unmake(m.group(1)), posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    tokens: list[str] = []
    for tok in lexer:
        if tok and set(tok) <= set(";&|"):
            break  # a second command (kbuild's post-processing): not the compiler's
        tokens.append(tok)
    source = src_m.group(1).strip() if src_m else None
    argv: list[str] = []
    skip = False
    for tok in tokens:
        if skip:
            skip = False
        elif tok == "-o":
            skip = True
        elif tok.startswith(("-Wp,-MMD,", "-Wp,-MD,")) or tok == source or (
                not tok.startswith("-") and tok.endswith((".c", ".S")) and source is None):
            continue
        else:
            argv.append(tok)
    if not argv or "-c" not in argv:
        raise TreeBuildError(f"{cmd_file}: the saved command for {target} is not a compile (-c) command: "
                             f"{' '.join(tokens[:8])} ...")
    return argv


def read_cpucaps(build: Path) -> dict[str, int]:
    """Every ``#define ARM64_NAME N`` of the generated cpucap header (``ARM64_NCAPS`` left out)."""
    for rel in CPUCAP_HEADERS:
        path = build / rel
        if path.is_file():
            caps = {m.group(1): int(m.group(2)) for m in
                    re.finditer(r"^#define\s+ARM64_(\w+)\s+(\d+)\s*$", path.read_text(), re.MULTILINE)}
            caps.pop("NCAPS", None)
            return caps
    raise TreeBuildError(f"{build}: make prepare generated none of {', '.join(CPUCAP_HEADERS)}")


def read_kconfig(path: Path) -> dict[str, str]:
    """``CONFIG_NAME -> value`` of a .config (``is not set`` lines left out; string values unquoted)."""
    out: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        m = re.fullmatch(r"(CONFIG_\w+)=(.*)", line)
        if m:
            value = m.group(2)
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            out[m.group(1)] = value
    return out


def compile_c(objs: BuiltObjects, which: Literal["nvhe", "kernel"], src: Path, out: Path,
              extra: Sequence[str] = ()) -> None:
    """Compile a C file of ours with the exact command kbuild used for that object, from the build directory
    (its include paths are relative to it), plus ``extra`` (e.g. ``-D`` defines, ``-I`` dirs)."""
    if which not in ("nvhe", "kernel"):
        raise InputError(f"which: {which!r} is not 'nvhe' or 'kernel'")
    src, out = Path(src).absolute(), Path(out).absolute()
    if not src.is_file():
        raise InputError(f"src: {src} is not a file (expected a C source to compile)")
    argv = [*objs.cmd(which), *extra, "-o", str(out), str(src)]
    if shutil.which(argv[0]) is None:
        raise ToolMissing(f"compiling {src.name}: {argv[0]} (the compiler {objs.tree.label}'s build used) "
                          "is not on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(objs.build_dir.parent / f"{objs.build_dir.name}.lock", exclusive=False):
        _run_logged(argv, objs.build_dir, objs.log, f"compiling {src} like {objs.tree.label}'s {which} pgtable.o")


# ----------------------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.kernel.build",
                                     description="Build a Linux tree's arch/arm64/kvm/hyp/pgtable.c (nVHE and "
                                                 "kernel objects) out of tree, cached; print the result as JSON.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--tree", help="a Linux source tree (read only)")
    which.add_argument("--debian", choices=DEBIAN_SERIES, help="Debian's unpacked linux-source (ci/ksource.sh)")
    parser.add_argument("--granule", default="4K", help="page size: 4K, 16K or 64K (default 4K)")
    parser.add_argument("--cc", default="gcc", help="gcc or clang (default gcc)")
    parser.add_argument("--cache", type=Path, help=f"build cache base (default ${KBUILD_ENV}, else "
                                                   "$XDG_CACHE_HOME/pgtable-harness/kbuild)")
    parser.add_argument("-j", "--jobs", type=int, default=2, help="make jobs (default 2)")
    parser.add_argument("--debug", action="store_true", help="tracebacks on errors")
    args = parser.parse_args(argv)
    try:
        config = BuildConfig.parse(args.granule, args.cc)
        tree = locate_tree(debian_tree(args.debian) if args.debian else args.tree,
                           what=f"--debian {args.debian}" if args.debian else "--tree")
        tree.api.require_supported()
        objs = build_objects(tree, config, cache=args.cache, jobs=args.jobs)
    except HarnessError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    print(json.dumps(objs.as_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
