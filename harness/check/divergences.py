"""Known divergences of QEMU's MMU from the Arm ARM: the one list, keyed by QEMU version.

These are QEMU bugs or QEMU choices where the architecture leaves room, not model bugs. The check
and the fuzzer classify a disagreement that one of these explains as a known divergence (shown,
counted, not failed); anything else is a mismatch. Each entry names the Arm ARM rule.

A departure of walk semantics also carries the model's keywords that make the model walk as QEMU
does (``semantics``): the check predicts both ways, so a disagreement is classified in batch,
also when one descriptor meets two departures (the keys joined with "+"), and what must not be
pointed at with ``AT`` (:data:`AT_HAZARDS`) is decided on *QEMU's* walk.

Not a divergence: an ``AT`` whose walk reads a physical address with nothing behind it takes a
synchronous external abort (ESR_EL2 EC 0x25, DFSC "external abort on translation table walk")
on QEMU instead of reporting it in PAR_EL1. The firmware records it as that probe's result; the
check expects it where the model's walk leaves the memory it models, and counts it apart
(``engine.SKIP_AT_ABORT``); elsewhere it is an unexplained disagreement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from harness.arch import descriptors as d
from harness.arch.geometry import WIDE_ADDRESS_BITS, Geometry, Granule, Stage
from harness.arch.registers import FaultKind, Par, decode_fault_status
from harness.core.batch import BatchResult
from harness.core.translate import ARM_ARM, Translation, WalkSemantics, expected_par, par_compare_mask, translate

QemuVersion = tuple[int, int, int]


@dataclass(frozen=True)
class Context:
    """What a matcher may look at: the model's walk, the MMU's PAR, and how to re-walk."""

    model: Translation
    actual: int
    geom: Geometry
    rewalk: Callable[..., Translation]  # translate(...) with keyword overrides (e.g. qemu=...)


def _every_geometry(geom: Geometry) -> bool:
    return True


@dataclass(frozen=True)
class Divergence:
    """One departure of QEMU from the Arm ARM. ``semantics`` is the model's walk's ``qemu``
    (:class:`WalkSemantics`: ``translate``/``translate_batch``) that makes it walk as QEMU does,
    when the departure is one of walk semantics (on the geometries ``concerns`` selects); the
    check then predicts both ways, and decides what an ``AT`` may be pointed at with QEMU's walk."""

    key: str
    rule: str  # the Arm ARM rule
    qemu: str  # what QEMU does instead
    applies_to: Callable[[QemuVersion], bool]
    matches: Callable[[Context], bool]
    semantics: WalkSemantics = ARM_ARM
    concerns: Callable[[Geometry], bool] = _every_geometry
    translates_fault: FaultKind | None = None  # a fault the model predicts where QEMU may translate


def _before(v: QemuVersion) -> Callable[[QemuVersion], bool]:
    return lambda q: q < v


def _always(q: QemuVersion) -> bool:
    return True


def _after_7_2(q: QemuVersion) -> bool:
    return q >= (8, 0, 0)


def _reserved_block(granule: Granule, level: int) -> Callable[[Context], bool]:
    """The model's translation fault on a block descriptor at a level of ``granule`` that has no
    blocks (DS = 0)."""

    def matches(c: Context) -> bool:
        m = c.model
        if c.geom.granule is not granule or m.fault is not FaultKind.TRANSLATION or m.fault_level != level:
            return False
        step = m.steps[-1] if m.steps else None
        return step is not None and step.raw is not None and step.level == level and \
            d.VALID.get(step.raw) == 1 and d.TYPE.get(step.raw) == d.TYPE_BLOCK

    return matches


_l0_block_4k = _reserved_block(Granule.K4, 0)


def _s2_lpa2_start_level(geom: Geometry) -> bool:
    """A stage-2 start level that only DS = 1 has: 16K level 0, 4K level -1."""
    return geom.stage is Stage.S2 and geom.lpa2 and \
        (geom.granule, geom.start_level) in ((Granule.K16, 0), (Granule.K4, -1))


def _s2_lpa2_start_level_refused(c: Context) -> bool:
    """Every walk of the configuration ends in a stage-2 translation fault at level 0."""
    par = Par(c.actual)
    return _s2_lpa2_start_level(c.geom) and par.fault and par.stage2 and \
        decode_fault_status(par.fst) == (FaultKind.TRANSLATION, 0)


