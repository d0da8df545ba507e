/* pgtable-harness firmware: UART, request loop, regime installation, exception reports. */
#include <stdint.h>
#include "gen/arch.h"
#include "gen/layout.h"
#include "gen/mailbox.h"

typedef uint64_t u64;

#define FIELD_GET(f, v) (((v) >> f##_SHIFT) & ((1UL << f##_WIDTH) - 1))

#define READ_SYSREG(r) ({ u64 __v; __asm__ volatile("mrs %0, " #r : "=r"(__v)); __v; })
#define WRITE_SYSREG(r, v) __asm__ volatile("msr " #r ", %0" : : "r"((u64)(v)) : "memory")
#define ISB() __asm__ volatile("isb" : : : "memory")
#define DSB(opt) __asm__ volatile("dsb " #opt : : : "memory")

static struct mailbox *const mb = (struct mailbox *)MAILBOX_BASE;
struct mailbox *const fw_mailbox = (struct mailbox *)MAILBOX_BASE; /* for a linked-in host (firmware/kpgt) */

/* A host of kernel code linked in (firmware/kpgt/host.c) serves the commands this file does not. */
extern u64 kpgt_serve(u64 cmd) __attribute__((weak));

extern void idle(void);
extern void panic(void) __attribute__((noreturn));
extern void park(void) __attribute__((noreturn));
extern void at_loop_s1e2r(const u64 *, u64 *, u64);
extern void at_loop_s1e2w(const u64 *, u64 *, u64);
extern void at_loop_s12e1r(const u64 *, u64 *, u64);
extern void at_loop_s12e1w(const u64 *, u64 *, u64);
extern void at_loop_s1e0r(const u64 *, u64 *, u64);
extern void at_loop_s1e0w(const u64 *, u64 *, u64);
extern void s1_access_loop(const u64 *, struct access_record *, u64, u64, const u64 *);
extern void s2_access_loop(const u64 *, struct access_record *, u64, u64, const u64 *);
extern void s1_fetch_loop(const u64 *, struct access_record *, u64);
extern char el1_vectors[];

/* ---- PL011 ---------------------------------------------------------------------------- */
#define UART_DR (*(volatile uint32_t *)(UART_BASE + 0x00))
#define UART_FR (*(volatile uint32_t *)(UART_BASE + 0x18))
#define UART_FR_TXFF (1u << 5)

static void putc_(char c)
{
    while (UART_FR & UART_FR_TXFF)
        ;
    UART_DR = (uint32_t)(unsigned char)c;
}

static void puts_(const char *s)
{
    for (; *s; s++) {
        if (*s == '\n')
            putc_('\r');
        putc_(*s);
    }
}

static void puthex(u64 v)
{
    static const char digits[] = "0123456789abcdef";
    puts_("0x");
    for (int shift = 60; shift >= 0; shift -= 4)
        putc_(digits[(v >> shift) & 0xf]);
}

static void putkv(const char *k, u64 v)
{
    puts_(k);
    puts_("=");
    puthex(v);
    puts_(" ");
}

/* ---- regimes ---------------------------------------------------------------------------- */
static void tlbi_el2_regime(void)
{
    DSB(ish);
    __asm__ volatile("tlbi alle2" ::: "memory"); /* the EL2 (E2H = 0) or EL2&0 (E2H = 1) regime */
    DSB(ish);
    ISB();
}

static void stage1_off(void)
{
    /* WXN too: attach's replay sets it (the live snapshot's), the next install may not */
    WRITE_SYSREG(sctlr_el2, READ_SYSREG(sctlr_el2) & ~(SCTLR_M | SCTLR_C | SCTLR_I | SCTLR_WXN));
    ISB();
    tlbi_el2_regime();
    if (READ_SYSREG(hcr_el2) & HCR_E2H) { /* back to the EL2 regime, and drop what it cached */
        WRITE_SYSREG(hcr_el2, READ_SYSREG(hcr_el2) & ~HCR_E2H);
        ISB();
        tlbi_el2_regime();
    }
}

static void stage2_off(void)
{
    u64 hcr = READ_SYSREG(hcr_el2);
    WRITE_SYSREG(hcr_el2, hcr & ~(HCR_VM | HCR_DC));
    ISB();
    DSB(ish);
    __asm__ volatile("tlbi alle1is" ::: "memory");
    DSB(ish);
    ISB();
}

