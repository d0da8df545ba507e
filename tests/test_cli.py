"""The `harness` command line: arguments, errors, JSON, export; hardware-backed commands marked hw."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from harness.arch.geometry import Geometry
from harness.cli import main
from harness.core.batch import expected_par_batch, translate_batch
from harness.core.translate import READ
from harness.target.errors import QemuExited
from harness.target.target import Target


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["check", "--stage", "3", "--granule", "4K", "--ia-bits", "40"], "stage"),
        (["check", "--stage", "2", "--granule", "8K", "--ia-bits", "40"], "granule"),
        (["check", "--stage", "2", "--granule", "4K", "--ia-bits", "60"], "ia_bits"),
        (["check", "--stage", "2", "--granule", "4K"], "--ia-bits required"),
        (["check", "--stage", "2", "--granule", "4K", "--ia-bits", "40", "--map", "0x1000:4K"], "--map"),
        (["check", "--stage", "2", "--granule", "4K", "--ia-bits", "40", "--map", "0x1000:4K:0x50000000:rwz"],
         "prot"),
        (["check", "--stage", "2", "--granule", "4K", "--ia-bits", "40", "--map", "zz:4K:0:r"], "addr"),
        (["check", "--stage", "2", "--granule", "4K", "--ia-bits", "40", "--op", "explode:0x1000"], "op"),
        (["check", "--builtin", "nope"], "--builtin"),
        (["check", "--scenario", "/nonexistent.json"], "does not exist"),
        (["check", "--builtin", "s2-4K", "--stage", "1"], "one of"),
        (["run", "--only", "nope"], "--only"),
        (["geometry", "--stage", "7"], "--stage"),
        (["explain", "notanumber", "--builtin", "s2-4K"], "ADDRESS"),
    ],
)
def test_bad_arguments_exit_2_with_a_specific_message(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                     needle: str) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert needle in err, err


def test_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["run", "--frobnicate"])
    assert e.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_geometry_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "geometry", "--json")
    rows = json.loads(out)
    assert code == 0
    row = next(r for r in rows if r["stage"] == 2 and r["granule"] == "64K" and r["ia_bits"] == 40)
    assert (row["start_level"], row["pgd_pages"]) == (2, 1)
    row = next(r for r in rows if r["stage"] == 2 and r["granule"] == "4K" and r["ia_bits"] == 43)
    assert (row["start_level"], row["pgd_pages"]) == (1, 16)


def test_geometry_lpa2_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "geometry", "--stage", "2", "--lpa2", "--pa-bits", "52", "--json")
    rows = json.loads(out)
    assert code == 0 and {r["granule"] for r in rows} == {"4K", "16K"} and all(r["lpa2"] for r in rows)
    row = next(r for r in rows if r["granule"] == "4K" and r["ia_bits"] == 52)
    assert (row["start_level"], row["pgd_pages"], row["allowed_start_levels"]) == (0, 16, [-1, 0])


def test_scenario_file_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.toml"
    f.write_text('stage = 2\ngranule = "4K"\nia_bits = 40\nmaps = [{addr = "0x1000", size = "4K"}]\n')
    code, _, err = run_cli(capsys, "export", str(tmp_path / "out"), "--scenario", str(f))
    assert code == 2 and "maps[0].pa: required" in err
    f.write_text("{not json")
    f2 = tmp_path / "bad.json"
    f2.write_text("{not json")
    code, _, err = run_cli(capsys, "export", str(tmp_path / "out"), "--scenario", str(f2))
    assert code == 2 and "not valid JSON" in err


def test_export_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "sc.toml"
    f.write_text(
        'name = "demo"\nstage = 2\ngranule = "16K"\nia_bits = 40\npa_bits = 48\n'
        'maps = [{addr = "0x10000000", size = "64K", pa = "0x50000000", prot = "rw"},'
        ' {addr = "0x20000000", size = "32M", pa = "0x60000000", prot = "r"}]\n'
        'ops = [{op = "mkold", addr = "0x10004000"}]\n'
    )
    out_dir = tmp_path / "export"
    code, out, _ = run_cli(capsys, "export", str(out_dir), "--scenario", str(f), "--json")
    assert code == 0, out
    config = json.loads((out_dir / "config.json").read_text())
    expected = json.loads((out_dir / "expected.json").read_text())
    image = (out_dir / "tables.bin").read_bytes()
    assert config["schema"] == expected["schema"] == "pgtable-harness-export/1"
    assert (config["stage"], config["granule"], config["start_level"], config["pgd_pages"]) == (2, "16K", 2, 16)
    assert config["image"]["size"] == len(image)
    assert config["registers"]["vttbr_el2"] & ((1 << 48) - 1) == config["pgd"]
    assert {r["name"] for r in config["regions"]} == {"el1_stub"}
    # someone else's walker of the exported bytes gets the exported expectations
    geom = Geometry.create(2, "16K", 40, 48)
    words = np.frombuffer(image, dtype="<u8")
    addrs = np.array(expected["addresses"], dtype=np.uint64)
    pred = translate_batch(words, config["image"]["base"], geom, config["pgd"], addrs, READ)
    read = next(p for p in expected["probes"] if p["op"] == "S12E1R")
    assert [int(x) for x in expected_par_batch(pred, geom.stage)] == read["par"]
    i = expected["addresses"].index(next(a for a in expected["addresses"] if a >> 14 == 0x10004000 >> 14))
    assert read["fault"][i] == "access_flag" and read["fault_level"][i] == 3


def test_export_refuses_a_non_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x").write_text("keep me")
    code, _, err = run_cli(capsys, "export", str(tmp_path), "--builtin", "s2-64K")
    assert code == 2 and "not an empty directory" in err
    assert (tmp_path / "x").read_text() == "keep me"


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for line in ("0    every check matched", "1    a check found a mismatch", "2    bad arguments",
                 "3    the target or the machinery failed", "--debug"):
        assert line in out


def _failing_start(exc: BaseException) -> Callable[..., Target]:
    def start(*args: object, **kwargs: object) -> Target:
        log_dir = kwargs.get("log_dir")
        assert isinstance(log_dir, Path) and log_dir.is_dir()
        (log_dir / "console.log").write_text("booting\n")
        raise exc

    return start


def test_machinery_failure_is_exit_3_one_line_with_the_logs(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(Target, "start", _failing_start(QemuExited("boot", 1, "console tail", "stderr tail")))
    code, _, err = run_cli(capsys, "check", "--builtin", "s2-4K")
    assert code == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "QEMU exited with code 1" in lines[0] and "Traceback" not in err, err
    logs = Path(lines[0].split("(logs: ")[1].split(")")[0])
    try:
        assert (logs / "console.log").exists()  # kept after a failure
        assert "console tail" in (logs / "error.txt").read_text()  # the whole story
    finally:
        shutil.rmtree(logs)


def test_unexpected_exception_is_exit_3_traceback_only_with_debug(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(Target, "start", _failing_start(KeyError("surprise")))
    code, _, err = run_cli(capsys, "run", "--only", "s1-4K")
    assert code == 3 and "internal error: KeyError" in err and "Traceback" not in err
    logs = Path(err.split("(logs: ")[1].split(")")[0])
    shutil.rmtree(logs)
    code, _, err = run_cli(capsys, "run", "--only", "s1-4K", "--debug")
    assert code == 3 and "Traceback" in err and "KeyError" in err
    shutil.rmtree(Path(err.split("(logs: ")[1].split(")")[0]))


def test_user_log_dir_is_kept_and_created(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(Target, "start", _failing_start(QemuExited("boot", 1, "", "")))
    logs = tmp_path / "a" / "b"
    code, _, err = run_cli(capsys, "check", "--builtin", "s2-4K", "--log-dir", str(logs))
    assert code == 3 and str(logs) in err and (logs / "console.log").exists()


@pytest.mark.parametrize("interruption", [SystemExit(143), KeyboardInterrupt()])
def test_a_cleanup_failure_does_not_hide_the_signal(interruption: BaseException, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM's handler kills QEMU, then a `finally` that talks to QEMU fails: still terminated."""
    import harness.cli.geometry

    def run(args: object) -> int:
        try:
            raise interruption
        except BaseException:
            raise QemuExited("uninstall", -9, "", "") from None

    monkeypatch.setattr(harness.cli.geometry, "run", run)
    if isinstance(interruption, SystemExit):
        with pytest.raises(SystemExit) as e:
            main(["geometry"])
        assert e.value.code == 143
    else:
        assert main(["geometry"]) == 130
    assert "QEMU exited" not in capsys.readouterr().err