def _s2_level_on_s1_walk(c: Context) -> bool:
    par = Par(c.actual)
    if not (par.fault and par.stage2 and par.ptw) or c.model.fault is None:
        return False
    dec = decode_fault_status(par.fst)
    return dec is not None and dec[0] is c.model.fault


def _sh_non_cacheable(c: Context) -> bool:
    m = c.model
    par = Par(c.actual)
    if not m.ok or par.fault or m.attr is None:
        return False
    normal_cacheable = (m.attr >> 4) not in (0x0, 0x4) and (m.attr & 0xF) not in (0x0, 0x4)
    return not normal_cacheable and par.pa == (m.pa or 0) & ~0xFFF and par.attr == m.attr


def _lpa_oa_concerns(geom: Geometry) -> bool:
    return geom.granule is Granule.K64 and geom.pa_bits < WIDE_ADDRESS_BITS


def _walks_as_qemu(semantics: WalkSemantics) -> Callable[[Context], bool]:
    """A matcher: the MMU's answer is the model's walk with QEMU's ``semantics``."""

    def matches(c: Context) -> bool:
        alt = c.rewalk(qemu=semantics)
        if alt.unmodelled:
            return False
        return bool((expected_par(alt) ^ c.actual) & par_compare_mask(alt) == 0)

    return matches


def _lpa_oa_bits(c: Context) -> bool:
    if not _lpa_oa_concerns(c.geom) or c.model.fault is not FaultKind.ADDRESS_SIZE:
        return False
    return _walks_as_qemu(LPA_OA_SEMANTICS)(c)


LPA_OA_SEMANTICS = WalkSemantics(lpa_oa=True)

LPA2_OA_SEMANTICS = WalkSemantics(lpa2_oa=True)


def _lpa2_oa_concerns(geom: Geometry) -> bool:
    return geom.lpa2 and geom.pa_bits < WIDE_ADDRESS_BITS


def _lpa2_oa_bits(c: Context) -> bool:
    if not _lpa2_oa_concerns(c.geom) or c.model.fault is not FaultKind.ADDRESS_SIZE:
        return False
    return _walks_as_qemu(LPA2_OA_SEMANTICS)(c)


FINAL_OA_SEMANTICS = WalkSemantics(final_oa_unchecked=True)


def _blocks_beyond_ps(geom: Geometry) -> bool:
    """Whether some block of this geometry is larger than the PA space."""
    return any(geom.size(level) > 1 << geom.pa_bits for level in geom.block_levels)


def _final_oa_beyond_ps(c: Context) -> bool:
    """The model (the ASL) faults a leaf whose descriptor address fits the PA size because the
    final output address does not; the MMU translated it to exactly that address."""
    m = c.model
    par = Par(c.actual)
    step = m.steps[-1] if m.steps else None
    if m.fault is not FaultKind.ADDRESS_SIZE or par.fault or step is None or step.raw is None:
        return False
    if step.decoded is None or step.decoded.kind not in (d.Kind.BLOCK, d.Kind.PAGE):
        return False
    size = c.geom.size(step.level)
    base = step.decoded.address & ~(size - 1)
    if base >> c.geom.pa_bits:
        return False  # the descriptor itself is out of range: not this departure
    final = base | (m.address & (size - 1))
    return bool(final >> c.geom.pa_bits) and par.pa == final & ~0xFFF


