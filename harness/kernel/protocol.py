"""The host <-> kernel-walker payload protocol, defined once: the C header ``gen/kpgt.h`` is
generated from this module.

The kernel-walker payload is the harness firmware (its request loop, regimes and probes) linked
with a tree's ``pgtable.c`` objects and a host of ours (``firmware/kpgt/``). One more mailbox
command, ``CMD_KPGT`` (:data:`CMD_KPGT`), runs one operation: ``arg0`` the :class:`Op`, ``arg1..``
its arguments (listed per op below); ``ret0`` is the C function's return value (an int or u64 as
two's complement), ``ret1`` a second result (the PGD's physical address after an init, the entry
after ``get_leaf``/``mkyoung``). ``arg7`` picks the object that runs it (:class:`Build`).

Everything else the host records lives in the state block at ``Layout.kpgt`` (:data:`STATE`):
the page pool's reference counts (one u32 per pool page of the tree's PAGE_SIZE), a log of every
callback the C code made (cache maintenance, stage-2 TLB invalidation, page allocation and
release, and the hyp code's own inline TLBIs, trapped: :data:`EVENT` records, :class:`EventKind`),
the WARNs it hit (:data:`WARN`), and the exception that ended an operation, if one did
(``fault_*``).

Ops and arguments:

* INIT_HYP: arg1 va_bits. INIT_S2: arg1 phys_shift (IPA bits), arg2 ID_AA64MMFR0_EL1 to hand
  ``kvm_get_vtcr`` (0: the CPU's), arg3 stage-2 flags; ret1 = the PGD's PA, state ``vtcr``.
* HYP_MAP: addr, size, phys, prot. HYP_UNMAP: addr, size (ret0 = bytes unmapped).
* S2_MAP: addr, size, phys, prot, walk flags. S2_UNMAP, S2_WRPROTECT, S2_FLUSH: addr, size.
* S2_MKYOUNG: addr (ret0 = 0, ret1 = the new entry, as 6.12 returns it). S2_TEST_CLEAR_YOUNG:
  addr, size, mkold (6.12). S2_MKOLD: addr (6.1: ret1 = the old entry).
* S2_RELAX_PERMS: addr, prot. S2_SPLIT: addr, size (6.12).
* GET_LEAF: addr (ret1 = entry, state ``leaf_level``). DESTROY: none (either stage).
* ENTER: none. The host runs the C code on its own EL2 stage 1 and, between requests, turns it off,
  unless a stage 2 is installed (HCR_EL2.VM): then its EL2 map stays on after the operation, and
  an operation that finds it on does not write SCTLR_EL2 (QEMU drops its whole TLB on an SCTLR
  write, which would hide a stale stage-2 entry). ENTER turns it on before the warm loads of a
  live check; UNINSTALL (or any install) turns it off.
"""

from __future__ import annotations

import enum

from harness.target.mailbox import Cmd, Record

CMD_KPGT = Cmd.KPGT
MAGIC = 0x4B50_4754_484F_5354  # "KPGTHOST"
VERSION = 2  # 2: hyp TLBIs trapped and recorded

MAX_POOL_PAGES = 32768  # refcount slots: the pool's 128 MiB in 4K pages
MAX_EVENTS = 16384
MAX_WARNS = 64

STATE = Record("kpgt_state", (
    ("magic", 1), ("version", 1), ("page_size", 1), ("pool_base", 1), ("pool_pages", 1),
    ("op", 1), ("op_seq", 1), ("status", 1), ("pgd", 1), ("vtcr", 1), ("leaf_level", 1),
    ("events", 1), ("events_lost", 1), ("warns", 1),
    ("fault_kind", 1), ("fault_esr", 1), ("fault_far", 1), ("fault_elr", 1),
    ("bad_get", 1), ("bad_put", 1), ("bad_free", 1), ("alloc_fail", 1),
    ("own_ttbr", 1),
), macro_prefix="KS")
"""The state block's header at ``Layout.kpgt``; the refcount array, the event log and the WARN
log follow at :data:`REFCOUNT_OFFSET`, :data:`EVENTS_OFFSET` and :data:`WARNS_OFFSET`."""

EVENT = Record("kpgt_event", (("kind", 1), ("a0", 1), ("a1", 1), ("a2", 1)), macro_prefix="KE")
"""One host callback the C code made: :class:`EventKind` and its arguments."""

WARN = Record("kpgt_warn", (("elr", 1), ("line", 1), ("flags", 1), ("op_seq", 1)), macro_prefix="KW")
"""A ``WARN``/``BUG`` the C code hit: the ``brk``'s address (file:line from ``__bug_table``)."""

REFCOUNT_OFFSET = 4096
EVENTS_OFFSET = REFCOUNT_OFFSET + 4 * MAX_POOL_PAGES
WARNS_OFFSET = EVENTS_OFFSET + EVENT.size * MAX_EVENTS
OWN_TABLES_OFFSET = 1 << 20  # the host's own EL2 stage-1 tables (4K granule)
STATE_REGION_SIZE = 2 << 20


class Op(enum.IntEnum):
    INIT_HYP = 1
    INIT_S2 = 2
    HYP_MAP = 3
    HYP_UNMAP = 4
    S2_MAP = 5
    S2_UNMAP = 6
    S2_WRPROTECT = 7
    S2_MKYOUNG = 8
    S2_TEST_CLEAR_YOUNG = 9
    S2_MKOLD = 10
    S2_RELAX_PERMS = 11
    S2_SPLIT = 12
    S2_FLUSH = 13
    GET_LEAF = 14
    DESTROY = 15
    ENTER = 16  # no operation: the host's own EL2 map on, and kept on while a stage 2 is live