/* Whatever was installed goes first, exactly as UNINSTALL does it: an install is a swap. */
static void uninstall(void)
{
    stage1_off();
    stage2_off();
}

void fw_stage1_off(void); /* for a linked-in host: its own EL2 map goes, a live stage 2 stays */
void fw_stage1_off(void)
{
    stage1_off();
}

void fw_uninstall(void); /* the same, for a linked-in host */
void fw_uninstall(void)
{
    uninstall();
}

/* hcr_set: HCR_EL2.E2H for the EL2&0 regime (hVHE), set before TCR_EL2 (read in its E2H = 1 layout);
 * ttbr1: that regime's upper range (TCR_EL2.EPD1 = 0 walks it), none without E2H. */
static u64 install_s1(u64 mair, u64 tcr, u64 ttbr0, u64 sctlr_set, u64 hcr_set, u64 ttbr1)
{
    if (hcr_set & ~HCR_E2H || (ttbr1 && !(hcr_set & HCR_E2H)))
        return STATUS_BAD_ARG;
    uninstall();
    if (hcr_set) {
        WRITE_SYSREG(hcr_el2, READ_SYSREG(hcr_el2) | hcr_set);
        ISB();
    }
    WRITE_SYSREG(mair_el2, mair);
    WRITE_SYSREG(tcr_el2, tcr);
    WRITE_SYSREG(ttbr0_el2, ttbr0);
    if (hcr_set)
        WRITE_SYSREG(s3_4_c2_c0_1, ttbr1); /* TTBR1_EL2 (FEAT_VHE: not in -march=armv8-a's names) */
    ISB();
    tlbi_el2_regime();
    WRITE_SYSREG(sctlr_el2, READ_SYSREG(sctlr_el2) | sctlr_set);
    ISB();
    return STATUS_OK;
}

static void install_s2(u64 vtcr, u64 vttbr, u64 hcr_set)
{
    uninstall(); /* E2H = 0 after it: the *_el1 writes below must reach EL1's registers */
    WRITE_SYSREG(vtcr_el2, vtcr);
    WRITE_SYSREG(vttbr_el2, vttbr);
    WRITE_SYSREG(sctlr_el1, SCTLR_EL1_RES1); /* EL1 MMU, caches, alignment checks off */
    WRITE_SYSREG(vbar_el1, (u64)el1_vectors);
    ISB();
    WRITE_SYSREG(hcr_el2, READ_SYSREG(hcr_el2) | hcr_set);
    ISB();
    DSB(ishst);
    __asm__ volatile("tlbi vmalls12e1is" ::: "memory");
    DSB(ish);
    ISB();
}

/* ---- requests ---------------------------------------------------------------------------- */
static int in_buffer(u64 pa, u64 len, u64 base, u64 size)
{
    return pa >= base && len <= size && pa - base <= size - len && (pa & 7) == 0;
}

/* AT_S1E2RW / AT_S12E1RW / AT_S1E0RW: the read form over the first n addresses, then the write
 * form over the next n2 (arg4), results in the same order: both forms in one request; arg5 = 1:
 * then uninstall (as UNINSTALL does), so the last probe of a table needs no request of its own.
 * The EL0 forms (AT S1E0R/W) need the EL2&0 regime installed (HCR_EL2.E2H) and run with
 * HCR_EL2.TGE = 1, so that they translate as EL0 of EL2&0, not of EL1&0. */
static int at_el0(u64 op)
{
    return op == AT_S1E0R || op == AT_S1E0W || op == AT_S1E0RW;
}

static void at_loops(u64 op, const u64 *a, u64 *r, u64 n, u64 n2)
{
    switch (op) {
    case AT_S1E2R: at_loop_s1e2r(a, r, n); break;
    case AT_S1E2W: at_loop_s1e2w(a, r, n); break;
    case AT_S12E1R: at_loop_s12e1r(a, r, n); break;
    case AT_S12E1W: at_loop_s12e1w(a, r, n); break;
    case AT_S1E0R: at_loop_s1e0r(a, r, n); break;
    case AT_S1E0W: at_loop_s1e0w(a, r, n); break;
    case AT_S1E2RW:
        at_loop_s1e2r(a, r, n);
        at_loop_s1e2w(a + n, r + n, n2);
        break;
    case AT_S12E1RW:
        at_loop_s12e1r(a, r, n);
        at_loop_s12e1w(a + n, r + n, n2);
        break;
    case AT_S1E0RW:
        at_loop_s1e0r(a, r, n);
        at_loop_s1e0w(a + n, r + n, n2);
        break;
    }
}