DIVERGENCES: tuple[Divergence, ...] = (
    Divergence(
        "qemu-l0-block-4k",
        "Arm ARM D8.3: with the 4K granule and DS = 0 a level-0 descriptor with bit 1 clear is "
        "reserved (no level-0 blocks): translation fault at level 0",
        "QEMU before 8.2 takes it as a 512 GiB block and translates",
        _before((8, 2, 0)), _l0_block_4k, translates_fault=FaultKind.TRANSLATION,
    ),
    Divergence(
        "qemu-l1-block-16k",
        "Arm ARM D8.3: with the 16K granule and DS = 0 a level-1 descriptor with bit 1 clear is "
        "reserved (16K has blocks at level 2 only): translation fault at level 1",
        "QEMU before 8.2 takes it as a 64 GiB block (found by the fuzzer on 7.2.22; the same "
        "block-level check as the 4K level-0 case, fixed in 8.2)",
        _before((8, 2, 0)), _reserved_block(Granule.K16, 1), translates_fault=FaultKind.TRANSLATION,
    ),
    Divergence(
        "qemu-l0-block-16k",
        "Arm ARM D8.3: with the 16K granule a level-0 descriptor with bit 1 clear is reserved "
        "(blocks at level 2, and at level 1 with DS = 1; never at level 0): translation fault at "
        "level 0",
        "QEMU before 8.2 takes it as a block (found by the fuzzer on 7.2.22 with DS = 1, where "
        "16K level 0 is a start level; the block-level check fixed in 8.2; 10.0.2 faults)",
        _before((8, 2, 0)), _reserved_block(Granule.K16, 0), translates_fault=FaultKind.TRANSLATION,
    ),
    Divergence(
        "qemu-lm1-block-4k",
        "Arm ARM D8.3 (DS = 1): with the 4K granule a level -1 descriptor with bit 1 clear is "
        "reserved (blocks at levels 0 to 2): translation fault at level -1",
        "QEMU 7.2.22 takes it as a block (found by the fuzzer; the block-level check of the "
        "level-0 and 16K cases, fixed in 8.2; 10.0.2 faults)",
        _before((8, 2, 0)), _reserved_block(Granule.K4, -1), translates_fault=FaultKind.TRANSLATION,
    ),
    Divergence(
        "qemu-s2-lpa2-start-level",
        "Arm ARM (VTCR_EL2.SL0/SL2 with DS = 1): the 16K granule with SL0 = 0b11 starts the "
        "stage-2 walk at level 0, the 4K granule with SL2 = 1, SL0 = 0 at level -1",
        "QEMU 7.2.22 refuses these start levels: every stage-2 walk is a translation fault at "
        "level 0 (so the EL1 stub cannot run: no real accesses on them). 10.0.2 walks them; "
        "versions in between are not measured and treated as affected",
        _before((10, 0, 0)), _s2_lpa2_start_level_refused, concerns=_s2_lpa2_start_level,
    ),
    Divergence(
        "qemu-s2-level-on-s1-walk",
        "Arm ARM D8.16: a stage-2 fault on a stage-1 table walk reports the stage-2 level in FST",
        "QEMU before 8.2 reports the stage-1 level",
        _before((8, 2, 0)), _s2_level_on_s1_walk,
    ),
    Divergence(
        "qemu-par-sh-non-cacheable",
        "Arm ARM D19 (PAR_EL1.SH): Device and Normal Non-cacheable memory report outer-shareable",
        "QEMU before 8.2 reports the descriptor's SH (compare SH for Normal cacheable only)",
        _before((8, 2, 0)), _sh_non_cacheable,
    ),
    Divergence(
        "qemu-64k-oa-51-48-below-52bit-ps",
        "Arm ARM D8.3 (FEAT_LPA): with the 64K granule, descriptor bits [15:12] are OA[51:48]; an "
        "output address beyond the configured PA size is an address size fault",
        "QEMU reads bits [15:12] as OA[51:48] only when the PA size is 52 bits; below that it "
        "ignores them and translates (or walks on to the table they would not point to)",
        _always, _lpa_oa_bits, LPA_OA_SEMANTICS, _lpa_oa_concerns,
    ),
    Divergence(
        "qemu-lpa2-oa-51-50-below-52bit-ps",
        "Arm ARM D8.3 (FEAT_LPA2, DS = 1): descriptor bits [9:8] are OA[51:50] of the output "
        "or next-level table address, in every descriptor; an address at or above 2^PS is an "
        "Address size fault (AArch64.OAOutOfRange)",
        "QEMU (get_phys_addr_lpae) puts bits [9:8] into the address only when PS is 52 bits; "
        "below that it ignores them and translates, or walks on, at the address without them. "
        "Found by the fuzzer on 10.0.2 (4K and 16K, both stages; where the walk QEMU takes ends "
        "in a stage-2 permission fault, AT S12E1R/W then aborts QEMU); the same code since "
        "FEAT_LPA2 support (7.0), so every version is treated as affected",
        _always, _lpa2_oa_bits, LPA2_OA_SEMANTICS, _lpa2_oa_concerns,
    ),
    Divergence(
        "qemu-final-oa-beyond-ps",
        "Arm ARM (ASL AArch64.S1Translate/S2Translate: AArch64.OAOutOfRange on the walk's output "
        "address): an output address at or above 2^PS is an Address size fault at the leaf level, "
        "also when it comes from the input address bits inside a block (a 64K level-1 block is "
        "4 TiB: with PS < 42 at stage 1 its upper part lies beyond the PA size)",
        "QEMU (10.0.2 and 7.2.22 measured) checks only descriptor bits [47:PS] and translates to the "
        "out-of-range address",
        _always, _final_oa_beyond_ps, FINAL_OA_SEMANTICS, _blocks_beyond_ps,
    ),
)