# -- hardware-backed ---------------------------------------------------------------------------

@pytest.mark.hw
def test_run_subset_json_as_a_process(tmp_path: Path) -> None:
    """The console script end to end: exit status 0 and every translation matched."""
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--only", "s1-64K", "--only", "s2-16K",
                           "--json", "--log-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] is True
    assert [r["scenario"] for r in data["reports"]] == ["s1-64K", "s2-16K"]
    assert all(r["checked"] == r["matched"] > 1000 for r in data["reports"])
    # each scenario's operations ran live: changed translations observed, none stale
    assert all(r["tlb"]["updates"] == 2 and r["tlb"]["checked"] > 0 and r["tlb"]["stale"] == 0
               and r["tlb"]["by_kind"] == {} for r in data["reports"][:1]), [r["tlb"] for r in data["reports"]]
    assert all(r["tlb"]["stale"] == 0 and r["tlb"]["updates"] > 0 for r in data["reports"])
    assert (tmp_path / "console.log").exists()


@pytest.mark.hw
def test_explain_and_dump(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "explain", "0x10008010", "--builtin", "s2-4K", "--json")
    assert code == 0
    res = json.loads(out)["results"]
    assert [r["op"] for r in res] == ["S12E1R", "S12E1W"] and all(r["agree"] for r in res)
    assert "PA 0x50008000" in res[0]["mmu"]
    code, out, _ = run_cli(capsys, "dump", "--builtin", "s1-4K", "--json")
    data = json.loads(out)
    assert code == 0 and data["only_in_model"] == [] and data["only_live"] == []
    assert any(r["va"] == 0x3_0000_0000 and r["AttrIndx"] == 1 for r in data["live"])  # the device mapping