static u64 do_at(void)
{
    u64 op = mb->arg[0], n = mb->arg[1], src = mb->arg[2], dst = mb->arg[3];
    int paired = op == AT_S1E2RW || op == AT_S12E1RW || op == AT_S1E0RW;
    u64 n2 = paired ? mb->arg[4] : 0, then_uninstall = paired ? mb->arg[5] : 0;
    u64 total = n + n2, hcr = READ_SYSREG(hcr_el2);
    if (op > AT_S1E0RW || n > PROBE_ADDRS_SIZE / 8 || n2 > PROBE_ADDRS_SIZE / 8 || then_uninstall > 1 ||
        !in_buffer(src, total * 8, PROBE_ADDRS_BASE, PROBE_ADDRS_SIZE) ||
        !in_buffer(dst, total * 8, PROBE_RESULTS_BASE, PROBE_RESULTS_SIZE) ||
        (at_el0(op) && !(hcr & HCR_E2H)))
        return STATUS_BAD_ARG;
    if (at_el0(op)) {
        WRITE_SYSREG(hcr_el2, hcr | HCR_TGE);
        ISB();
    }
    at_loops(op, (const u64 *)src, (u64 *)dst, n, n2);
    if (at_el0(op)) {
        WRITE_SYSREG(hcr_el2, hcr);
        ISB();
    }
    if (then_uninstall)
        uninstall();
    mb->ret0 = total;
    return STATUS_OK;
}

/* arg0 write: 0 loads, 1 stores, 2 both: loads over the first n addresses, then stores over the
 * next n2 (arg6), records and values in the same order. */
static u64 do_access(void)
{
    u64 write = mb->arg[0], stage = mb->arg[1], n = mb->arg[2], src = mb->arg[3], dst = mb->arg[4];
    u64 vals = mb->arg[5], n2 = write == 2 ? mb->arg[6] : 0, total = n + n2;
    if (n > PROBE_ADDRS_SIZE / 8 || n2 > PROBE_ADDRS_SIZE / 8 ||
        !in_buffer(src, total * 8, PROBE_ADDRS_BASE, PROBE_ADDRS_SIZE) ||
        !in_buffer(vals, total * 8, PROBE_ADDRS_BASE, PROBE_ADDRS_SIZE) ||
        !in_buffer(dst, total * ACCESS_RECORD_SIZE, PROBE_RESULTS_BASE, PROBE_RESULTS_SIZE) || write > 2)
        return STATUS_BAD_ARG;
    const u64 *a = (const u64 *)src, *v = (const u64 *)vals;
    struct access_record *r = (struct access_record *)dst;
    if (stage == 1) {
        s1_access_loop(a, r, n, write & 1, v);
        if (write == 2)
            s1_access_loop(a + n, r + n, n2, 1, v + n);
    } else if (stage == ACCESS_AT_EL0) { /* ldtr/sttr with E2H = TGE = 1: EL0's accesses in EL2&0 */
        u64 hcr = READ_SYSREG(hcr_el2);
        if (!(hcr & HCR_E2H))
            return STATUS_BAD_ARG;
        WRITE_SYSREG(hcr_el2, hcr | HCR_TGE);
        ISB();
        s1_access_loop(a, r, n, 2 + (write & 1), v);
        if (write == 2)
            s1_access_loop(a + n, r + n, n2, 3, v + n);
        WRITE_SYSREG(hcr_el2, hcr);
        ISB();
    } else if (stage == 2) {
        if (READ_SYSREG(hcr_el2) & HCR_E2H) /* the EL1 stub needs the EL1&0 regime */
            return STATUS_BAD_ARG;
        WRITE_SYSREG(hcr_el2, READ_SYSREG(hcr_el2) | HCR_RW);
        ISB();
        s2_access_loop(a, r, n, write & 1, v);
        if (write == 2)
            s2_access_loop(a + n, r + n, n2, 1, v + n);
    } else {
        return STATUS_BAD_ARG;
    }
    mb->ret0 = total;
    return STATUS_OK;
}

/* Instruction fetches: the host planted the code behind QEMU's back (through the shared RAM file),
 * so drop whatever instruction cache state the architecture allows (QEMU: a no-op, its TCG keys
 * translated code by physical address and checks execute permission on each TLB fill). */
