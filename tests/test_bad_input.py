"""Bad input, argument by argument and key by key: exit 2, the argument or key named, no traceback,
and nothing booted (every error is found before QEMU would start)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.cli import main
from harness.core.memory import PagePool
from harness.core.pgtable import HypPgtable
from harness.core.prot import Prot
from harness.live.snapshot import from_tables
from harness.target.target import Target

S2 = ["--stage", "2", "--granule", "4K", "--ia-bits", "40"]
S1 = ["--stage", "1", "--granule", "4K", "--ia-bits", "40"]

# (argv, text stderr must contain)
ARGUMENTS: list[tuple[list[str], str]] = [
    (["run", "--seed", "-5"], "--seed"),
    (["run", "--seed", "x"], "--seed"),
    (["run", "--timeout", "nan"], "--timeout"),
    (["run", "--timeout", "inf"], "--timeout"),
    (["run", "--timeout", "0"], "--timeout"),
    (["run", "--timeout", "-1"], "--timeout"),
    (["run", "--timeout", "soon"], "--timeout"),
    (["run", "--only", "nope"], "--only"),
    (["run", "--report", "/nonexistent-dir/report.txt"], "--report"),
    (["check", "--builtin", "s2-4K", "--timeout", "nan"], "--timeout"),
    (["check", "--builtin", "s2-4K", "--seed", "-5"], "--seed"),
    (["check", "--builtin", "s2-4K", "--sample", "0"], "--sample"),
    (["check", "--builtin", "s2-4K", "--sample", "-3"], "--sample"),
    (["check", "--builtin", "nope"], "--builtin"),
    (["check", "--builtin", "s2-4K", *S2], "one of"),
    (["check", "--scenario", "/nonexistent.toml"], "scenario file"),
    (["check", "--stage", "3", "--granule", "4K", "--ia-bits", "40"], "stage"),
    (["check", "--stage", "2", "--granule", "8K", "--ia-bits", "40"], "granule"),
    (["check", "--stage", "2", "--granule", "4K"], "--ia-bits"),
    (["check", "--stage", "2", "--granule", "4K", "--ia-bits", "60"], "ia_bits"),
    (["check", "--stage", "2", "--granule", "4K", "--ia-bits", "20"], "ia_bits"),
    (["check", "--stage", "2", "--granule", "4K", "--ia-bits", "forty"], "--ia-bits"),
    (["check", "--stage", "1", "--granule", "4K", "--ia-bits", "30"], "ia_bits"),
    (["check", *S2, "--pa-bits", "99"], "pa_bits"),
    (["check", *S2, "--start-level", "7"], "start_level"),
    (["check", *S2, "--map", "0x1000:4K"], "--map"),
    (["check", *S2, "--map", "0x1000:4K:0x50000000:rwz"], "prot"),
    (["check", *S2, "--map", "zz:4K:0x50000000:r"], "addr"),
    (["check", *S2, "--map", "0x10000000:0:0x50000000"], "size"),
    (["check", *S2, "--map", "0x10000000:4Q:0x50000000"], "size"),
    (["check", *S2, "--map", "0x10000000:4K:-0x1000"], "pa"),
    (["check", *S2, "--map", "0x10000000000:4K:0x50000000"], "maps[0]"),
    (["check", *S2, "--map", "0x10000000:100:0x50000000"], "maps[0]"),
    (["check", *S2, "--access", "--map", "0x40280000:64K:0x50000000:rw"], "el1_stub"),
    (["check", *S1, "--map", "0x40200000:4K:0x50000000:rw"], "code"),
    (["check", *S2, "--op", "explode:0x1000"], "op"),
    (["check", *S2, "--op", "wrprotect"], "--op"),
    (["check", *S1, "--map", "0x10000000:4K:0x50000000", "--op", "wrprotect:0x10000000:4K"], "ops[0]"),
    (["check", *S2, "--e2h"], "e2h"),
    (["check", "--stage", "2", "--granule", "64K", "--ia-bits", "40", "--lpa2"], "lpa2"),
    (["explain", "0x10000000000000000", "--builtin", "s2-4K"], "ADDRESS"),
    (["explain", "18446744073709551616", "--builtin", "s2-4K"], "ADDRESS"),
    (["explain", "-1", "--builtin", "s2-4K"], "ADDRESS"),
    (["explain", "notanumber", "--builtin", "s2-4K"], "ADDRESS"),
    (["explain", "0x1000", "--builtin", "s2-4K", "--timeout", "0"], "--timeout"),
    (["dump", "--builtin", "s2-4K", "--timeout", "inf"], "--timeout"),
    (["dump", "--builtin", "nope"], "--builtin"),
    (["bench", "--probes", "10"], "--probes"),
    (["bench", "--probes", "-1"], "--probes"),
    (["bench", "--seed", "-5"], "--seed"),
    (["review", "--timeout", "nan"], "--timeout"),
    (["geometry", "--pa-bits", "99"], "--pa-bits"),
    (["geometry", "--pa-bits", "47"], "--pa-bits"),
    (["geometry", "--stage", "7"], "--stage"),
    (["export", "/nonexistent-dir/sub/out", "--builtin", "s2-4K", "--seed", "-1"], "--seed"),
    # issue 20: numbers in other scripts' digits (int() takes them), too long, or in the wrong form
    (["check", "--stage", "2", "--granule", "4K", "--ia-bits", "４０"], "--ia-bits"),
    (["check", *S2, "--map", "０x10000000:4K:0x50000000"], "maps[0].addr"),
    (["check", *S2, "--map", "0x10000000:４K:0x50000000"], "maps[0].size"),
    (["check", "--builtin", "s2-4K", "--sample", "１２３"], "--sample"),
    (["check", "--builtin", "s2-4K", "--timeout", "１"], "--timeout"),
    (["explain", "０x10000000", "--builtin", "s2-4K"], "ADDRESS"),
    (["explain", "1" * 5000, "--builtin", "s2-4K"], "ADDRESS"),
    (["run", "--seed", "1" * 5000], "--seed"),
    (["fuzz", "--seed", "x"], "--seed"),
    (["fuzz", "--probes", "1.5e0"], "--probes"),
    (["fuzz", "--probes", "0"], "--probes"),
    (["fuzz", "--granule", "8K"], "granule"),
    (["fuzz", "--timeout", "nan"], "--timeout"),
    # an empty PROT is not "no permissions"
    (["check", *S2, "--map", "0x10000000:4K:0x50000000:"], "--map"),
    (["check", *S2, "--map", "0x10000000:4K:0x50000000", "--op", "wrprotect:0x10000000:4K:"], "--op"),
    # sizes past the real bound say so
    (["check", *S2, "--map", "0x10000000:0x10000000000000000:0x50000000"], "below 2^64"),
    # counts that would allocate hundreds of GiB: refused with the bound and its reason
    (["fuzz", "--per-table", "100000000000"], "--per-table: expected at most 33554432"),
    (["check", "--builtin", "s2-4K", "--sample", "1e12"], "--sample: expected at most"),
    (["bench", "--probes", "1e11"], "--probes: expected at most"),
    (["kernel-pgtable", "--debian", "6.12", "--ops", "1e12"], "--ops: expected at most"),
    (["kernel-pgtable", "--debian", "6.12", "--ops", "1000", "--sequences", "10000"], "--ops, --sequences"),
    # unwritable or unnamed output paths, found before anything boots
    (["run", "--report", "/proc/x"], "--report"),
    (["run", "--log-dir", "/proc/x"], "--log-dir"),
    (["check", "--builtin", "s2-4K", "--report", "/proc/x"], "--report"),
    (["check", "--builtin", "s2-4K", "--log-dir", ""], "--log-dir"),
    (["explain", "0x1000", "--builtin", "s2-4K", "--log-dir", "/proc/x"], "--log-dir"),
    (["dump", "--builtin", "s2-4K", "--log-dir", "/proc/x/y"], "--log-dir"),
    (["review", "--log-dir", "/proc/x"], "--log-dir"),
    (["bench", "--log-dir", "/proc/x"], "--log-dir"),
    (["fuzz", "--report", "/proc/x"], "--report"),
    (["fuzz", "--report", "/"], "--report"),
    (["fuzz", "--report", ""], "--report"),
    (["fuzz", "--log-dir", "/proc/x"], "--log-dir"),
    (["kernel-pgtable", "--debian", "6.12", "--log-dir", "/proc/x"], "--log-dir"),
    (["fuzz", "--jobs", "0"], "--jobs: expected an integer >= 1"),
    (["fuzz", "--jobs", "65"], "--jobs: expected at most 64 jobs"),
    (["fuzz", "--jobs", "two"], "--jobs"),
    (["kernel-pgtable", "--debian", "6.12", "--jobs", "0"], "--jobs: expected an integer >= 1"),
    (["kernel-pgtable", "--debian", "6.12", "--jobs", "1e3"], "--jobs: expected at most 64 jobs"),
    (["export", "/proc/x", "--builtin", "s2-4K"], "DIRECTORY"),
    (["export", "", "--builtin", "s2-4K"], "DIRECTORY"),
    # attach: every option before the target is touched (here a snapshot path that does not exist)
    (["attach", "/nonexistent.json", "--save", "/proc/x"], "--save"),
    (["attach", "/nonexistent.json", "--save", "/"], "--save: / is a directory"),
    (["attach", "/nonexistent.json", "--save", ""], "--save"),
    (["attach", "/nonexistent.json", "--verify", "--log-dir", "/proc/x"], "--log-dir"),
    (["attach", "/nonexistent.json", "--verify", "--seed", "-1"], "--seed"),
    (["attach", "/nonexistent.json", "--verify", "--seed", "１"], "--seed"),
    (["attach", "/nonexistent.json", "--verify", "--samples", "1e11"], "--samples: expected at most 100000"),
    (["attach", "/nonexistent.json", "--verify", "--samples", "１２３"], "--samples"),
    (["attach", "/nonexistent.json", "--verify", "--samples", "-1"], "--samples"),
    (["attach", "/nonexistent.json", "--timeout", "１"], "--timeout"),
    (["attach", "/nonexistent.json", "--timeout", "nan"], "--timeout"),
    (["attach", "/nonexistent.json", "--timeout", "0"], "--timeout"),
    (["attach", "/nonexistent.json", "--cpu", "１"], "--cpu"),
    (["attach", "/nonexistent.json", "--range", "5:1"], "--range"),
    (["attach", "/nonexistent.json", "--range", "０:0x1000"], "--range"),
    (["attach", "/nonexistent.json", "--perm", "z"], "--perm"),
    (["attach", "/nonexistent.json", "--explain", "０x1000"], "--explain"),
    (["attach", "/nonexistent.json", "--regime", "nope"], "--regime"),
    (["attach", "/nonexistent.json", "--vmm", "/nonexistent.log"], "--vmm"),
    (["attach", "/nonexistent.json"], "TARGET"),
    (["attach", "127.0.0.1:99999"], "TARGET"),
    (["attach"], "TARGET"),
    # boot: the socket, the kernel and the numbers before a kernel boots
    (["boot", "--gdb", ""], "--gdb"),
    (["boot", "--gdb", "/proc/k.sock"], "--gdb"),
    (["boot", "--gdb", "/nonexistent-dir/k.sock"], "--gdb"),
    (["boot", "--gdb", "/"], "--gdb"),
    (["boot", "--gdb", "/tmp/" + "x" * 120], "--gdb"),
    (["boot", "--gdb", "/tmp/k.sock", "--smp", "9"], "--smp"),
    (["boot", "--gdb", "/tmp/k.sock", "--smp", "１"], "--smp"),
    (["boot", "--gdb", "/tmp/k.sock", "--timeout", "nan"], "--timeout"),
    (["boot", "--gdb", "/tmp/k.sock", "--log-dir", "/proc/x"], "--log-dir"),
    (["boot", "/nonexistent", "--gdb", "/tmp/k.sock"], "KERNEL"),
    (["boot", "--gdb", "/tmp/k.sock", "--guest", "two-vms"], "--smp"),
    (["boot"], "--gdb"),
]

# (file name, contents, text stderr must contain): one scenario per file, checked with `harness check`
FILES: list[tuple[str, str | bytes, str]] = [
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\naccess = "no"\n', "access"),
    ("a.json", '{"stage": 2, "granule": "4K", "ia_bits": 40, "access": 1}', "access"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\nmaps = 5\n', "maps"),
    ("a.json", '{"stage": 2, "granule": "4K", "ia_bits": 40, "maps": null}', "maps"),
    ("a.json", '{"stage": 2, "granule": "4K", "ia_bits": 40, "ops": "unmap"}', "ops"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\nsample = -1\n', "sample"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\nsample = 0\n', "sample"),
    ("a.json", '{"stage": 2, "granule": "4K", "ia_bits": 40, "sample": 1.5}', "sample"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\ncolour = "red"\n', "colour"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\nmaps = [{addr = 0, size = "4K", pa = 0, colour = 1}]\n',
     "maps[0].colour"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\nmaps = [{addr = "0x1000", size = "4K"}]\n', "maps[0].pa"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\nmaps = [{addr = 0, size = "4Q", pa = 0}]\n',
     "maps[0].size"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\nmaps = [{addr = 0, size = true, pa = 0}]\n',
     "maps[0].size"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\nmaps = [{addr = -4096, size = "4K", pa = 0}]\n',
     "maps[0].addr"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\nmaps = [{addr = 0, size = "4K", pa = 0, prot = 7}]\n',
     "maps[0].prot"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\nmaps = ["0x1000"]\n', "maps[0]"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\nops = [{op = "explode", addr = 0}]\n', "ops[0].op"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\nops = [{op = "mkold"}]\n', "ops[0].addr"),
    ("a.toml", 'stage = true\ngranule = "4K"\nia_bits = 40\n', "stage"),
    ("a.toml", 'granule = "4K"\nia_bits = 40\n', "stage"),
    ("a.toml", 'stage = 2\ngranule = "8K"\nia_bits = 40\n', "granule"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = "forty"\n', "ia_bits"),
    ("a.json", '{"stage": 2, "granule": "4K", "ia_bits": 40.5}', "ia_bits"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\npa_bits = 45\n', "pa_bits"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\nstart_level = "1"\n', "start_level"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\nlpa2 = "yes"\n', "lpa2"),
    ("a.json", '{"stage": 1, "granule": "4K", "ia_bits": 40, "e2h": 1}', "e2h"),
    ("a.json", '{"name": 5, "stage": 2, "granule": "4K", "ia_bits": 40}', "name"),
    ("a.toml", b'name = "caf\xe9"\nstage = 2\ngranule = "4K"\nia_bits = 40\n', "UTF-8"),
    ("a.toml", "stage = = 2\n", "TOML"),
    ("a.json", "{not json", "JSON"),
    ("a.json", "[]", "scenario file"),
    ("a.json", "5", "scenario file"),
    ("a.json", '["x"]', "[0]"),
    ("a.json", json.dumps([{"stage": 2, "granule": "4K", "ia_bits": 40}] * 2), "--scenario"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\naccess = true\n'
               'maps = [{addr = "0x40280000", size = "64K", pa = "0x50000000"}]\n', "el1_stub"),
    ("a.toml", 'stage = 1\ngranule = "4K"\nia_bits = 40\n'
               'maps = [{addr = "0x10000000", size = "4K", pa = "0x50000000"}]\n'
               'ops = [{op = "mkold", addr = "0x10000000"}]\n', "ops[0]"),
    # issue 20: past Python's int digit limit, nested 100,000 deep, duplicate keys, other scripts' digits
    ("a.json", '{"stage": 2, "granule": "4K", "ia_bits": 40, "maps": [{"addr": %s, "size": 4096, "pa": 0}]}'
     % ("1" * 5000), "maps[0].addr"),
    ("a.json", '{"stage": 2, "granule": "4K", "ia_bits": 40, "sample": %s}' % ("9" * 100), "sample"),
    ("a.json", '{"name": %s, "stage": 2, "granule": "4K", "ia_bits": 40}' % ("1" * 5000), "name"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\nsample = %s\n' % ("1" * 5000), "sample"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = %s\n' % ("1" * 200), "ia_bits"),
    ("a.json", '{"stage": 2, "granule": "4K", "ia_bits": 40, "maps": %s}' % ("[" * 100_000 + "]" * 100_000),
     "nested"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\nmaps = %s\n' % ("[" * 100_000 + "]" * 100_000), "nested"),
    ("a.json", '{"stage": 2, "granule": "4K", "ia_bits": 40, "maps": %s}' % ("[" * 20 + "]" * 20), "maps[0]"),
    ("a.json", '{"stage": 2, "granule": "4K", "ia_bits": 40, "stage": 1}', "'stage' given twice"),
    ("a.json", '{"stage": 2, "granule": "4K", "ia_bits": 40, "maps": [{"addr": 0, "addr": 4096, "size": 4096, '
               '"pa": 0}]}', "'addr' given twice"),
    ("a.json", '{"stage": 2, "granule": "4K", "ia_bits": 40, "maps": [{"addr": "０x10000000", "size": 4096, '
               '"pa": "0x50000000"}]}', "maps[0].addr"),
    ("a.json", '{"stage": 2, "granule": "4K", "ia_bits": 40, "sample": "１２３"}', "sample"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = "４０"\n', "ia_bits"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\nmaps = [{addr = "0x10000000", size = "1e400", '
               'pa = "0x50000000"}]\n', "maps[0].size"),
    ("a.toml", 'stage = 2\ngranule = "4K"\nia_bits = 40\nsample = "4e7"\n', "sample"),
    # a name with a newline or a bidi override is shown escaped, on the one line
    ("a.json", '{"name": "evil\\nharness check: ok\\u202e", "stage": 2, "granule": "4K", "ia_bits": 40, '
               '"access": "x"}', "evil\\nharness check: ok\\u202e: access"),
]




def _drop_page(text: str, root: bool) -> str:
    """The snapshot without its root table page (``root``) or without its last table page."""
    obj = json.loads(text)
    ttbr = int(obj["cpus"][0]["registers"]["TTBR0_EL2"], 16) & ~0xFFF
    drop = f"{ttbr:#x}" if root else max((k for k in obj["pages"] if int(k, 16) != ttbr), key=lambda k: int(k, 16))
    del obj["pages"][drop]
    return json.dumps(obj)


def _with_key(text: str, key_and_value: str) -> str:
    """The snapshot's top-level object with one more member, written as text (any depth)."""
    return text.rstrip()[:-1].rstrip() + ", " + key_and_value + "}"