@pytest.mark.hw
def test_check_inline_scenario_with_operations(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "check", "--stage", "2", "--granule", "64K", "--ia-bits", "40",
                           "--map", "0x10000000:1M:0x50000000:rw", "--op", "wrprotect:0x10000000:64K",
                           "--op", "mkold:0x10010000", "--access", "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"]
    rep = data["reports"][0]
    assert rep["probes"]["load"] > 0 and rep["withheld_from_at"]
    assert rep["tlb"]["updates"] == 2 and rep["tlb"]["checked"] > 0 and rep["tlb"]["stale"] == 0
    code, out, _ = run_cli(capsys, "check", "--stage", "2", "--granule", "64K", "--ia-bits", "40",
                           "--map", "0x10000000:1M:0x50000000:rw", "--op", "wrprotect:0x10000000:64K", "--no-live",
                           "--json")
    assert code == 0 and json.loads(out)["reports"][0]["tlb"]["updates"] == 0


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _exe_name(pid: int) -> str:
    """The executable's name of a process, or "" if it is gone (it may exit while we look)."""
    try:
        return Path(f"/proc/{pid}/exe").resolve(strict=True).name
    except OSError:
        return ""


@pytest.mark.hw
def test_ctrl_c_reaps_qemu_and_gdb(tmp_path: Path) -> None:
    """SIGINT in the middle of `harness bench`: exit status 130, no QEMU or gdb left behind."""
    import os

    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "bench", "--probes", "20000000",
                             "--log-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        kids: set[int] = set()
        console = tmp_path / "console.log"
        while time.monotonic() < deadline:
            kids = _descendants(proc.pid)
            names = {_exe_name(k) for k in kids}
            booted = console.exists() and "ready" in console.read_text(errors="replace")
            if booted and any("qemu" in n for n in names) and any("gdb" in n for n in names):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"harness bench did not boot QEMU and gdb within 60 s: children {kids}")
        time.sleep(0.5)  # into the benchmark proper
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    alive = [k for k in kids if Path(f"/proc/{k}").exists()]
    assert alive == [], f"left behind: {alive}"


