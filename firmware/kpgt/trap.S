/* pgtable-harness kernel-walker host: exception entry while a tree's pgtable.c runs, and the
 * setjmp/longjmp pair that ends an operation the C code cannot finish (BUG, a fault). */

    .text
/* Reached from el2_sync through el2_sync_hook (x0/x1 saved in TPIDR_EL2/TPIDR_EL0): save the
 * interrupted registers, let kpgt_exception decide (it returns to resume after a WARN, or
 * longjmps out of the operation), restore, eret. */
    .global kpgt_trap
    .type kpgt_trap, %function
kpgt_trap:
    sub     sp, sp, #256
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
    mov     x0, sp
    bl      kpgt_exception
    ldp     x0, x1, [sp]
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x19, [sp, #144]
    ldp     x20, x21, [sp, #160]
    ldp     x22, x23, [sp, #176]
    ldp     x24, x25, [sp, #192]
    ldp     x26, x27, [sp, #208]
    ldp     x28, x29, [sp, #224]
    ldr     x30, [sp, #240]
    add     sp, sp, #256
    eret

/* long kpgt_setjmp(u64 ctx[14]): 0 now, the longjmp value later. Saves x19..x30 and SP. */
    .global kpgt_setjmp
    .type kpgt_setjmp, %function
kpgt_setjmp:
    stp     x19, x20, [x0, #0]
    stp     x21, x22, [x0, #16]
    stp     x23, x24, [x0, #32]
    stp     x25, x26, [x0, #48]
    stp     x27, x28, [x0, #64]
    stp     x29, x30, [x0, #80]
    mov     x2, sp
    str     x2, [x0, #96]
    mov     x0, #0
    ret

/* void kpgt_longjmp(u64 ctx[14], long value): back to kpgt_setjmp's caller (also from the
 * exception handler: the same EL and stack pointer, with exceptions masked until the request
 * loop's next eret-free return to idle, which is what the firmware runs with anyway). */
    .global kpgt_longjmp
    .type kpgt_longjmp, %function
kpgt_longjmp:
    ldp     x19, x20, [x0, #0]
    ldp     x21, x22, [x0, #16]
    ldp     x23, x24, [x0, #32]
    ldp     x25, x26, [x0, #48]
    ldp     x27, x28, [x0, #64]
    ldp     x29, x30, [x0, #80]
    ldr     x2, [x0, #96]
    mov     sp, x2
    mov     x0, x1
    cmp     x0, #0
    cinc    x0, x0, eq
    ret