@dataclass(frozen=True)
class AtHazard:
    """Addresses an ``AT`` must not be pointed at on this QEMU: it would abort QEMU itself.
    ``select`` is applied to the prediction of *QEMU's* walk (the model with
    :func:`qemu_semantics`), since it is QEMU's walk that must not end there. The check probes
    the selected addresses with real loads and stores instead."""

    key: str
    rule: str
    qemu: str
    applies_to: Callable[[QemuVersion], bool]
    select: Callable[[BatchResult], npt.NDArray[np.bool_]]
    stage: Stage | None  # the stage whose AT forms it concerns (None: both)
    no_access: bool = False  # a real access aborts QEMU too: the address cannot be probed at all


def _s2_permission_fault(pred: BatchResult) -> npt.NDArray[np.bool_]:
    if pred.stage is not Stage.S2:
        return np.zeros(len(pred), dtype=np.bool_)
    return np.asarray((pred.fault == FaultKind.PERMISSION.value) & pred.fault_stage2, dtype=np.bool_)


def _level_minus_1_fault(pred: BatchResult) -> npt.NDArray[np.bool_]:
    return np.asarray(~pred.ok & ~pred.unmodelled & (pred.fault_level == -1), dtype=np.bool_)


AT_HAZARDS: tuple[AtHazard, ...] = (
    AtHazard(
        "qemu-at-s12-permission-fault-aborts",
        "Arm ARM (AT S12E1R/W): a stage-2 permission fault is reported in PAR_EL1 (F = 1, S = 1, "
        "FST = permission fault at the leaf level)",
        "QEMU 10.0.2 (measured here; EL1 stage 1 off) aborts with the assertion "
        "'!res.cacheattrs.is_s2_format' in do_ats_write: get_phys_addr_twostage returns early on "
        "the stage-2 fault with stage-2-format cache attributes. Translation and access-flag faults "
        "are reported correctly. QEMU 7.2.22 reports the permission fault correctly; versions in "
        "between are not measured and treated as affected.",
        _after_7_2, _s2_permission_fault, Stage.S2,
    ),
    AtHazard(
        "qemu-level-minus-1-fault-aborts",
        "Arm ARM (FEAT_LPA2): a translation or address size fault at level -1 is reported with "
        "its own fault status codes (0b101011, 0b101001) in PAR_EL1.FST and ESR_ELx.DFSC",
        "QEMU 7.2.22 aborts with the assertion 'fi->level >= 0 && fi->level <= 3' in "
        "arm_fi_to_lfsc, on AT and on real accesses alike (found by the fuzzer); 10.0.2 reports "
        "them; versions in between are not measured and treated as affected",
        _before((10, 0, 0)), _level_minus_1_fault, None, no_access=True,
    ),
)


def hazards(version: QemuVersion, stage: Stage) -> tuple[AtHazard, ...]:
    """The AT hazards of this QEMU for the AT forms of ``stage``."""
    return tuple(hz for hz in AT_HAZARDS if hz.stage in (stage, None) and hz.applies_to(version))


def at_unsafe(pred: BatchResult, version: QemuVersion) -> tuple[npt.NDArray[np.bool_], list[str]]:
    """Mask of addresses no AT may be pointed at, and the hazards that apply."""
    mask = np.zeros(len(pred), dtype=np.bool_)
    keys = []
    for hz in AT_HAZARDS:
        if hz.applies_to(version):
            hit = hz.select(pred)
            if hit.any():
                keys.append(hz.key)
            mask |= hit
    return mask, keys