# (what, the snapshot's text -> the file's contents, text stderr must contain): `harness attach FILE`
# (and with --verify, which must not boot either)
SNAPSHOTS: list[tuple[str, Callable[[str], str | bytes], str]] = [
    ("binary", lambda t: bytes(range(256)), "not UTF-8"),
    ("latin-1", lambda t: b'{"format": "\xff"}', "not UTF-8"),
    ("not JSON", lambda t: t[: len(t) // 2], "not JSON"),
    ("empty", lambda t: "", "not JSON"),
    ("a list", lambda t: "[]", "expected a JSON object"),
    ("nested 100,000 deep", lambda t: _with_key(t, '"notes2": ' + "[" * 100_000 + "]" * 100_000), "nested too deeply"),
    ("nested 20 deep", lambda t: _with_key(t, '"notes2": ' + "[" * 20 + "]" * 20), "nested too deeply"),
    ("duplicate key", lambda t: _with_key(t, '"format": "x"'), "'format' given twice"),
    ("5000-digit cpu", lambda t: t.replace('"cpu": 0', '"cpu": ' + "1" * 5000, 1), "cpus[0].cpu"),
    ("5000-digit version", lambda t: t.replace('"version": 2', '"version": ' + "9" * 5000, 1), "version"),
    ("no root page", lambda t: _drop_page(t, root=True), "no page 0x"),
    ("no table page", lambda t: _drop_page(t, root=False), "no page 0x"),
    ("a newline and a bidi override in a value", lambda t: t.replace('"TTBR0_EL2": "', '"TTBR0_EL2": "\\n\u202e', 1),
     "TTBR0_EL2"),
]


@pytest.fixture(autouse=True)
def _nothing_boots(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> Target:
        raise AssertionError("bad input must be refused before QEMU starts")

    monkeypatch.setattr(Target, "start", refuse)
    monkeypatch.setattr("harness.cli.boot.start_vmm", refuse)  # harness boot's kernel


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors (types, unknown options)
        code = e.code if isinstance(e.code, int) else 2
    return code, capsys.readouterr().err


def _assert_refused(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    assert needle in err, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness") and ": error: " in lines[0], err
    assert len(lines[0]) < 400, err  # a value is quoted, not pasted whole


@pytest.mark.parametrize(("argv", "needle"), ARGUMENTS, ids=[" ".join(a) for a, _ in ARGUMENTS])
def test_bad_argument(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    _assert_refused(*_run(argv, capsys), needle)


@pytest.mark.parametrize(("name", "text", "needle"), FILES, ids=[f"{n}:{i}" for i, (n, _, _) in enumerate(FILES)])
def test_bad_scenario_file(name: str, text: str | bytes, needle: str, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / name
    if isinstance(text, bytes):
        f.write_bytes(text)
    else:
        f.write_text(text)
    _assert_refused(*_run(["check", "--scenario", str(f)], capsys), needle)


@pytest.mark.parametrize(("what", "edit", "needle"), SNAPSHOTS, ids=[w for w, _, _ in SNAPSHOTS])
@pytest.mark.parametrize("verify", [[], ["--verify"]], ids=["decode", "verify"])
def test_bad_snapshot_file(what: str, edit: Callable[[str], str | bytes], needle: str, verify: list[str],
                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = HypPgtable(PagePool(0x4800_0000, 256 * 4096, 4096), "4K", 48, 48)
    t.map(0x4000_0000, 4 * 4096, 0x5000_0000, Prot.RW)
    t.map(0x8000_0000, 2 << 20, 0x6000_0000, Prot.RX)
    good = tmp_path / "good.json"
    from_tables(t).save(good)
    contents = edit(good.read_text())
    f = tmp_path / "bad.json"
    if isinstance(contents, bytes):
        f.write_bytes(contents)
    else:
        f.write_text(contents)
    _assert_refused(*_run(["attach", str(f), *verify], capsys), needle)


def test_paths_are_checked_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    for argv, needle in (
        (["run", "--report", str(tmp_path)], "--report"),
        (["check", "--builtin", "s2-4K", "--log-dir", str(a_file)], "--log-dir"),
        (["export", str(full), "--builtin", "s2-4K"], "DIRECTORY"),
        (["export", str(a_file), "--builtin", "s2-4K"], "DIRECTORY"),
    ):
        _assert_refused(*_run(argv, capsys), needle)


def test_a_failed_export_leaves_no_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _assert_refused(*_run(["export", str(out), *S2, "--map", "0x10000000:100:0x50000000"], capsys), "maps[0]")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_size_suffixes_are_case_insensitive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "ok.toml"
    f.write_text('stage = 2\ngranule = "4K"\nia_bits = 40\n'
                 'maps = [{addr = "0x10000000", size = "64k", pa = "0x50000000"},'
                 ' {addr = "0x20000000", size = "2m", pa = "0x60000000"}]\n')
    code, err = _run(["export", str(tmp_path / "out"), "--scenario", str(f)], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert [m["size"] for m in config["maps"]] == [64 << 10, 2 << 20]


def test_at_least_sixty_bad_inputs() -> None:
    assert len(ARGUMENTS) + len(FILES) + len(SNAPSHOTS) >= 60


def test_an_export_that_fails_while_writing_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    def full_disk(self: Path, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    code, err = _run(["export", str(tmp_path / "new" / "deeper" / "out"), "--builtin", "s2-4K"], capsys)
    assert code == 3 and "No space left on device" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []
