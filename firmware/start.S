/* pgtable-harness firmware: entry, EL2 vectors, probe loops, EL1 stub.
 * Entered at EL2 (QEMU virt, virtualization=on) with the MMU off. */
#include "gen/arch.h"
#include "gen/layout.h"
#include "gen/mailbox.h"

/* s2_probing: what the EL1 stub is doing (0: nothing, lower-EL exceptions are unexpected) */
#define S2_PROBING_DATA 1
#define S2_PROBING_FETCH 2
#define S2_PROBING_EL0_FETCH 3  /* EL0 of the EL2&0 regime (TGE = 1): el0_stub_fx, SVC #0 when done */
#define EL0_STUB_BYTES 16

    .section .text.start, "ax"
    .global _start
_start:
    adrp    x0, __stack_top
    add     x0, x0, :lo12:__stack_top
    mov     sp, x0
    mrs     x0, CurrentEL
    ubfx    x0, x0, #CURRENTEL_EL_SHIFT, #CURRENTEL_EL_WIDTH
    cmp     x0, #2
    b.ne    1f
    adrp    x1, el2_vectors
    add     x1, x1, :lo12:el2_vectors
    msr     vbar_el2, x1
    isb
1:  /* zero .bss */
    adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
2:  cmp     x1, x2
    b.hs    3f
    str     xzr, [x1], #8
    b       2b
3:  bl      fw_main            /* x0 = CurrentEL */
    b       park

/* Where el2_sync sends a synchronous exception it does not expect, before reporting it (0:
 * report): a host of kernel code sets it while that code runs (firmware/kpgt/trap.S). */
    .data
    .balign 8
    .global el2_sync_hook
el2_sync_hook:
    .quad   0

    .section .hostbp, "ax"
/* The host's hardware breakpoint: the firmware is idle, waiting for a request. */
    .global idle
    .type idle, %function
idle:
    nop
    ret

/* Reached after an unexpected exception has been reported: stops at the host's one breakpoint
 * (idle; the host tells this stop by the mailbox's panic_count, which saves gdb inserting and
 * removing a second hardware breakpoint on every request), then parks. */
    .global panic
    .type panic, %function
panic:
    bl      idle

    .global park
park:
    wfi
    b       park

    .text
/* void at_loop_<op>(const u64 *addrs, u64 *out, u64 count)
 * If the AT itself takes a synchronous exception (an external abort on a table walk outside RAM),
 * el2_sync puts the AT_EXCEPTION_TAG form of ESR_EL2 in x5 and resumes at at_store_<op>. */
.macro AT_LOOP name, op
    .global at_loop_\name
    .type at_loop_\name, %function
at_loop_\name:
    cbz     x2, 2f
1:  ldr     x4, [x0], #8
    .global at_insn_\name
at_insn_\name:
    at      \op, x4
    isb
    mrs     x5, par_el1
    .global at_store_\name
at_store_\name:
    str     x5, [x1], #8
    subs    x2, x2, #1
    b.ne    1b
2:  ret
.endm
    AT_LOOP s1e2r, s1e2r
    AT_LOOP s1e2w, s1e2w
    AT_LOOP s12e1r, s12e1r
    AT_LOOP s12e1w, s12e1w
    AT_LOOP s1e0r, s1e0r
    AT_LOOP s1e0w, s1e0w