def test_export_lpa2_and_e2h_say_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "sc.toml"
    f.write_text('stage = 1\ngranule = "16K"\nia_bits = 52\npa_bits = 52\nlpa2 = true\ne2h = true\n'
                 'maps = [{addr = "0x10000000", size = "64K", pa = "0x50000000"}]\n')
    code, _, err = run_cli(capsys, "export", str(tmp_path / "out"), "--scenario", str(f))
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["lpa2"], config["e2h"], config["start_level"]) == (True, True, 0)
    assert config["registers"]["hcr_el2_set"] != 0  # HCR_EL2.E2H for the payload to set


@pytest.mark.hw
@pytest.mark.parametrize("argv", [
    ["--stage", "2", "--granule", "4K", "--ia-bits", "52", "--pa-bits", "52", "--lpa2", "--start-level", "-1"],
    ["--stage", "1", "--granule", "16K", "--ia-bits", "52", "--pa-bits", "52", "--lpa2", "--e2h"],
])
def test_check_lpa2_and_hvhe_from_the_command_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "check", *argv, "--map", "0x10000000:1M:0x50000000:rw", "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"], err
    assert data["reports"][0]["checked"] > 0 and "lpa2" in data["reports"][0]["geometry"]


# -- issue 20: messages, consistency, Ctrl-C --------------------------------------------------------

