"""Page-table permissions and attributes requested of a mapping (kvm_pgtable_prot in the seed).

The seed (v3 of the walker series) orders them R, W, X as bits 0, 1, 2 and DEVICE as bit 3.

One vocabulary, one meaning each: :class:`Prot` is what a caller asks a mapping for; the
descriptor fields that encode it are :mod:`harness.arch.descriptors`' (``S1AP``, ``S1AP_E2H``,
``S2AP``, XN/PXN); what the MMU then allows is :data:`harness.core.translate.PERM_R` ... .
"""

from __future__ import annotations

import enum


class Prot(enum.IntFlag):
    R = 1 << 0
    W = 1 << 1
    X = 1 << 2
    DEVICE = 1 << 3

    NONE = 0
    RW = R | W
    RX = R | X
    RWX = R | W | X

    @classmethod
    def parse(cls, text: str) -> Prot:
        """"rwx", "rw", "r-x", "rw+device" / "rwd" ... into flags; anything else is an error."""
        value = cls.NONE
        letters = {"r": cls.R, "w": cls.W, "x": cls.X, "d": cls.DEVICE}
        body = text.strip().lower().replace("+device", "d").replace("device", "d")
        for ch in body:
            if ch == "-":
                continue
            if ch not in letters:
                raise ValueError(
                    f"prot: expected letters from 'rwxd' (read, write, execute, device), got {text!r}"
                )
            value |= letters[ch]
        return value

    def label(self) -> str:
        out = "".join(c if self & f else "-" for c, f in (("r", Prot.R), ("w", Prot.W), ("x", Prot.X)))
        return out + ("+device" if self & Prot.DEVICE else "")