static void invalidate_icache(void)
{
    DSB(ish);
    __asm__ volatile("ic iallu" ::: "memory");
    DSB(nsh);
    ISB();
}

static u64 do_fetch(void)
{
    u64 stage = mb->arg[0], n = mb->arg[1], src = mb->arg[2], dst = mb->arg[3];
    if (n > PROBE_ADDRS_SIZE / 8 || !in_buffer(src, n * 8, PROBE_ADDRS_BASE, PROBE_ADDRS_SIZE) ||
        !in_buffer(dst, n * ACCESS_RECORD_SIZE, PROBE_RESULTS_BASE, PROBE_RESULTS_SIZE))
        return STATUS_BAD_ARG;
    invalidate_icache();
    if (stage == 1) {
        s1_fetch_loop((const u64 *)src, (struct access_record *)dst, n);
    } else if (stage == 2) {
        if (READ_SYSREG(hcr_el2) & HCR_E2H) /* the EL1 stub needs the EL1&0 regime */
            return STATUS_BAD_ARG;
        WRITE_SYSREG(hcr_el2, READ_SYSREG(hcr_el2) | HCR_RW);
        ISB();
        /* mode 2: the stub branches to each address (the values buffer is read and ignored) */
        s2_access_loop((const u64 *)src, (struct access_record *)dst, n, 2, (const u64 *)src);
    } else if (stage == ACCESS_AT_EL0) { /* EL0 of EL2&0: eret to the EL0 stub with TGE = 1 */
        u64 hcr = READ_SYSREG(hcr_el2);
        if (!(hcr & HCR_E2H))
            return STATUS_BAD_ARG;
        WRITE_SYSREG(hcr_el2, hcr | HCR_TGE);
        ISB();
        s2_access_loop((const u64 *)src, (struct access_record *)dst, n, 3, (const u64 *)src);
        /* An exception taken from EL0 to EL2 with {E2H, TGE} = {1, 1} sets PSTATE.PAN (SCTLR_EL2.SPAN
         * = 0): clear it, or EL2's own accesses to EL0-accessible pages would fault from now on.
         * (E2H needs FEAT_VHE, Armv8.1, which has FEAT_PAN; the register is PAN, s3_0_c4_c2_3.) */
        __asm__ volatile("msr s3_0_c4_c2_3, xzr" ::: "memory");
        WRITE_SYSREG(hcr_el2, hcr);
        ISB();
    } else {
        return STATUS_BAD_ARG;
    }
    mb->ret0 = n;
    return STATUS_OK;
}

/* A live table update's invalidations: the steps in order, each one instruction on the installed
 * regime (the host writes the descriptors into guest RAM between requests, while this vCPU waits). */
#define TLBI_OP(op, x) __asm__ volatile("tlbi " #op ", %0" : : "r"(x) : "memory")
#define TLBI_ALL(op) __asm__ volatile("tlbi " #op : : : "memory")

static u64 do_live(void)
{
    u64 n = mb->arg[0], src = mb->arg[1];
    if (n > PROBE_ADDRS_SIZE / LIVE_STEP_SIZE ||
        !in_buffer(src, n * LIVE_STEP_SIZE, PROBE_ADDRS_BASE, PROBE_ADDRS_SIZE))
        return STATUS_BAD_ARG;
    const struct live_step *st = (const struct live_step *)src;
    for (u64 i = 0; i < n; i++) {
        u64 x = st[i].a0;
        switch (st[i].insn) {
        case LIVE_DSB_ISHST: DSB(ishst); break;
        case LIVE_DSB_ISH: DSB(ish); break;
        case LIVE_DSB_NSHST: DSB(nshst); break;
        case LIVE_DSB_NSH: DSB(nsh); break;
        case LIVE_ISB: ISB(); break;
        case LIVE_TLBI_IPAS2E1IS: TLBI_OP(ipas2e1is, x); break;
        case LIVE_TLBI_IPAS2E1: TLBI_OP(ipas2e1, x); break;
        case LIVE_TLBI_IPAS2LE1IS: TLBI_OP(ipas2le1is, x); break;
        case LIVE_TLBI_VMALLE1IS: TLBI_ALL(vmalle1is); break;
        case LIVE_TLBI_VMALLE1: TLBI_ALL(vmalle1); break;
        case LIVE_TLBI_VMALLS12E1IS: TLBI_ALL(vmalls12e1is); break;
        case LIVE_TLBI_VAE2IS: TLBI_OP(vae2is, x); break;
        case LIVE_TLBI_VALE2IS: TLBI_OP(vale2is, x); break;
        case LIVE_TLBI_ALLE2IS: TLBI_ALL(alle2is); break;
        default:
            mb->ret0 = i;
            return STATUS_BAD_ARG;
        }
    }
    mb->ret0 = n;
    return STATUS_OK;
}

