"""The VMM's initramfs (cpio newc, read back by a reader written here), its build, its records'
parser and KernelBoot's initrd arguments: no QEMU."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.errors import InputError
from harness.live import initramfs
from harness.live.initramfs import (
    HEADER_SIZE,
    S_IFCHR,
    S_IFDIR,
    S_IFREG,
    Entry,
    archive,
    char_device,
    directory,
    header,
    member,
    regular,
    vmm_entries,
    write_initramfs,
)
from harness.live.kernel import VMM_SETTLED, KernelBoot, KernelImage
from harness.live.vmm import (
    DirtyLog,
    Memslot,
    Mmio,
    PageRun,
    Phase,
    Ready,
    RecordError,
    VmmErrorRecord,
    VmmFailed,
    parse_line,
    parse_records,
    parse_report,
    records_text,
)
from harness.target.errors import ToolMissing

# -- a cpio newc reader, independent of the writer -------------------------------------------------


@dataclass
class Member:
    offset: int
    ino: int
    mode: int
    nlink: int
    mtime: int
    rdev: tuple[int, int]
    name: str
    data: bytes


def read_newc(blob: bytes) -> list[Member]:
    """Every member up to and including TRAILER!!!; asserts the format's rules on the way."""
    out: list[Member] = []
    off = 0
    while True:
        assert off % 4 == 0, f"member at {off:#x} not 4-aligned"
        head = blob[off:off + HEADER_SIZE]
        assert head[:6] == b"070701", f"bad magic at {off:#x}: {head[:6]!r}"
        f = [int(head[6 + 8 * i: 14 + 8 * i], 16) for i in range(13)]
        ino, mode, _uid, _gid, nlink, mtime, size, _dmaj, _dmin, rmaj, rmin, namesize, check = f
        assert check == 0
        name_at = off + HEADER_SIZE
        raw = blob[name_at:name_at + namesize]
        assert raw.endswith(b"\0") and b"\0" not in raw[:-1]
        data_at = name_at + namesize
        data_at += -data_at % 4
        assert blob[name_at + namesize:data_at] == b"\0" * (data_at - name_at - namesize)
        data = blob[data_at:data_at + size]
        assert len(data) == size
        out.append(Member(off, ino, mode, nlink, mtime, (rmaj, rmin), raw[:-1].decode(), data))
        off = data_at + size
        pad = -off % 4
        assert blob[off:off + pad] == b"\0" * pad
        off += pad
        if out[-1].name == "TRAILER!!!":
            assert off == len(blob), "bytes after the trailer"
            return out


def test_vmm_archive_round_trips() -> None:
    init = b"\x7fELF" + bytes(range(256)) * 3 + b"odd"
    members = read_newc(archive(vmm_entries(init)))
    by_name = {m.name: m for m in members}
    assert [m.name for m in members] == ["dev", "dev/console", "dev/kvm", "proc", "init", "TRAILER!!!"]
    assert by_name["init"].data == init
    assert by_name["init"].mode == S_IFREG | 0o755
    assert by_name["dev/console"].mode & 0o170000 == S_IFCHR and by_name["dev/console"].rdev == (5, 1)
    assert by_name["dev/kvm"].mode & 0o170000 == S_IFCHR and by_name["dev/kvm"].rdev == (10, 232)
    for d in ("dev", "proc"):
        assert by_name[d].mode == S_IFDIR | 0o755 and by_name[d].nlink == 2
    assert [m.ino for m in members[:-1]] == [1, 2, 3, 4, 5]  # distinct: the kernel links equal inodes
    assert all(m.mtime == 0 for m in members)
    assert members[-1].mode == 0 and members[-1].data == b"" and members[-1].nlink == 1


def test_archive_is_deterministic_and_the_writer_writes_it(tmp_path: Path) -> None:
    init = b"binary"
    path = write_initramfs(tmp_path / "sub" / "initramfs.cpio", init)
    assert path.read_bytes() == archive(vmm_entries(init)) == archive(vmm_entries(init))
    assert [p.name for p in path.parent.iterdir()] == ["initramfs.cpio"]  # no temp file left