def unprobeable(pred: BatchResult, version: QemuVersion) -> npt.NDArray[np.bool_]:
    """Mask of addresses neither an AT nor a real access may be pointed at on this QEMU."""
    mask = np.zeros(len(pred), dtype=np.bool_)
    for hz in AT_HAZARDS:
        if hz.no_access and hz.applies_to(version):
            mask |= hz.select(pred)
    return mask


def active(version: QemuVersion) -> tuple[Divergence, ...]:
    return tuple(dv for dv in DIVERGENCES if dv.applies_to(version))


def semantic_departures(version: QemuVersion, geom: Geometry) -> list[tuple[Divergence, dict[str, Any]]]:
    """The departures of walk semantics that apply to this QEMU and geometry, with the model's
    keywords for each (``{"qemu": WalkSemantics}``)."""
    return [(dv, {"qemu": dv.semantics}) for dv in active(version) if dv.semantics.departs and dv.concerns(geom)]


def semantic_explanations(version: QemuVersion, geom: Geometry) -> list[tuple[str, dict[str, Any]]]:
    """What may explain a disagreement by walk semantics, tried in order: each departure alone,
    then all of them together (a key joined with "+": one descriptor can meet two departures)."""
    deps = semantic_departures(version, geom)
    out = [(dv.key, kw) for dv, kw in deps]
    if len(deps) > 1:
        out.append(("+".join(dv.key for dv, _ in deps), qemu_semantics(version, geom)))
    return out


def unusable(version: QemuVersion, geom: Geometry) -> list[str]:
    """Keys of the departures that make every walk of this configuration fail on this QEMU
    (no real access can run on it: the firmware's own fetches would fault)."""
    return [dv.key for dv in active(version) if not dv.semantics.departs and dv.concerns is not _every_geometry
            and dv.concerns(geom)]


def untrusted_faults(version: QemuVersion) -> tuple[int, ...]:
    """Batch fault codes the running QEMU may translate instead (a divergence the model has no
    keyword for): a real access must not be aimed at them, it could land anywhere."""
    return tuple(dv.translates_fault.value for dv in active(version) if dv.translates_fault is not None)


def qemu_semantics(version: QemuVersion, geom: Geometry) -> dict[str, Any]:
    """The model's keywords that make it walk as this QEMU does on this geometry ({} when the
    Arm ARM's walk and QEMU's agree; else ``{"qemu": WalkSemantics}``)."""
    qemu = ARM_ARM
    for dv, _ in semantic_departures(version, geom):
        qemu |= dv.semantics
    return {"qemu": qemu} if qemu.departs else {}


def explain(model: Translation, actual: int, geom: Geometry, rewalk: Callable[..., Translation],
            version: QemuVersion) -> Divergence | None:
    ctx = Context(model, actual, geom, rewalk)
    for dv in active(version):
        if dv.matches(ctx):
            return dv
    return None


def explain_key(model: Translation, actual: int, geom: Geometry, rewalk: Callable[..., Translation],
                version: QemuVersion) -> str | None:
    """The key of what explains a disagreement: one divergence, or a departure of walk semantics
    together with another divergence seen on QEMU's walk (keys joined with "+")."""
    found = explain(model, actual, geom, rewalk, version)
    if found is not None:
        return found.key
    for name, kw in semantic_explanations(version, geom):
        alt = rewalk(**kw)
        if alt.unmodelled:
            continue
        if (expected_par(alt) ^ actual) & par_compare_mask(alt) == 0:
            return name
        other = explain(alt, actual, geom, rewalk, version)
        if other is not None and not other.semantics.departs:
            return f"{name}+{other.key}"
    return None


__all__ = [
    "AT_HAZARDS",
    "DIVERGENCES",
    "AtHazard",
    "Context",
    "Divergence",
    "active",
    "at_unsafe",
    "explain",
    "explain_key",
    "hazards",
    "qemu_semantics",
    "semantic_departures",
    "semantic_explanations",
    "translate",
    "unprobeable",
    "untrusted_faults",
    "unusable",
]
