/* pgtable-harness firmware: entry, EL2 vectors, probe loops, EL1 stub.
 * Entered at EL2 (QEMU virt, virtualization=on) with the MMU off. */
#include "gen/layout.h"
#include "gen/mailbox.h"

#define SPSR_EL1H_DAIF 0x3c5
#define EC_HVC64 0x16
#define EC_DABT_LOWER 0x24
#define EC_DABT_SAME 0x25
#define SCTLR_MCI ((1 << 0) | (1 << 2) | (1 << 12))

    .section .text.start, "ax"
    .global _start
_start:
    adrp    x0, __stack_top
    add     x0, x0, :lo12:__stack_top
    mov     sp, x0
    mrs     x0, CurrentEL
    lsr     x0, x0, #2
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

    .section .hostbp, "ax"
/* The host's hardware breakpoint: the firmware is idle, waiting for a request. */
    .global idle
    .type idle, %function
idle:
    nop
    ret

/* Reached after an unexpected exception has been reported (host breakpoint); parks. */
    .global panic
    .type panic, %function
panic:
    nop

    .global park
park:
    wfi
    b       park

    .text
/* u64 at_loop_<op>(const u64 *addrs, u64 *out, u64 count) */
.macro AT_LOOP name, op
    .global at_loop_\name
    .type at_loop_\name, %function
at_loop_\name:
    cbz     x2, 2f
1:  ldr     x4, [x0], #8
    at      \op, x4
    isb
    mrs     x5, par_el1
    str     x5, [x1], #8
    subs    x2, x2, #1
    b.ne    1b
2:  ret
.endm
    AT_LOOP s1e2r, s1e2r
    AT_LOOP s1e2w, s1e2w
    AT_LOOP s12e1r, s12e1r
    AT_LOOP s12e1w, s12e1w

/* void s1_access_loop(const u64 *addrs, u64 *records, u64 count, u64 write)
 * Loads or stores at EL2 through the installed stage 1. A data abort on the probe instruction is
 * recorded by the vector (x19 = current record) and the instruction skipped. */
    .global s1_access_loop
    .type s1_access_loop, %function
