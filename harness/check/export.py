"""The export format: a built scenario written for another payload on another target.

``tables.bin`` is the raw table image (at ``image.base``), ``config.json`` the register values,
the regions the payload relies on and the maps, ``expected.json`` the model's expected PAR_EL1
(with its compare mask), PA, attributes or fault per probed address and AT form.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from harness.arch.registers import Stage1Regs, Stage2Regs
from harness.check.addresses import probe_addresses
from harness.check.engine import AT_OPS, subject_of_built, used_image
from harness.check.scenario import BuiltScenario
from harness.core.batch import UNMODELLED, BatchResult, expected_par_batch, par_compare_mask_batch

EXPORT_SCHEMA = "pgtable-harness-export/1"
FAULT_NAMES = ("address_size", "translation", "access_flag", "permission")


def _fault_name(code: int) -> str | None:
    if code < 0:
        return None
    return "unmodelled" if code == UNMODELLED else FAULT_NAMES[code]


def _expected_probes(op: str, access_value: str, pred: BatchResult, built: BuiltScenario) -> dict[str, Any]:
    return {
        "op": op, "access": access_value,
        "ok": pred.ok.tolist(), "pa": [int(x) for x in pred.pa], "level": pred.level.tolist(),
        "attr": pred.attr.tolist(), "sh": pred.par_sh.tolist(),
        "fault": [_fault_name(f) for f in pred.fault.tolist()],
        "fault_level": pred.fault_level.tolist(), "fault_stage2": pred.fault_stage2.tolist(),
        "par": [int(x) for x in expected_par_batch(pred, built.table.stage)],
        "par_mask": [int(x) for x in par_compare_mask_batch(pred)],
    }


def _enable_sequence(regs: Stage1Regs | Stage2Regs) -> str:
    """The order in which another payload programs the registers (the firmware's order)."""
    if isinstance(regs, Stage2Regs):
        return "HCR_EL2 |= hcr_el2_set after VTCR/VTTBR and TLBI VMALLS12E1"
    first = "HCR_EL2 |= hcr_el2_set (E2H: the EL2&0 regime), ISB; then " if regs.hcr_el2_set else ""
    return f"{first}MAIR/TCR/TTBR0, TLBI ALLE2, then SCTLR_EL2 |= sctlr_el2_set"


def export_built(built: BuiltScenario, directory: Path, rng: np.random.Generator) -> dict[str, Any]:
    """Write ``tables.bin``, ``config.json`` and ``expected.json`` into ``directory`` (created; it
    must not exist or be empty). Nothing is left behind if writing fails."""
    table = built.table
    assert table.pgd is not None
    image = used_image(table)
    regs = table.regs()
    reg_values = {k: getattr(regs, k) for k in regs.__dataclass_fields__}
    addrs = probe_addresses(table, rng, built.scenario.sample)
    subject = subject_of_built(built)
    probes = [_expected_probes(op, access.value, subject.predict(addrs, access), built)
              for op, access in AT_OPS[table.stage]]
    geom = table.geom
    config = {
        "schema": EXPORT_SCHEMA,
        "scenario": built.scenario.name,
        "stage": int(table.stage), "granule": table.granule.label, "ia_bits": geom.ia_bits, "pa_bits": geom.pa_bits,
        "start_level": geom.start_level, "pgd_pages": geom.pgd_pages, "pgd": table.pgd,
        "lpa2": geom.lpa2, "e2h": geom.e2h, "pamax": geom.pamax,
        "image": {"file": "tables.bin", "base": image.base, "size": len(image.data)},
        "registers": reg_values,
        "enable": _enable_sequence(regs),
        "regions": [{"name": r.name, "base": r.base, "size": r.size, "prot": r.prot.label(),
                     "mapping": "identity"} for r in built.regions],
        "maps": [{"addr": m.addr, "size": m.size, "pa": m.pa, "prot": m.prot.label()} for m in built.scenario.maps],
        "ops": [{"op": o.op, "addr": o.addr, "size": o.size, "prot": o.prot.label()} for o in built.scenario.ops],
    }
    expected = {"schema": EXPORT_SCHEMA, "addresses": [int(a) for a in addrs], "probes": probes}
    _write_directory(directory, {
        "tables.bin": image.data,
        "config.json": (json.dumps(config, indent=2) + "\n").encode(),
        "expected.json": (json.dumps(expected) + "\n").encode(),
    })
    return {"directory": str(directory), "image_base": image.base, "image_size": len(image.data),
            "addresses": int(addrs.size), "registers": reg_values}


def _write_directory(directory: Path, files: dict[str, bytes]) -> None:
    """All files or none: written into a sibling temporary directory, then renamed into place;
    on failure every directory created on the way is removed again."""
    parent = directory.absolute().parent
    first_created = next((p for p in (*reversed(parent.parents), parent) if not p.exists()), None)
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=parent))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        if directory.is_dir():
            directory.rmdir()  # empty (checked by the caller); replaced by the staging directory
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(first_created or staging, ignore_errors=True)
        raise
