"""TLB maintenance instructions: their operands and the rules an update must follow (Arm ARM
DDI 0487, chapter D8 "The AArch64 Virtual Memory System Architecture": "TLB maintenance" and
"Translation table updates"; the TLBI encodings in the system instruction descriptions).

The facts here are the ones the harness relies on, each once:

* the operand of a TLBI by address: the page number (address >> 12) in bits [43:0] and, with
  FEAT_TTL, the TTL hint in bits [47:44] (TG in TTL[3:2]: 4K = 0b01, 16K = 0b10, 64K = 0b11;
  the level in TTL[1:0]); TTL = 0b00xx means "no information". With a TTL hint the
  instruction need only invalidate entries whose leaf is at that level: "If an incorrect value
  of the TTL field is specified for the entry being invalidated, then no entries are required
  by the architecture to be invalidated from the TLB" (the TTL field of the TLBI operand).
* which entries an instruction covers: ``*VAE2*``/``IPAS2E1*`` invalidate entries at every level
  of the walk that translate the address (walk-cache entries included); the ``*VALE2*``/
  ``IPAS2LE1*`` "last level" forms only the leaf; ``IPAS2E1*`` only stage-2-only
  entries, so upstream follows each one with ``VMALLE1IS`` for the combined stage 1+2 entries.
* the rules (named by their Arm ARM sections, quoted in findings):
  TLBI-COVER: after a translation table entry that could be cached (valid, and for a leaf AF = 1:
  "the TLB cannot hold a translation that generates an Access flag fault") changes, the old
  entry may be used until a TLBI that covers it completes ("TLB maintenance requirements"); a
  table entry removed takes with it every leaf the TLB may hold from the subtree it pointed at.
  BBM: a change of output address or of block size (leaf <-> table, another level) of a valid
  entry must go through an invalid entry and a completed TLBI first ("Using break-before-make
  when updating translation table entries").
  FREE: a table page may be reused only after the TLBI that removes every walk-cache entry that
  points at it (the same break-before-make requirement: a walk may still use the old table
  until the invalidation completes).
"""

from __future__ import annotations

import enum

from harness.arch.bits import Field
from harness.arch.geometry import Granule

TLBI_PAGE_SHIFT = 12  # the address operand is in 4 KiB units whatever the granule
TLBI_ADDR = Field("ADDR", 43, 0)
TLBI_TTL = Field("TTL", 47, 44)
TTL_TG = {Granule.K4: 0b01, Granule.K16: 0b10, Granule.K64: 0b11}


def ttl(granule: Granule, level: int | None) -> int:
    """The TTL field for a leaf at ``level`` (None: no information, 0)."""
    if level is None:
        return 0
    if not 0 <= level <= 3:
        raise ValueError(f"level: expected 0..3 or None, got {level!r}")
    return (TTL_TG[granule] << 2) | level


def ttl_level(operand: int) -> int | None:
    """The level a TLBI operand's TTL hints (None: no information, TG = 0)."""
    t = TLBI_TTL.get(operand)
    return None if t >> 2 == 0 else t & 3


def operand(addr: int, granule: Granule, level: int | None = None) -> int:
    """The Xt of a TLBI by VA or IPA: page number and TTL hint."""
    return TLBI_ADDR.prep((addr >> TLBI_PAGE_SHIFT) & TLBI_ADDR.mask) | TLBI_TTL.prep(ttl(granule, level))


class Insn(enum.IntEnum):
    """The instructions a live update's invalidations execute, one per step (firmware ``LIVE``
    request): the operand is :func:`operand`'s for the by-address forms, ignored otherwise."""

    DSB_ISHST = 2
    DSB_ISH = 3
    DSB_NSHST = 4
    DSB_NSH = 5
    ISB = 6
    TLBI_IPAS2E1IS = 7
    TLBI_IPAS2E1 = 8
    TLBI_IPAS2LE1IS = 9
    TLBI_VMALLE1IS = 10
    TLBI_VMALLE1 = 11
    TLBI_VMALLS12E1IS = 12
    TLBI_VAE2IS = 13
    TLBI_VALE2IS = 14
    TLBI_ALLE2IS = 15


# The A64 encodings of the two hyp invalidations (SYS #4, C8, C3, #op2, Xt; Rt in bits 4:0):
# tlbi vae2is (op2 1) and tlbi vale2is (op2 5), in that order (the kernel host's trap forms).
TLBI_EL2IS_ENCODINGS = (0xD50C8320, 0xD50C83A0)
TLBI_RT_MASK = 0x1F
