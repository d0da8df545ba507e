/* pgtable-harness VMM: process entry, memset/memcpy (the compiler may call them), and the guest
 * code (AArch64, EL1, MMU off), kept as data and copied into guest memory by the VMM. */
#include "guest.h"

    .text
    .global _start
    .type _start, %function
_start:
    mov     x29, #0
    mov     x30, #0
    mov     x0, sp              /* argc, argv..., envp... */
    and     sp, x0, #~15
    bl      vmm_main
1:  b       1b                  /* vmm_main never returns: PID 1 must not exit */
    .size _start, . - _start

    .global memset
    .type memset, %function
memset:                         /* x0 dst, w1 byte, x2 n; returns dst */
    mov     x3, x0
    cbz     x2, 2f
1:  strb    w1, [x3], #1
    subs    x2, x2, #1
    b.ne    1b
2:  ret
    .size memset, . - memset

    .global memcpy
    .type memcpy, %function
memcpy:                         /* x0 dst, x1 src, x2 n; returns dst */
    mov     x3, x0
    cbz     x2, 2f
1:  ldrb    w4, [x1], #1
    strb    w4, [x3], #1
    subs    x2, x2, #1
    b.ne    1b
2:  ret
    .size memcpy, . - memcpy

/* The guest: x0 = the job table, x1 = MMIO_DONE. Position independent. */
    .section .rodata.guest, "a"
    .balign 8
    .global guest_code
    .global guest_code_end
guest_code:
next:
    ldp     x2, x3, [x0], #16   /* op, addr */
    ldp     x4, x5, [x0], #16   /* count, stride */
    cmp     x2, #OP_READ
    b.eq    read
    cmp     x2, #OP_WRITE
    b.eq    write
    cmp     x2, #OP_EXEC
    b.eq    exec
    cmp     x2, #OP_PROBE
    b.eq    probe
    cmp     x2, #OP_PHASE
    b.eq    phase
spin:
    b       spin
read:
    cbz     x4, next
    ldr     x6, [x3]
    cmp     x6, x3
    b.ne    bad
    add     x3, x3, x5
    sub     x4, x4, #1
    b       read
write:
    cbz     x4, next
    str     x3, [x3]
    add     x3, x3, x5
    sub     x4, x4, #1
    b       write
exec:
    cbz     x4, next
    blr     x3
    add     x3, x3, x5
    sub     x4, x4, #1
    b       exec
probe:
    cbz     x4, next
    ldr     x6, [x3]
    add     x3, x3, x5
    sub     x4, x4, #1
    b       probe
phase:
    str     x3, [x1]
    b       next
bad:
    str     x3, [x1, #8]        /* MMIO_BAD */
    b       spin
guest_code_end:

    .section .note.GNU-stack, "", %progbits