@pytest.mark.parametrize("name_len", range(1, 9))
@pytest.mark.parametrize("data_len", [0, 1, 2, 3, 4, 5])
def test_padding_keeps_every_member_aligned(name_len: int, data_len: int) -> None:
    entries = [regular("n" * name_len, b"d" * data_len), regular("x", b"y")]
    blob = archive(entries)
    assert len(blob) % 4 == 0
    members = read_newc(blob)
    assert [m.data for m in members[:2]] == [b"d" * data_len, b"y"]
    assert len(member(entries[0], 1)) % 4 == 0


def test_header_fields() -> None:
    h = header(char_device("dev/kvm", 10, 232, 0o660), 7)
    assert len(h) == HEADER_SIZE
    fields = [h[6 + 8 * i: 14 + 8 * i].decode() for i in range(13)]
    assert fields[0] == "00000007" and int(fields[1], 16) == S_IFCHR | 0o660
    assert (int(fields[9], 16), int(fields[10], 16)) == (10, 232)
    assert int(fields[11], 16) == len("dev/kvm") + 1  # the name's size counts its NUL
    assert h[:6] == b"070701" and h.decode().isascii()


def test_bad_entries_refused() -> None:
    with pytest.raises(ValueError, match="relative path"):
        member(Entry("/init", S_IFREG | 0o755), 1)
    with pytest.raises(ValueError, match="relative path"):
        member(Entry("", S_IFREG), 1)
    with pytest.raises(ValueError, match="8 hex digits"):
        header(char_device("dev/big", 1 << 32, 0), 1)
    assert directory("dev").nlink == 2 and regular("f", b"").nlink == 1


def test_vmm_build_is_a_static_aarch64_executable_and_cached() -> None:
    try:
        binary = initramfs.build_vmm()
    except ToolMissing as exc:
        pytest.skip(str(exc))
    assert initramfs.build_vmm() == binary  # cached by the sources' hash
    elf = binary.read_bytes()
    assert elf[:4] == b"\x7fELF" and elf[4] == 2  # ELF64
    e_type, e_machine = struct.unpack_from("<HH", elf, 16)
    assert (e_type, e_machine) == (2, 183)  # ET_EXEC, EM_AARCH64
    phoff, = struct.unpack_from("<Q", elf, 32)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    types = [struct.unpack_from("<I", elf, phoff + i * phentsize)[0] for i in range(phnum)]
    assert 3 not in types and 2 not in types  # no PT_INTERP, no PT_DYNAMIC: static, no libc
    path = initramfs.vmm_initramfs()
    members = {m.name: m for m in read_newc(path.read_bytes())}
    assert members["init"].data == elf


# -- @@vmm records ---------------------------------------------------------------------------------

def _slot(op: str, slot: int, ipa: int, size: int, flags: int = 0) -> dict[str, Any]:
    return {"event": "memslot", "vm": 0, "op": op, "slot": slot, "ipa": hex(ipa), "size": hex(size),
            "uaddr": "0xffff80000000", "flags": flags, "advice": "hugepage"}


GOOD = [
    {"event": "start", "pattern": "dirty-log", "pid": 1},
    {"event": "vm", "vm": 0, "pid": 1, "ipa_limit": 52},
    _slot("create", 1, 0x4040_0000, 0x40_0000),
    _slot("create", 2, 0x4100_0000, 0x20_0000),
    _slot("create", 3, 0x4120_0000, 0x20_0000),
    {"event": "vcpu", "vm": 0, "target": 5, "pc": "0x40000000", "pstate": "0x3c5", "jobs": 11},
    {"event": "pages", "vm": 0, "phase": "touched", "slot": 1, "ipa": "0x40400000", "uaddr": "0xffff80000000",
     "count": 512, "pfn": "0x42e00", "present": True, "thp": True, "access": "rwx"},
    {"event": "pages", "vm": 0, "phase": "touched", "slot": 2, "ipa": "0x41000000", "uaddr": "0xffff90000000",
     "count": 1, "pfn": "0x0", "present": False, "thp": False, "access": "w"},
    {"event": "phase", "vm": 0, "name": "touched"},
    _slot("log", 1, 0x4040_0000, 0x40_0000, flags=1),
    _slot("delete", 2, 0x4100_0000, 0),
    _slot("move", 3, 0x4800_0000, 0x20_0000),
    {"event": "mmio", "vm": 0, "ipa": "0x41000000", "len": 8, "write": False, "data": "0x0"},
    {"event": "dirty", "vm": 0, "slot": 1, "ipa": "0x40400000", "pages": 1024,
     "bitmap": ["0x28", "0x1"] + ["0x0"] * 5 + ["0x8000000000000000"] + ["0x0"] * 8},
    {"event": "phase", "vm": 0, "name": "spinning"},
    {"event": "ready", "pattern": "dirty-log", "vms": 1},
]