/* Clear one access record (x19) and mark it completed; the vector overwrites it on a fault. */
.macro RECORD_START
    mov     x1, #ACCESS_COMPLETED
    str     x1, [x19, #ACCESS_RECORD_OFF_STATUS]
    str     xzr, [x19, #ACCESS_RECORD_OFF_ESR]
    str     xzr, [x19, #ACCESS_RECORD_OFF_FAR]
    str     xzr, [x19, #ACCESS_RECORD_OFF_HPFAR]
.endm

/* One probe loop of s1_access_loop: a 64-bit \insn (ldr or ldtr: x1 = 0 first, the value read
 * recorded; str or sttr: values[i] stored and recorded) at each address, the probe instruction
 * at \label (el2_sync records its data abort in the current record, x19, and skips it). */
.macro S1_PROBE_LOOP insn, label, store
1:  cbz     x21, 9f
    ldr     x0, [x20], #8
    RECORD_START
    .if \store
    ldr     x1, [x22], #8
    str     x1, [x19, #ACCESS_RECORD_OFF_VALUE]
    .else
    mov     x1, xzr
    .endif
    .global \label
\label:
    \insn   x1, [x0]
    .if !\store
    str     x1, [x19, #ACCESS_RECORD_OFF_VALUE]
    .endif
    add     x19, x19, #ACCESS_RECORD_SIZE
    sub     x21, x21, #1
    b       1b
.endm

/* void s1_access_loop(const u64 *addrs, struct access_record *records, u64 count, u64 mode,
 *                     const u64 *values)
 * 64-bit accesses through the installed stage 1 (EL2 or EL2&0 regime). mode 0: EL2 loads, 1:
 * EL2 stores, 2: EL0 loads (ldtr), 3: EL0 stores (sttr): unprivileged, so EL0's accesses, when
 * the caller has set HCR_EL2.{E2H, TGE} = {1, 1}. A load records the value read (0 if it
 * faulted), a store writes values[i] and records it. */
    .global s1_access_loop
    .type s1_access_loop, %function
s1_access_loop:
    stp     x19, x20, [sp, #-32]!
    stp     x21, x22, [sp, #16]
    mov     x19, x1
    mov     x20, x0
    mov     x21, x2
    mov     x22, x4
    cmp     x3, #1
    b.eq    5f
    cmp     x3, #2
    b.eq    6f
    cmp     x3, #3
    b.eq    7f
    S1_PROBE_LOOP ldr, s1_probe_ld, 0
5:  S1_PROBE_LOOP str, s1_probe_st, 1
6:  S1_PROBE_LOOP ldtr, s1_probe_ldtr, 0
7:  S1_PROBE_LOOP sttr, s1_probe_sttr, 1
9:  ldp     x21, x22, [sp, #16]
    ldp     x19, x20, [sp], #32
    ret

/* void s1_fetch_loop(const u64 *addrs, struct access_record *records, u64 count)
 * Instruction fetches at EL2 through the installed stage 1: blr to each address (x0 = the
 * address), whose code is expected to return; the record's value is x0 after the return. An
 * exception raised at the target (an instruction abort, or the code found there) is recorded by
 * el2_sync (x30 = s1_fetch_ret tells it apart), which resumes at s1_fetch_next. */
    .global s1_fetch_loop
    .type s1_fetch_loop, %function
s1_fetch_loop:
    stp     x19, x20, [sp, #-32]!
    stp     x21, x30, [sp, #16]
    mov     x19, x1
    mov     x20, x0
    mov     x21, x2
1:  cbz     x21, 9f
    ldr     x0, [x20], #8
    RECORD_START
    str     xzr, [x19, #ACCESS_RECORD_OFF_VALUE]
    blr     x0
    .global s1_fetch_ret
s1_fetch_ret:
    str     x0, [x19, #ACCESS_RECORD_OFF_VALUE]
    .global s1_fetch_next
s1_fetch_next:
    add     x19, x19, #ACCESS_RECORD_SIZE
    sub     x21, x21, #1
    b       1b
9:  ldp     x21, x30, [sp, #16]
    ldp     x19, x20, [sp], #32
    ret

/* void s2_access_loop(const u64 *addrs, struct access_record *records, u64 count, u64 mode,
 *                     const u64 *values)
 * mode 0: loads, 1: stores, 2: instruction fetches (values is read and ignored); 3: instruction
 * fetches at EL0 of the EL2&0 regime (the caller set HCR_EL2.{E2H, TGE} = {1, 1}): an eret to
 * el0_stub_fx at EL0t, done with SVC #0, an abort or other exception taken from EL0 recorded.
 * For each address: eret into the EL1 stub (x0 = address, x1 = value to store, 0 for a load or a
 * fetch), which accesses it (a fetch: blr to it) and issues HVC #0; a stage-2 fault arrives as a
 * lower-EL data or instruction abort. Both
 * come back through the lower-EL sync vector to s2_resume (x0 = status, x1 = the stub's x1: the
 * value loaded or stored) with x19..x24 intact (EL1 only touches x0/x1). */
    .global s2_access_loop
    .type s2_access_loop, %function
s2_access_loop:
    stp     x29, x30, [sp, #-64]!
    stp     x19, x20, [sp, #16]
    stp     x21, x22, [sp, #32]
    stp     x23, x24, [sp, #48]
    mov     x19, x1
    mov     x20, x0
    mov     x21, x2
    mov     x24, x4
    mov     x29, x3
    adrp    x22, el1_stub_ld
    add     x22, x22, :lo12:el1_stub_ld
    mov     x1, #S2_PROBING_DATA
    cbz     x3, 1f
    adrp    x22, el1_stub_st
    add     x22, x22, :lo12:el1_stub_st
    cmp     x3, #1
    b.eq    1f
    adrp    x22, el1_stub_fx
    add     x22, x22, :lo12:el1_stub_fx
    mov     x1, #S2_PROBING_FETCH
    cmp     x3, #2
    b.eq    1f
    adrp    x22, el0_stub_fx
    add     x22, x22, :lo12:el0_stub_fx
    mov     x1, #S2_PROBING_EL0_FETCH
1:  adrp    x23, s2_probing
    add     x23, x23, :lo12:s2_probing
    str     x1, [x23]
s2_next:
    cbz     x21, 9f
    ldr     x0, [x20], #8
    RECORD_START
    str     xzr, [x19, #ACCESS_RECORD_OFF_STATUS]
    msr     elr_el2, x22
    mov     x1, #SPSR_EL1H_MASKED
    mov     x2, #SPSR_EL0T_MASKED
    cmp     x29, #3
    csel    x1, x2, x1, eq
    msr     spsr_el2, x1
    ldr     x1, [x24], #8
    cmp     x29, #1
    csel    x1, x1, xzr, eq     /* a load or fetch starts from 0: a faulting one records 0 */
    eret
    .global s2_resume
s2_resume:                      /* x0 = status, x1 = value, from the lower-EL sync vector */
    str     x0, [x19, #ACCESS_RECORD_OFF_STATUS]
    str     x1, [x19, #ACCESS_RECORD_OFF_VALUE]
    add     x19, x19, #ACCESS_RECORD_SIZE
    sub     x21, x21, #1
    b       s2_next
9:  str     xzr, [x23]
    ldp     x23, x24, [sp, #48]
    ldp     x21, x22, [sp, #32]
    ldp     x19, x20, [sp, #16]
    ldp     x29, x30, [sp], #64
    ret

/* The EL0 stub, in the firmware's code (which the tables under test map executable at EL0: UXN
 * = 0, AP[1] = 0): EL0 of the EL2&0 regime branches to the probe's address (x0) and reports back
 * with SVC #0, which TGE = 1 takes to EL2 (lower_sync). */
    .balign 16
    .global el0_stub_fx
el0_stub_fx:
    blr     x0
    mov     x1, x0
    svc     #0
    b       .

/* ---------------------------------------------------------------------------------------- */
/* EL2 vectors. Each entry saves x0/x1 in TPIDR_EL2/TPIDR_EL0 (nothing else uses them), puts the
 * vector index in x1 and branches. Expected: an AT in an AT loop taking a data abort (its walk
 * read outside RAM), a data abort on an EL2 probe instruction (both current EL, SP_EL2), and the
 * EL1 stub returning or faulting during a stage-2 probe (lower EL). Everything else is reported
 * through fw_unexpected with the MMU off. */
.macro VEC idx, target
    .balign VECTOR_ENTRY_SIZE
    msr     tpidr_el2, x0
    msr     tpidr_el0, x1
    mov     x1, #\idx
    b       \target
.endm

    .balign VECTOR_TABLE_ALIGN
    .global el2_vectors
el2_vectors:
    VEC VEC_CUR_SP0_SYNC, unexpected
    VEC VEC_CUR_SP0_IRQ, unexpected
    VEC VEC_CUR_SP0_FIQ, unexpected
    VEC VEC_CUR_SP0_SERROR, unexpected
    VEC VEC_CUR_SPX_SYNC, el2_sync
    VEC VEC_CUR_SPX_IRQ, unexpected
    VEC VEC_CUR_SPX_FIQ, unexpected
    VEC VEC_CUR_SPX_SERROR, unexpected
    VEC VEC_LOWER_A64_SYNC, lower_sync
    VEC VEC_LOWER_A64_IRQ, unexpected
    VEC VEC_LOWER_A64_FIQ, unexpected
    VEC VEC_LOWER_A64_SERROR, unexpected
    VEC VEC_LOWER_A32_SYNC, unexpected
    VEC VEC_LOWER_A32_IRQ, unexpected
    VEC VEC_LOWER_A32_FIQ, unexpected
    VEC VEC_LOWER_A32_SERROR, unexpected

/* x0 = ELR_EL2: if it is at_insn_<name>, resume at at_store_<name> with the exception as the result. */
.macro AT_FIXUP name
    adr     x1, at_insn_\name
    cmp     x0, x1
    b.ne    8f
    adr     x1, at_store_\name
    b       at_exception
8:
.endm

el2_sync:
    mrs     x0, elr_el2
    AT_FIXUP s1e2r
    AT_FIXUP s1e2w
    AT_FIXUP s12e1r
    AT_FIXUP s12e1w
    AT_FIXUP s1e0r
    AT_FIXUP s1e0w
    adr     x1, s1_probe_ld     /* an EL2 probe instruction faulting? */
    cmp     x0, x1
    b.eq    1f
    adr     x1, s1_probe_st
    cmp     x0, x1
    b.eq    1f
    adr     x1, s1_probe_ldtr
    cmp     x0, x1
    b.eq    1f
    adr     x1, s1_probe_sttr
    cmp     x0, x1
    b.eq    1f
    adr     x1, s1_fetch_ret    /* a fetch probe's target raising an exception? */
    cmp     x30, x1
    b.ne    2f
    ldr     x1, =CODE_BASE      /* (never the firmware's own code) */
    sub     x0, x0, x1
    cmp     x0, #CODE_SIZE
    b.lo    2f
    mrs     x0, esr_el2
    str     x0, [x19, #ACCESS_RECORD_OFF_ESR]
    mrs     x0, far_el2
    str     x0, [x19, #ACCESS_RECORD_OFF_FAR]
    mrs     x0, hpfar_el2
    str     x0, [x19, #ACCESS_RECORD_OFF_HPFAR]
    mov     x0, #ACCESS_FAULT
    str     x0, [x19, #ACCESS_RECORD_OFF_STATUS]
    adr     x0, s1_fetch_next
    msr     elr_el2, x0
    mrs     x0, tpidr_el2
    mrs     x1, tpidr_el0
    eret
1:  mrs     x0, esr_el2
    ubfx    x1, x0, #ESR_EC_SHIFT, #ESR_EC_WIDTH
    cmp     x1, #EC_DABT_SAME
    b.ne    2f
    str     x0, [x19, #ACCESS_RECORD_OFF_ESR]
    mrs     x0, far_el2
    str     x0, [x19, #ACCESS_RECORD_OFF_FAR]
    mrs     x0, hpfar_el2
    str     x0, [x19, #ACCESS_RECORD_OFF_HPFAR]
    mov     x0, #ACCESS_FAULT
    str     x0, [x19, #ACCESS_RECORD_OFF_STATUS]
    mrs     x0, elr_el2
    add     x0, x0, #4
    msr     elr_el2, x0
    mrs     x0, tpidr_el2
    mrs     x1, tpidr_el0
    eret
2:  ldr     x0, =el2_sync_hook  /* a host of kernel code (firmware/kpgt) takes it from here */
    ldr     x0, [x0]
    cbz     x0, 4f
    br      x0
4:  mov     x1, #VEC_CUR_SPX_SYNC
    b       unexpected

/* An AT took a data abort (x1 = where to resume): x5 = the AT_EXCEPTION_TAG form of ESR_EL2
 * (stored by the loop as the probe's result), mailbox at_exceptions += 1. */
at_exception:
    mrs     x0, esr_el2
    ubfx    x0, x0, #ESR_EC_SHIFT, #ESR_EC_WIDTH
    cmp     x0, #EC_DABT_SAME
    b.ne    2b
    msr     elr_el2, x1
    mrs     x0, esr_el2
    ubfx    x0, x0, #0, #AT_EXCEPTION_ESR_WIDTH
    lsl     x0, x0, #AT_EXCEPTION_ESR_SHIFT
    orr     x0, x0, #AT_EXCEPTION_TAG
    orr     x5, x0, #PAR_F
    ldr     x0, =MAILBOX_BASE
    ldr     x1, [x0, #MB_OFF_AT_EXCEPTIONS]
    add     x1, x1, #1
    str     x1, [x0, #MB_OFF_AT_EXCEPTIONS]
    mrs     x0, tpidr_el2
    mrs     x1, tpidr_el0
    eret

lower_sync:                     /* EL1 stub: HVC #0 (done) or a stage-2 data abort */
    adrp    x0, s2_probing
    ldr     x0, [x0, :lo12:s2_probing]
    cbz     x0, 3f
    mrs     x0, esr_el2
    adrp    x1, s2_probing
    ldr     x1, [x1, :lo12:s2_probing]
    cmp     x1, #S2_PROBING_EL0_FETCH
    b.eq    5f
    ubfx    x1, x0, #ESR_EC_SHIFT, #ESR_EC_WIDTH
    cmp     x1, #EC_HVC64
    b.ne    1f
    tst     x0, #ISS_IMM16
    b.ne    4f
    mov     x0, #ACCESS_COMPLETED
    mrs     x1, tpidr_el0       /* the stub's x1: the value loaded, stored or returned */
    b       s2_resume
1:  cmp     x1, #EC_DABT_LOWER
    b.eq    2f
    cmp     x1, #EC_IABT_LOWER  /* a fetch probe's instruction abort, outside the stub's page */
    b.ne    3f
    adrp    x1, s2_probing
    ldr     x1, [x1, :lo12:s2_probing]
    cmp     x1, #S2_PROBING_FETCH
    b.ne    3f
    mrs     x1, elr_el2
    ldr     x0, =EL1_STUB_BASE
    sub     x1, x1, x0
    cmp     x1, #EL1_STUB_SIZE
    b.lo    3f
    mrs     x0, esr_el2
2:  str     x0, [x19, #ACCESS_RECORD_OFF_ESR]
    mrs     x0, far_el2
    str     x0, [x19, #ACCESS_RECORD_OFF_FAR]
    mrs     x0, hpfar_el2
    str     x0, [x19, #ACCESS_RECORD_OFF_HPFAR]
    mov     x0, #ACCESS_FAULT
    mrs     x1, tpidr_el0
    b       s2_resume
4:  and     x1, x0, #ISS_IMM16  /* an exception at EL1 from a fetch probe's code: recorded */
    cmp     x1, #MB_EL1_FORWARD_HVC
    b.ne    3f
    adrp    x1, s2_probing
    ldr     x1, [x1, :lo12:s2_probing]
    cmp     x1, #S2_PROBING_FETCH
    b.ne    3f
    mrs     x0, esr_el1
    str     x0, [x19, #ACCESS_RECORD_OFF_ESR]
    mrs     x0, far_el1
    str     x0, [x19, #ACCESS_RECORD_OFF_FAR]
    str     xzr, [x19, #ACCESS_RECORD_OFF_HPFAR]
    mov     x0, #ACCESS_EL1_EXCEPTION
    mov     x1, xzr
    b       s2_resume
3:  mov     x1, #VEC_LOWER_A64_SYNC
    b       unexpected
5:  ubfx    x1, x0, #ESR_EC_SHIFT, #ESR_EC_WIDTH  /* an EL0 fetch probe (x0 = ESR_EL2) */
    cmp     x1, #EC_SVC64
    b.ne    6f
    mov     x0, #ACCESS_COMPLETED  /* the code returned to the stub: x1 = the x0 it returned */
    mrs     x1, tpidr_el0
    b       s2_resume
6:  mrs     x1, elr_el2         /* anything else, unless the stub itself took it: recorded */
    adrp    x0, el0_stub_fx
    add     x0, x0, :lo12:el0_stub_fx
    sub     x1, x1, x0
    cmp     x1, #EL0_STUB_BYTES
    b.lo    3b
    mrs     x0, esr_el2
    b       2b

/* Unexpected: MMU off first (the code is identity mapped, so execution continues), then a
 * private stack, a panic frame, and C. x0/x1 are in TPIDR_EL2/TPIDR_EL0, x1 = vector index; the
 * interrupted SP goes through SP_EL0 (unused otherwise; TPIDR_EL1 would be TPIDR_EL2 with E2H = 1). */
unexpected:
    mrs     x0, sctlr_el2
    bic     x0, x0, #SCTLR_M
    bic     x0, x0, #SCTLR_C
    bic     x0, x0, #SCTLR_I
    msr     sctlr_el2, x0
    isb
    mov     x0, sp
    msr     sp_el0, x0
    adrp    x0, __panic_stack_top
    add     x0, x0, :lo12:__panic_stack_top
    mov     sp, x0
    sub     sp, sp, #PANIC_FRAME_SIZE
    stp     x2, x3, [sp, #(PANIC_FRAME_OFF_X + 8 * 2)]
    stp     x4, x5, [sp, #(PANIC_FRAME_OFF_X + 8 * 4)]
    stp     x6, x7, [sp, #(PANIC_FRAME_OFF_X + 8 * 6)]
    stp     x8, x9, [sp, #(PANIC_FRAME_OFF_X + 8 * 8)]
    stp     x10, x11, [sp, #(PANIC_FRAME_OFF_X + 8 * 10)]
    stp     x12, x13, [sp, #(PANIC_FRAME_OFF_X + 8 * 12)]
    stp     x14, x15, [sp, #(PANIC_FRAME_OFF_X + 8 * 14)]
    stp     x16, x17, [sp, #(PANIC_FRAME_OFF_X + 8 * 16)]
    stp     x18, x19, [sp, #(PANIC_FRAME_OFF_X + 8 * 18)]
    stp     x20, x21, [sp, #(PANIC_FRAME_OFF_X + 8 * 20)]
    stp     x22, x23, [sp, #(PANIC_FRAME_OFF_X + 8 * 22)]
    stp     x24, x25, [sp, #(PANIC_FRAME_OFF_X + 8 * 24)]
    stp     x26, x27, [sp, #(PANIC_FRAME_OFF_X + 8 * 26)]
    stp     x28, x29, [sp, #(PANIC_FRAME_OFF_X + 8 * 28)]
    str     x30, [sp, #(PANIC_FRAME_OFF_X + 8 * 30)]
    mrs     x2, tpidr_el2
    mrs     x3, tpidr_el0
    stp     x2, x3, [sp, #PANIC_FRAME_OFF_X]
    mrs     x2, sp_el0
    str     x2, [sp, #PANIC_FRAME_OFF_SP]
    mov     x0, sp
    bl      fw_unexpected       /* does not return: ends at panic */
    b       park
    .ltorg

/* ---------------------------------------------------------------------------------------- */
/* The EL1 stub: its own 64K page, mapped R+X by the stage-2 table under test. EL1 runs with its
 * MMU off; x0 holds the address to probe, x1 the value to store. */
    .section .el1stub, "ax"
    .balign VECTOR_TABLE_ALIGN
    .global el1_stub_ld
el1_stub_ld:
    ldr     x1, [x0]
    hvc     #0
    b       .
    .global el1_stub_st
el1_stub_st:
    str     x1, [x0]
    hvc     #0
    b       .
    .global el1_stub_fx
el1_stub_fx:                    /* fetch: the code at x0 returns here with its tag in x0 */
    blr     x0
    mov     x1, x0
    hvc     #0
    b       .

/* EL1 vectors: forward anything taken at EL1 to EL2 (reported there with ESR_EL1 etc.). */
.macro VEC1
    .balign VECTOR_ENTRY_SIZE
    hvc     #MB_EL1_FORWARD_HVC
    b       .
.endm
    .balign VECTOR_TABLE_ALIGN
    .global el1_vectors
el1_vectors:
    .rept 16
    VEC1
    .endr

    .bss
    .balign 8
    .global s2_probing
s2_probing:
    .quad 0
