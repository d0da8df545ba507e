/* pgtable-harness VMM: what the VMM and its guest code agree on (C and assembly).
 *
 * The guest (EL1, MMU off: IPA = address) runs a job table the VMM writes into guest memory:
 * entries of four 64-bit words {op, addr, count, stride}, at JOBS_IPA, x0 pointing at it, x1 at
 * MMIO_DONE. */
#ifndef VMM_GUEST_H
#define VMM_GUEST_H

#define OP_END 0   /* spin: a tight loop, the vCPU stays in the guest */
#define OP_READ 1  /* count loads from addr, addr + stride, ...; each must return its own address */
#define OP_WRITE 2 /* count stores of the address itself */
#define OP_EXEC 3  /* count branches (blr) to a planted ret */
#define OP_PROBE 4 /* count loads whose value is not checked (e.g. a deleted slot: an MMIO exit) */
#define OP_PHASE 5 /* one store of addr (a phase number) to MMIO_DONE: the VMM acts, then resumes */

#define JOB_SIZE 32
/* An IPA outside every memslot: stores there exit to the VMM (KVM_EXIT_MMIO). */
#define MMIO_DONE 0x10000000
/* MMIO_DONE + 8: the guest reports a load that did not return its address (data: the address). */
#define MMIO_BAD 0x10000008

#define RET_INSN 0xd65f03c0

#endif