def test_records_parse_among_kernel_messages() -> None:
    lines = records_text(GOOD).splitlines()
    text = "\r\n".join(["[    3.77] Run /init as init process", *lines[:3], "[    3.85] hrtimer: interrupt took 19 ns",
                        "[    3.90] random: crng init done " + lines[3], *lines[4:], ""])
    rep = parse_report(text.encode())
    assert len(rep.records) == len(GOOD)
    assert rep.start is not None and rep.start.pattern == "dirty-log"
    assert rep.ready == Ready("dirty-log", 1)
    assert rep.vms == [0] and rep.phases(0) == ["touched", "spinning"]
    run = rep.pages[0]
    assert run == PageRun(0, "touched", 1, 0x4040_0000, 0xFFFF_8000_0000, 512, 0x42E00, True, True, "rwx")
    assert run.pa == 0x42E0_0000 and run.size == 2 << 20
    assert list(run.pages())[1] == (0x4040_1000, 0x42E0_1000)
    assert rep.pages[1].pa == 0 and list(rep.pages[1].pages()) == [(0x4100_0000, 0)]
    assert rep.mmio == [Mmio(0, 0x4100_0000, 8, False, 0)]
    dirty = rep.dirty[0]
    assert isinstance(dirty, DirtyLog) and dirty.dirty_pages() == (3, 5, 64, 511)
    assert dirty.dirty_ipas()[0] == 0x4040_3000
    slots = rep.memslots()
    assert sorted(slots) == [(0, 1), (0, 3)]  # slot 2 deleted
    assert slots[(0, 1)].log_dirty and slots[(0, 3)].ipa == 0x4800_0000 and slots[(0, 3)].end == 0x4820_0000
    assert [m.op for m in rep.memslot_ops(0)] == ["create"] * 3 + ["log", "delete", "move"]
    assert set(rep.page_map(0)) > set(rep.page_map(0, live=True))
    assert 0x4100_0000 not in rep.page_map(0, live=True) and 0x4040_0000 in rep.page_map(0, live=True)
    assert rep.check() is rep


def test_error_record_and_check() -> None:
    rep = parse_report(records_text([GOOD[0], {"event": "error", "vm": 1, "what": "KVM_CREATE_VM", "errno": 22,
                                               "reason": "0x1c", "pattern": "bogus"}]), "serial.log")
    err = rep.errors[0]
    assert err == VmmErrorRecord(1, "KVM_CREATE_VM", 22, {"reason": 0x1C, "pattern": "bogus"})
    assert err.text() == "VM 1: KVM_CREATE_VM (errno 22, reason 0x1c, pattern bogus)"
    with pytest.raises(VmmFailed, match=r"the VMM reported: VM 1: KVM_CREATE_VM .*serial\.log"):
        rep.check()
    with pytest.raises(VmmFailed, match="never reported ready"):
        parse_report(records_text(GOOD[:-1])).check()
    bare = parse_line('@@vmm {"event":"error","what":"mount /proc","errno":1}')
    assert bare == VmmErrorRecord(None, "mount /proc", 1, {})


def test_lines_without_a_record() -> None:
    assert parse_line("[    1.0] kvm [1]: VHE mode initialized successfully") is None
    assert parse_records("no records\nat all\n") == []
    assert parse_line('x @@vmm {"event":"phase","vm":0,"name":"touched"}  ') == Phase(0, "touched")


