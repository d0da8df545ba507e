/* pgtable-harness firmware: UART, request loop, regime installation, exception reports. */
#include <stdint.h>
#include "gen/layout.h"
#include "gen/mailbox.h"

typedef uint64_t u64;

#define SCTLR_M (1UL << 0)
#define SCTLR_C (1UL << 2)
#define SCTLR_I (1UL << 12)
/* SCTLR_EL1 RES1 bits in Armv8.0 (later features give them meanings; 1 is their safe value). */
#define SCTLR_EL1_RES1 ((1UL << 29) | (1UL << 28) | (1UL << 23) | (1UL << 22) | (1UL << 20) | (1UL << 11))
#define HCR_VM (1UL << 0)
#define HCR_DC (1UL << 12)
#define HCR_RW (1UL << 31)

#define READ_SYSREG(r) ({ u64 __v; __asm__ volatile("mrs %0, " #r : "=r"(__v)); __v; })
#define WRITE_SYSREG(r, v) __asm__ volatile("msr " #r ", %0" : : "r"((u64)(v)) : "memory")
#define ISB() __asm__ volatile("isb" : : : "memory")
#define DSB(opt) __asm__ volatile("dsb " #opt : : : "memory")

static struct mailbox *const mb = (struct mailbox *)MAILBOX_BASE;

extern void idle(void);
extern void panic(void) __attribute__((noreturn));
extern void park(void) __attribute__((noreturn));
extern void at_loop_s1e2r(const u64 *, u64 *, u64);
extern void at_loop_s1e2w(const u64 *, u64 *, u64);
extern void at_loop_s12e1r(const u64 *, u64 *, u64);
extern void at_loop_s12e1w(const u64 *, u64 *, u64);
extern void s1_access_loop(const u64 *, u64 *, u64, u64);
extern void s2_access_loop(const u64 *, u64 *, u64, u64);
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
static void stage1_off(void)
{
    u64 sctlr = READ_SYSREG(sctlr_el2);
    WRITE_SYSREG(sctlr_el2, sctlr & ~(SCTLR_M | SCTLR_C | SCTLR_I));
    ISB();
    DSB(ish);
    __asm__ volatile("tlbi alle2" ::: "memory");
    DSB(ish);
    ISB();
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

static void install_s1(u64 mair, u64 tcr, u64 ttbr0, u64 sctlr_set)
{
    stage1_off();
    WRITE_SYSREG(mair_el2, mair);
    WRITE_SYSREG(tcr_el2, tcr);
    WRITE_SYSREG(ttbr0_el2, ttbr0);
    ISB();
    DSB(ish);
    __asm__ volatile("tlbi alle2" ::: "memory");
    DSB(ish);
    ISB();
    WRITE_SYSREG(sctlr_el2, READ_SYSREG(sctlr_el2) | sctlr_set);
    ISB();
}

static void install_s2(u64 vtcr, u64 vttbr, u64 hcr_set)
{
    stage2_off();
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

static u64 do_at(void)
{
    u64 op = mb->arg0, n = mb->arg1, src = mb->arg2, dst = mb->arg3;
    if (n > PROBE_ADDRS_SIZE / 8 || !in_buffer(src, n * 8, PROBE_ADDRS_BASE, PROBE_ADDRS_SIZE) ||
        !in_buffer(dst, n * 8, PROBE_RESULTS_BASE, PROBE_RESULTS_SIZE))
        return STATUS_BAD_ARG;
    const u64 *a = (const u64 *)src;
    u64 *r = (u64 *)dst;
    switch (op) {
    case AT_S1E2R: at_loop_s1e2r(a, r, n); break;
    case AT_S1E2W: at_loop_s1e2w(a, r, n); break;
    case AT_S12E1R: at_loop_s12e1r(a, r, n); break;
    case AT_S12E1W: at_loop_s12e1w(a, r, n); break;
    default: return STATUS_BAD_ARG;
    }
    mb->ret0 = n;
    return STATUS_OK;
}

static u64 do_access(void)
{
    u64 write = mb->arg0, stage = mb->arg1, n = mb->arg2, src = mb->arg3, dst = mb->arg4;
    if (n > PROBE_ADDRS_SIZE / 8 || !in_buffer(src, n * 8, PROBE_ADDRS_BASE, PROBE_ADDRS_SIZE) ||
        !in_buffer(dst, n * ACCESS_RECORD_SIZE, PROBE_RESULTS_BASE, PROBE_RESULTS_SIZE) || write > 1)
        return STATUS_BAD_ARG;
    if (stage == 1) {
        s1_access_loop((const u64 *)src, (u64 *)dst, n, write);
    } else if (stage == 2) {
        WRITE_SYSREG(hcr_el2, READ_SYSREG(hcr_el2) | HCR_RW);
        ISB();
        s2_access_loop((const u64 *)src, (u64 *)dst, n, write);
    } else {
        return STATUS_BAD_ARG;
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
        install_s1(mb->arg0, mb->arg1, mb->arg2, mb->arg3);
        return STATUS_OK;
    case CMD_INSTALL_S2:
        install_s2(mb->arg0, mb->arg1, mb->arg2);
        return STATUS_OK;
    case CMD_UNINSTALL:
        stage1_off();
        stage2_off();
        return STATUS_OK;
    case CMD_AT:
        return do_at();
    case CMD_ACCESS:
        return do_access();
    case CMD_SPIN:
        for (;;)
            __asm__ volatile("" ::: "memory");
    default:
        return STATUS_BAD_CMD;
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
        mb->panic_vector = 17;
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

/* frame: x0..x30, then the interrupted SP; the MMU is already off. */
void fw_unexpected(u64 *frame, u64 vector)
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
    mb->panic_sp = frame[31];
    mb->panic_esr_el1 = READ_SYSREG(esr_el1);
    mb->panic_far_el1 = READ_SYSREG(far_el1);
    mb->panic_elr_el1 = READ_SYSREG(elr_el1);
    if (vector == 8 && (esr >> 26) == 0x16 && (esr & 0xffff) == MB_EL1_FORWARD_HVC)
        mb->panic_vector = 16;
    for (int i = 0; i < 31; i++)
        mb->panic_x[i] = frame[i];
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