s1_access_loop:
    stp     x19, x20, [sp, #-32]!
    stp     x21, x22, [sp, #16]
    mov     x19, x1
    mov     x20, x0
    mov     x21, x2
    cbnz    x3, 5f
1:  cbz     x21, 9f
    ldr     x0, [x20], #8
    mov     x1, #ACCESS_COMPLETED
    stp     x1, xzr, [x19]
    stp     xzr, xzr, [x19, #16]
    .global s1_probe_ld
s1_probe_ld:
    ldrb    w1, [x0]
    add     x19, x19, #ACCESS_RECORD_SIZE
    sub     x21, x21, #1
    b       1b
5:  cbz     x21, 9f
    ldr     x0, [x20], #8
    mov     x1, #ACCESS_COMPLETED
    stp     x1, xzr, [x19]
    stp     xzr, xzr, [x19, #16]
    .global s1_probe_st
s1_probe_st:
    strb    w0, [x0]
    add     x19, x19, #ACCESS_RECORD_SIZE
    sub     x21, x21, #1
    b       5b
9:  ldp     x21, x22, [sp, #16]
    ldp     x19, x20, [sp], #32
    ret

/* void s2_access_loop(const u64 *addrs, u64 *records, u64 count, u64 write)
 * For each address: eret into the EL1 stub (x0 = address), which accesses it and issues HVC #0;
 * a stage-2 fault arrives as a lower-EL data abort. Both come back through the lower-EL sync
 * vector to s2_resume with x19..x23 intact (EL1 only touches x0/x1). */
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
    adrp    x22, el1_stub_ld
    add     x22, x22, :lo12:el1_stub_ld
    cbz     x3, 1f
    adrp    x22, el1_stub_st
    add     x22, x22, :lo12:el1_stub_st
1:  adrp    x23, s2_probing
    add     x23, x23, :lo12:s2_probing
    mov     x1, #1
    str     x1, [x23]
s2_next:
    cbz     x21, 9f
    ldr     x0, [x20], #8
    stp     xzr, xzr, [x19]
    stp     xzr, xzr, [x19, #16]
    msr     elr_el2, x22
    mov     x1, #SPSR_EL1H_DAIF
    msr     spsr_el2, x1
    eret
    .global s2_resume
s2_resume:                      /* x0 = status, from the lower-EL sync vector */
    str     x0, [x19], #ACCESS_RECORD_SIZE
    sub     x21, x21, #1
    b       s2_next
9:  str     xzr, [x23]
    ldp     x23, x24, [sp, #48]
    ldp     x21, x22, [sp, #32]
    ldp     x19, x20, [sp, #16]
    ldp     x29, x30, [sp], #64
    ret

/* u64 read_current_el(void) etc. are in C with inline asm. */

/* ---------------------------------------------------------------------------------------- */
/* EL2 vectors. Each entry saves x0/x1 in TPIDR_EL2/TPIDR_EL0 (nothing else uses them), puts the
 * vector index in x1 and branches. Only two cases are expected: a data abort on an EL2 probe
 * instruction (index 4) and the EL1 stub returning or faulting during a stage-2 probe (index 8).
 * Everything else is reported through fw_unexpected with the MMU off. */
.macro VEC idx, target
    .balign 0x80
    msr     tpidr_el2, x0
    msr     tpidr_el0, x1
    mov     x1, #\idx
    b       \target
.endm

    .balign 0x800
    .global el2_vectors
el2_vectors:
    VEC 0, unexpected
    VEC 1, unexpected
    VEC 2, unexpected
    VEC 3, unexpected
    VEC 4, el2_sync
    VEC 5, unexpected
    VEC 6, unexpected
    VEC 7, unexpected
    VEC 8, lower_sync
    VEC 9, unexpected
    VEC 10, unexpected
    VEC 11, unexpected
    VEC 12, unexpected
    VEC 13, unexpected
    VEC 14, unexpected
    VEC 15, unexpected

el2_sync:                       /* an EL2 probe instruction faulting? */
    mrs     x0, elr_el2
    adr     x1, s1_probe_ld
    cmp     x0, x1
    b.eq    1f
    adr     x1, s1_probe_st
    cmp     x0, x1
    b.ne    2f
1:  mrs     x0, esr_el2
    lsr     x1, x0, #26
    cmp     x1, #EC_DABT_SAME
    b.ne    2f
    str     x0, [x19, #ACCESS_OFF_ESR]
    mrs     x0, far_el2
    str     x0, [x19, #ACCESS_OFF_FAR]
    mrs     x0, hpfar_el2
    str     x0, [x19, #ACCESS_OFF_HPFAR]
    mov     x0, #ACCESS_FAULT
    str     x0, [x19, #ACCESS_OFF_STATUS]
    mrs     x0, elr_el2
    add     x0, x0, #4
    msr     elr_el2, x0
    mrs     x0, tpidr_el2
    mrs     x1, tpidr_el0
    eret
2:  mov     x1, #4
    b       unexpected

lower_sync:                     /* EL1 stub: HVC #0 (done) or a stage-2 data abort */
    adrp    x0, s2_probing
    ldr     x0, [x0, :lo12:s2_probing]
    cbz     x0, 3f
    mrs     x0, esr_el2
    lsr     x1, x0, #26
    cmp     x1, #EC_HVC64
    b.ne    1f
    tst     x0, #0xffff         /* HVC immediate */
    b.ne    3f
    mov     x0, #ACCESS_COMPLETED
    b       s2_resume
1:  cmp     x1, #EC_DABT_LOWER
    b.ne    3f
    str     x0, [x19, #ACCESS_OFF_ESR]
    mrs     x0, far_el2
    str     x0, [x19, #ACCESS_OFF_FAR]
    mrs     x0, hpfar_el2
    str     x0, [x19, #ACCESS_OFF_HPFAR]
    mov     x0, #ACCESS_FAULT
    b       s2_resume
3:  mov     x1, #8
    b       unexpected

/* Unexpected: MMU off first (the code is identity mapped, so execution continues), then a
 * private stack, a full frame, and C. x0/x1 are in TPIDR_EL2/TPIDR_EL0, x1 = vector index. */
unexpected:
    mrs     x0, sctlr_el2
    bic     x0, x0, #(1 << 0)
    bic     x0, x0, #(1 << 2)
    bic     x0, x0, #(1 << 12)
    msr     sctlr_el2, x0
    isb
    mov     x0, sp
    msr     tpidr_el1, x0       /* the interrupted SP */
    adrp    x0, __panic_stack_top
    add     x0, x0, :lo12:__panic_stack_top
    mov     sp, x0
    sub     sp, sp, #(32 * 8)
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
    str     x30, [sp, #240]
    mrs     x2, tpidr_el2
    mrs     x3, tpidr_el0
    stp     x2, x3, [sp]
    mrs     x2, tpidr_el1
    str     x2, [sp, #248]      /* frame[31] = interrupted SP */
    mov     x0, sp
    bl      fw_unexpected       /* does not return: ends at panic */
    b       park

/* ---------------------------------------------------------------------------------------- */
/* The EL1 stub: its own 64K page, mapped R+X by the stage-2 table under test. EL1 runs with its
 * MMU off; x0 holds the address to probe. */
    .section .el1stub, "ax"
    .balign 0x800
    .global el1_stub_ld
el1_stub_ld:
    ldrb    w1, [x0]
    hvc     #0
    b       .
    .global el1_stub_st
el1_stub_st:
    strb    w0, [x0]
    hvc     #0
    b       .

/* EL1 vectors: forward anything taken at EL1 to EL2 (reported there with ESR_EL1 etc.). */
.macro VEC1
    .balign 0x80
    hvc     #MB_EL1_FORWARD_HVC
    b       .
.endm
    .balign 0x800
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