class Build(enum.IntEnum):
    """Which object runs an operation: the nVHE hypervisor's build of ``pgtable.c`` or the
    kernel-proper one (``kp_`` prefixed; the shared and fault walks 6.12's nVHE build refuses)."""

    NVHE = 0
    KERNEL = 1


class Status(enum.IntEnum):
    """``ret0`` is the C return value only when the request's status is OK; these say why not."""

    OK = 0
    NO_TABLE = 1  # no table initialised (or destroyed)
    BAD_OP = 2  # an op this tree or payload does not have
    FAULTED = 3  # the C code took an exception (fault_* fields)
    BUSY = 4  # a table exists already


class EventKind(enum.IntEnum):
    DCACHE_CLEAN_INVAL_POC = 1  # a0 addr, a1 size
    ICACHE_INVAL_POU = 2  # a0 addr, a1 size
    TLBI_VMID_IPA = 3  # a0 ipa, a1 level (as passed), a2 vmid
    TLBI_VMID_IPA_NSH = 4  # a0 ipa, a1 level, a2 vmid
    TLBI_VMID_RANGE = 5  # a0 start, a1 pages, a2 vmid
    TLBI_VMID = 6  # a2 vmid
    ZALLOC_PAGE = 7  # a0 page (0: none left)
    ZALLOC_PAGES_EXACT = 8  # a0 base, a1 size
    FREE_PAGES_EXACT = 9  # a0 base, a1 size
    GET_PAGE = 10  # a0 page, a1 new count
    PUT_PAGE = 11  # a0 page, a1 new count
    FREE_UNLINKED = 12  # a0 table, a1 level
    STACK_CHK_FAIL = 13
    TLBI_VAE2IS = 14  # a0 the operand (VA >> 12, TTL): an inline hyp ``tlbi vae2is``, trapped (TLBI_TRAP)
    TLBI_VALE2IS = 15  # a0 the operand: an inline hyp ``tlbi vale2is``, trapped


class FaultKind(enum.IntEnum):
    NONE = 0
    BUG = 1  # a BUG()/BUG_ON() brk
    DATA_ABORT = 2  # e.g. a touch of a freed pool page (unmapped from the host's own map)
    OTHER = 3  # any other synchronous exception (ESR says which)
    STACK_CHK = 4  # __stack_chk_fail


WARN_FLAG = 1 << 0  # BUGFLAG_WARNING in the bug table's flags

# The hyp code's TLB invalidations are inline ``tlbi vae2is``/``vale2is`` instructions, not host
# callbacks: the payload's image has each replaced by ``hvc #(TLBI_TRAP_HVC | form << 5 | Rt)``
# (harness.kernel.elf), and the host's exception handler records the operand (an event of kind
# TLBI_VAE2IS + form), runs the TLBI itself and returns after the hvc.
TLBI_TRAP_HVC = 0x7000
TLBI_TRAP_MASK = 0xFFC0  # imm16 bits that identify the trap (the form in bit 5, Rt in bits 4:0)


def c_header() -> str:
    """``gen/kpgt.h`` for the host C code and its assembly."""
    out = ["/* GENERATED from harness/kernel/protocol.py: do not edit. */",
           "#ifndef HARNESS_KPGT_H", "#define HARNESS_KPGT_H",
           f"#define KPGT_MAGIC {MAGIC:#x}", f"#define KPGT_VERSION {VERSION}",
           f"#define KPGT_MAX_POOL_PAGES {MAX_POOL_PAGES}", f"#define KPGT_MAX_EVENTS {MAX_EVENTS}",
           f"#define KPGT_MAX_WARNS {MAX_WARNS}", f"#define KPGT_REFCOUNT_OFFSET {REFCOUNT_OFFSET:#x}",
           f"#define KPGT_EVENTS_OFFSET {EVENTS_OFFSET:#x}", f"#define KPGT_WARNS_OFFSET {WARNS_OFFSET:#x}",
           f"#define KPGT_OWN_TABLES_OFFSET {OWN_TABLES_OFFSET:#x}", f"#define KPGT_WARN_FLAG {WARN_FLAG}",
           f"#define KPGT_TLBI_TRAP_HVC {TLBI_TRAP_HVC:#x}", f"#define KPGT_TLBI_TRAP_MASK {TLBI_TRAP_MASK:#x}"]
    for rec in (STATE, EVENT, WARN):
        out += rec.c_defines()
    out += [f"#define KOP_{o.name} {o.value}" for o in Op]
    out += [f"#define KBUILD_{b.name} {b.value}" for b in Build]
    out += [f"#define KST_{s.name} {s.value}" for s in Status]
    out += [f"#define KEV_{e.name} {e.value}" for e in EventKind]
    out += [f"#define KFAULT_{f.name} {f.value}" for f in FaultKind]
    out += ["#ifndef __ASSEMBLER__"]
    for rec in (STATE, EVENT, WARN):
        out += [line.replace("volatile uint64_t", "volatile unsigned long long") for line in rec.c_struct()]
    out += ["#endif", "#endif", ""]
    return "\n".join(out)