@pytest.mark.parametrize(("line", "why"), [
    ('@@vmm {"event":"phase","vm":0,"name":"touched"', "not JSON"),
    ("@@vmm [1, 2]", "not a JSON object"),
    ('@@vmm {"event":"bogus"}', "event: expected one of start, vm"),
    ('@@vmm {"vm":0}', "event: expected one of"),
    ('@@vmm {"event":"phase","vm":0,"name":"touched","extra":1}', "unknown key 'extra' in a 'phase' record"),
    ('@@vmm {"event":"phase","vm":0}', "name: missing from a 'phase' record"),
    ('@@vmm {"event":"phase","vm":"0","name":"touched"}', 'vm: expected an integer, got "0"'),
    ('@@vmm {"event":"phase","vm":true,"name":"touched"}', "vm: expected an integer, got true"),
    ('@@vmm {"event":"mmio","vm":0,"ipa":1024,"len":8,"write":false,"data":"0x0"}',
     'ipa: expected a "0x..." hex string, got 1024'),
    ('@@vmm {"event":"mmio","vm":0,"ipa":"0xZZ","len":8,"write":false,"data":"0x0"}', "ipa: expected"),
    ('@@vmm {"event":"mmio","vm":0,"ipa":"0x10","len":8,"write":0,"data":"0x0"}', "write: expected true or false"),
    ('@@vmm {"event":"dirty","vm":0,"slot":1,"ipa":"0x0","pages":64,"bitmap":["0x1",2]}', r"bitmap\[1\]: expected"),
    ('@@vmm {"event":"error","what":"x"}', "errno: expected an integer, got null"),
])
def test_malformed_records_name_the_line(line: str, why: str) -> None:
    text = f"[ 0.1] boot\n{records_text(GOOD[:1])}{line}\n"
    with pytest.raises(RecordError, match=rf"^serial\.log:3: malformed @@vmm record: {why}") as info:
        parse_records(text, "serial.log")
    assert line.strip()[:20] in str(info.value)


def test_bad_field_values() -> None:
    bad_op = json.dumps(_slot("resize", 1, 0, 0), separators=(",", ":"))
    with pytest.raises(RecordError, match="op: expected one of create, log, delete, move"):
        parse_records("@@vmm " + bad_op)
    run = dict(GOOD[6], access="rq")
    with pytest.raises(RecordError, match="access: expected letters of 'rwx'"):
        parse_records(records_text([run]))
    assert isinstance(parse_records(records_text([GOOD[2]]))[0], Memslot)


# -- KernelBoot with an initrd ---------------------------------------------------------------------

def test_kernel_boot_initrd_arguments(tmp_path: Path) -> None:
    image = KernelImage(tmp_path / "vmlinuz-6.12", None, None)
    plain = KernelBoot(image, log_dir=tmp_path).args
    assert "-initrd" not in plain
    assert plain[plain.index("-append") + 1] == "console=ttyAMA0 kvm-arm.mode=nvhe panic=0"
    boot = KernelBoot(image, mode="vhe", initrd=tmp_path / "rd.cpio", guest="memslot", append="quiet",
                      log_dir=tmp_path)
    args = boot.args
    assert args[args.index("-initrd") + 1] == str(tmp_path / "rd.cpio")
    assert args[args.index("-append") + 1] == "console=ttyAMA0 panic=0 rdinit=/init vmm.guest=memslot quiet"
    assert boot.settle is VMM_SETTLED
    prot = KernelBoot(image, mode="protected", initrd=tmp_path / "rd.cpio", log_dir=tmp_path).args
    assert prot[prot.index("-append") + 1] == "console=ttyAMA0 kvm-arm.mode=protected panic=0 rdinit=/init"
    with pytest.raises(InputError, match=r"guest: .* without an initrd"):
        KernelBoot(image, guest="touch", log_dir=tmp_path)
    with pytest.raises(InputError, match="guest: expected a word"):
        KernelBoot(image, guest="two words", initrd=tmp_path / "rd.cpio", log_dir=tmp_path)
    with pytest.raises(InputError, match="mode: expected one of nvhe, protected, vhe"):
        KernelBoot(image, mode="nested", log_dir=tmp_path)


def test_vmm_settled_pattern() -> None:
    ready = b'x\r\n@@vmm {"event":"ready","pattern":"touch","vms":1}\r\n'
    m = VMM_SETTLED.search(ready)
    assert m is not None and m.group(0).startswith(b'@@vmm {"event":"ready"')
    assert VMM_SETTLED.search(ready[:-3]) is None  # a line still being written is not yet settled
    err = VMM_SETTLED.search(b'@@vmm {"event":"error","what":"open /dev/kvm","errno":2}\n')
    assert err is not None
    panic = VMM_SETTLED.search(b"[ 3.1] Kernel panic - not syncing: Attempted to kill init!\n")
    assert panic is not None and b"kill init" in panic.group(0)
    assert VMM_SETTLED.search(b'@@vmm {"event":"phase","vm":0,"name":"touched"}\n') is None