static u64 serve(u64 cmd)
{
    switch (cmd) {
    case CMD_NOP:
        return STATUS_OK;
    case CMD_INSTALL_S1:
        return install_s1(mb->arg[0], mb->arg[1], mb->arg[2], mb->arg[3], mb->arg[4], mb->arg[5]);
    case CMD_INSTALL_S2:
        install_s2(mb->arg[0], mb->arg[1], mb->arg[2]);
        return STATUS_OK;
    case CMD_UNINSTALL:
        uninstall();
        return STATUS_OK;
    case CMD_AT:
        return do_at();
    case CMD_ACCESS:
        return do_access();
    case CMD_FETCH:
        return do_fetch();
    case CMD_LIVE:
        return do_live();
    case CMD_SPIN:
        for (;;)
            __asm__ volatile("" ::: "memory");
    default:
        return kpgt_serve ? kpgt_serve(cmd) : STATUS_BAD_CMD;
    }
}

static void __attribute__((noreturn)) request_loop(void)
{
    for (;;) {
        idle();
        u64 cmd = mb->cmd;
        mb->requests = mb->requests + 1;
        mb->ret0 = 0;
        mb->ret1 = 0;
        mb->status = serve(cmd);
    }
}

void fw_main(u64 current_el)
{
    mb->magic = 0;
    mb->boot_el = current_el;
    if (current_el != 2) {
        puts_("pgtable-harness firmware: entered at EL");
        putc_((char)('0' + current_el));
        puts_(", expected EL2 (QEMU needs -M virt,virtualization=on); parked\n");
        mb->panic_vector = MB_VECTOR_NOT_EL2;
        mb->panic_count = mb->panic_count + 1;
        panic();
        park();
    }
    mb->version = MB_VERSION;
    mb->status = STATUS_IDLE;
    mb->magic = MB_MAGIC;
    puts_("pgtable-harness firmware: EL2, mailbox ");
    puthex(MAILBOX_BASE);
    puts_(", ready\n");
    request_loop();
}

/* The registers at the exception (the vector saved them); the MMU is already off. */
void fw_unexpected(struct panic_frame *frame, u64 vector)
{
    u64 esr = READ_SYSREG(esr_el2);
    mb->panic_vector = vector;
    mb->panic_esr = esr;
    mb->panic_far = READ_SYSREG(far_el2);
    mb->panic_elr = READ_SYSREG(elr_el2);
    mb->panic_spsr = READ_SYSREG(spsr_el2);
    mb->panic_hpfar = READ_SYSREG(hpfar_el2);
    mb->panic_sctlr = READ_SYSREG(sctlr_el2);
    mb->panic_hcr = READ_SYSREG(hcr_el2);
    mb->panic_sp = frame->sp;
    mb->panic_esr_el1 = READ_SYSREG(esr_el1);
    mb->panic_far_el1 = READ_SYSREG(far_el1);
    mb->panic_elr_el1 = READ_SYSREG(elr_el1);
    if (vector == VEC_LOWER_A64_SYNC && FIELD_GET(ESR_EC, esr) == EC_HVC64 &&
        FIELD_GET(ISS_IMM16, esr) == MB_EL1_FORWARD_HVC)
        mb->panic_vector = MB_VECTOR_EL1_FORWARDED;
    for (int i = 0; i < 31; i++)
        mb->panic_x[i] = frame->x[i];
    mb->panic_count = mb->panic_count + 1;
    puts_("\npgtable-harness firmware: UNEXPECTED EXCEPTION\n");
    putkv("vector", mb->panic_vector);
    putkv("ESR_EL2", esr);
    putkv("FAR_EL2", mb->panic_far);
    putkv("ELR_EL2", mb->panic_elr);
    puts_("\n");
    putkv("SPSR_EL2", mb->panic_spsr);
    putkv("HPFAR_EL2", mb->panic_hpfar);
    putkv("SP", mb->panic_sp);
    puts_("\n");
    panic();
}