def _one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("argv", "doubled"), [
    (["export", "/nonexistent/x", "--stage", "3", "--granule", "4K", "--ia-bits", "40"], "stage: stage:"),
    (["export", "/nonexistent/x", "--stage", "2", "--granule", "8K", "--ia-bits", "40"], "granule: granule:"),
    (["export", "/nonexistent/x", "--stage", "2", "--granule", "4K", "--ia-bits", "40",
      "--map", "0x1000:4K:0x50000000:rwz"], "prot: prot:"),
])
def test_no_doubled_key_prefix(argv: list[str], doubled: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and doubled not in _one_line(err), err


def test_argparse_errors_are_one_line_with_the_help_hint(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, needle in ((["check", "--frobnicate"], "unrecognized arguments: --frobnicate"),
                         (["fuzz", "--seed", "x"], "argument --seed"),
                         (["check", "--ia-bits"], "argument --ia-bits"),
                         (["chek"], "invalid choice")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        line = _one_line(capsys.readouterr().err)
        prog = "harness" if argv[0] == "chek" else f"harness {argv[0]}"
        assert e.value.code == 2 and line.startswith(f"{prog}: error: ") and needle in line, line
        assert line.endswith(f"({prog} --help)"), line


def test_numbers_read_alike_everywhere(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--ia-bits/--pa-bits/--start-level take hex as the other numbers do; counts take 1e6."""
    from harness.cli.app import parse

    code, _, err = run_cli(capsys, "export", str(tmp_path / "out"), "--stage", "2", "--granule", "4K",
                           "--ia-bits", "0x28", "--pa-bits", "0x28", "--start-level", "0x1",
                           "--map", "0x10000000:2M:0x50000000")
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["ia_bits"], config["pa_bits"], config["start_level"]) == (40, 40, 1)
    assert parse(["fuzz", "--probes", "1e6", "--per-table", "2.5e3"]).probes == 1_000_000
    assert parse(["fuzz", "--per-table", "2.5e3"]).per_table == 2500
    assert parse(["bench", "--probes", "1e6"]).probes == 1_000_000
    assert parse(["check", "--builtin", "s2-4K", "--sample", "1e3"]).sample == 1000
    assert parse(["run", "--seed", "0x10"]).seed == 16


def test_geometry_block_levels_are_reachable_from_the_start_level(capsys: pytest.CaptureFixture[str]) -> None:
    for extra in ([], ["--lpa2", "--pa-bits", "52"]):
        code, out, _ = run_cli(capsys, "geometry", "--json", *extra)
        rows = json.loads(out)
        assert code == 0 and all(min(r["block_levels"], default=3) >= r["start_level"] for r in rows)
    code, out, _ = run_cli(capsys, "geometry", "--json", "--stage", "2")
    row = next(r for r in json.loads(out) if r["granule"] == "4K" and r["ia_bits"] == 30)
    assert (row["start_level"], row["block_levels"]) == (2, [2])


def test_check_prints_the_per_probe_block_only_with_verbose(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import contextlib

    import harness.cli.check as check_cmd

    class Report:
        ok = True

        def text(self) -> str:
            return "PER-PROBE BLOCK"

    monkeypatch.setattr(check_cmd, "open_target", lambda args: contextlib.nullcontext(object()))
    monkeypatch.setattr(check_cmd.live, "check_scenario", lambda *a, **k: Report())
    monkeypatch.setattr(check_cmd, "print_reports", lambda *a, **k: print("SUMMARY"))
    code, out, _ = run_cli(capsys, "check", "--builtin", "s2-4K")
    assert code == 0 and out.split() == ["SUMMARY"], out
    code, out, _ = run_cli(capsys, "check", "--builtin", "s2-4K", "--verbose")
    assert code == 0 and out.splitlines() == ["SUMMARY", "PER-PROBE BLOCK"], out


@pytest.mark.parametrize("command", [["check", "--builtin", "s2-4K"], ["fuzz", "--probes", "10"]])
def test_machinery_errors_have_one_style(command: list[str], monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 3 says `harness CMD: error: ...` in every command, the install hint once."""
    from harness.target.errors import ToolMissing

    monkeypatch.setattr(Target, "start", _failing_start(ToolMissing("qemu is not on PATH (bash ci/setup.sh "
                                                                    "installs QEMU 10.0)")))
    code, _, err = run_cli(capsys, *command)
    line = _one_line(err)
    assert code == 3 and line.startswith(f"harness {command[0]}: error: qemu is not on PATH"), line
    assert line.count("ci/setup.sh") == 1 and "ToolMissing" not in line and "failed:" not in line, line
    shutil.rmtree(Path(line.split("(logs: ")[1].split(")")[0]))


def test_tool_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HARNESS_QEMU empty is named; a --version that cannot be read is quoted on one line; an exit
    status is never "None"."""
    from harness.target import qemu
    from harness.target.errors import QemuExited, ToolMissing

    monkeypatch.setenv("HARNESS_QEMU", "")
    with pytest.raises(ToolMissing, match="HARNESS_QEMU is set but empty"):
        qemu.qemu_version()
    fake = tmp_path / "fake-qemu"
    fake.write_text('#!/bin/sh\nprintf "bogus\\nCopyright (c) nobody\\n"\n')
    fake.chmod(0o755)
    with pytest.raises(ToolMissing) as e:
        qemu.qemu_version(str(fake))
    assert "\n" not in str(e.value) and "\\n" not in str(e.value) and "'bogus'" in str(e.value)
    assert "None" not in str(QemuExited("boot", None, "", "")).splitlines()[0]
    assert "killed by SIGKILL" in str(QemuExited("boot", -9, "", "")).splitlines()[0]


def test_a_scenario_name_is_shown_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "sc.toml"
    f.write_text('name = "two\\nlines\\u202e"\nstage = 2\ngranule = "4K"\nia_bits = 40\n'
                 'maps = [{addr = "0x10000000", size = "64K", pa = "0x50000000"}]\n')
    code, out, err = run_cli(capsys, "export", str(tmp_path / "out"), "--scenario", str(f))
    assert code == 0, err
    assert "two\\nlines\\u202e: stage 2" in out and "\u202e" not in out, out


def _stand_in_qemu(tmp_path: Path) -> dict[str, str]:
    """An environment whose QEMU is a stand-in that says it is 10.0.2 and never boots."""
    import os

    fake = tmp_path / "qemu"
    fake.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "QEMU emulator version 10.0.2"; exit 0; }\n'
                    "exec sleep 30\n")
    fake.chmod(0o755)
    return {**os.environ, "HARNESS_QEMU": str(fake)}


def _harness_argv() -> list[str]:
    """The console script next to this interpreter (what a user runs), else `python -m harness.cli`."""
    script = Path(sys.executable).with_name("harness")
    return [str(script)] if script.exists() else [sys.executable, "-m", "harness.cli"]


def _before_any_harness_code(returncode: int, err: str) -> bool:
    """The SIGINT came inside the interpreter's own start-up (site, .pth files) or its import of the
    package itself: no code of the harness ran yet, so the message is Python's."""
    import re

    import harness

    if (returncode == -signal.SIGINT and not err) or "init_import_site" in err:
        return True
    package = str(Path(harness.__file__).parent)
    return err.rstrip().endswith("KeyboardInterrupt") and not any(
        f.startswith(package) for f in re.findall(r'File "([^"]+)"', err))


SIGNAL_DELAYS = (0.05, 0.15, 0.3, 0.45, 0.6, 0.8)  # seconds after the start: imports, QEMU's start


def _signalled(command: list[str], log_dir: Path, env: dict[str, str], delay: float,
               signals: tuple[signal.Signals, ...]) -> tuple[subprocess.Popen[str], str]:
    """Run the harness on ``command``, send ``signals`` from ``delay`` seconds on (10 ms apart),
    and wait: the process and its stderr."""
    proc = subprocess.Popen([*_harness_argv(), *command, "--timeout", "20", "--log-dir", str(log_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        time.sleep(delay)
        for k, sig in enumerate(signals):
            time.sleep(0.01 if k else 0)
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, err


@pytest.mark.parametrize("command", [["run"], ["check", "--builtin", "s2-4K"]])
def test_ctrl_c_at_any_time_is_one_line_and_130(command: list[str], tmp_path: Path) -> None:
    """SIGINT while the modules import, while QEMU starts, and a second one during the clean-up:
    exit status 130, one line, never a traceback. QEMU is a stand-in that never boots. (A SIGINT
    inside the interpreter's own start-up, before any code of the harness runs, is Python's to
    report: a loaded machine can stretch that past the first delay.)"""
    env = _stand_in_qemu(tmp_path)
    for i, delay in enumerate(SIGNAL_DELAYS):
        # a second Ctrl-C, while the first one's clean-up runs
        proc, err = _signalled(command, tmp_path / str(i), env, delay, (signal.SIGINT, signal.SIGINT))
        if _before_any_harness_code(proc.returncode, err):
            continue
        line = _one_line(err)
        if "interrupted" in line:
            assert proc.returncode == 130, (delay, err)
        else:  # the stand-in was not reached (no firmware toolchain): still one line, no traceback
            assert proc.returncode in (2, 3), (delay, err)


@pytest.mark.parametrize("command", [["run"], ["check", "--builtin", "s2-4K"]])
def test_sigterm_at_any_time_is_one_line_and_143(command: list[str], tmp_path: Path) -> None:
    """SIGTERM while the modules import and while QEMU starts: exit status 143, one line saying so
    (the stand-in QEMU killed first), never a traceback. Before the interpreter runs any code of
    the harness, SIGTERM's default action kills it silently (-15: the shell's 143)."""
    env = _stand_in_qemu(tmp_path)
    for i, delay in enumerate(SIGNAL_DELAYS):
        proc, err = _signalled(command, tmp_path / str(i), env, delay, (signal.SIGTERM,))
        if proc.returncode == -signal.SIGTERM and not err:
            continue
        line = _one_line(err)
        if "terminated" in line:
            assert proc.returncode == 143 and line.startswith(f"harness {command[0]}: terminated by SIGTERM"), \
                (delay, err)
        else:  # the stand-in was not reached (no firmware toolchain): still one line, no traceback
            assert proc.returncode in (2, 3), (delay, err)


def test_a_signal_s_exit_status_is_said_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM/SIGHUP (SystemExit(128 + N) from their handler) in the middle of a command: the
    status kept, one line naming the signal and the kept logs."""
    monkeypatch.setattr(Target, "start", _failing_start(SystemExit(143)))
    with pytest.raises(SystemExit) as e:
        main(["check", "--builtin", "s2-4K"])
    assert e.value.code == 143
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("harness check: terminated by SIGTERM (logs: "), line
    shutil.rmtree(Path(line.split("(logs: ")[1].split(")")[0]))
    monkeypatch.setattr(Target, "start", _failing_start(SystemExit(129)))
    with pytest.raises(SystemExit):
        main(["check", "--builtin", "s2-4K"])
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("harness check: terminated by SIGHUP"), line
    shutil.rmtree(Path(line.split("(logs: ")[1].split(")")[0]))


@pytest.mark.parametrize("swallowed", ["SIGTERM", "SIGINT"])
def test_a_swallowed_signal_is_delivered_again(swallowed: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal's exception raised where Python swallows it (logging's at-fork callback, while QEMU
    is forked) is not lost: no "Exception ignored" traceback, the signal sent again."""
    import types

    from harness.cli import interrupt
    from harness.target.process import Terminated

    sent: list[int] = []
    shown: list[object] = []
    monkeypatch.setattr(interrupt.os, "kill", lambda pid, signum: sent.append(signum))
    monkeypatch.setattr(interrupt, "_next_unraisable_hook", shown.append)
    if swallowed == "SIGTERM":
        monkeypatch.setattr(interrupt, "_phase", interrupt.RUNNING)
        exc: BaseException = Terminated(signal.SIGTERM)
    else:
        monkeypatch.setattr(interrupt, "_phase", interrupt.INTERRUPTED)
        exc = KeyboardInterrupt()
    interrupt._on_unraisable(types.SimpleNamespace(exc_value=exc))  # type: ignore[arg-type]
    deadline = time.monotonic() + 5
    while not sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sent == [signal.Signals[swallowed]] and shown == []
    # once the command has ended, a swallowed SIGTERM is left alone (the exit is under way)
    sent.clear()
    monkeypatch.setattr(interrupt, "_phase", interrupt.DONE)
    interrupt._on_unraisable(types.SimpleNamespace(exc_value=Terminated(signal.SIGTERM)))  # type: ignore[arg-type]
    time.sleep(0.05)
    assert sent == [] and len(shown) == 1


def test_a_short_lived_tool_is_a_registered_child_and_reaped(tmp_path: Path) -> None:
    """process.run: the tool carries the owner tag (so it dies with the harness), its output comes
    back as text, and a timeout kills it (nothing left) and raises as subprocess.run does."""
    from harness.target import process

    done = process.run([sys.executable, "-c", f"import os; print(os.environ['{process.OWNER_ENV}'])"], name="probe")
    assert done.returncode == 0 and done.stdout.strip() == str(os.getpid())
    marker = tmp_path / "pid"
    with pytest.raises(subprocess.TimeoutExpired):
        process.run([sys.executable, "-c", f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); "
                     "time.sleep(60)"], name="sleeper", timeout=3.0)
    pid = int(marker.read_text())
    assert not Path(f"/proc/{pid}").exists() or process.process_state(pid) in (None, "Z")
    with pytest.raises(subprocess.CalledProcessError):
        process.run([sys.executable, "-c", "raise SystemExit(3)"], name="failing", check=True)
