// SPDX-License-Identifier: GPL-2.0-only
/*
 * pgtable-harness: the host around a kernel tree's arch/arm64/kvm/hyp/pgtable.c.
 *
 * Compiled with the exact command line kbuild used for the tree's nVHE object (so the tree's
 * own structs and prototypes apply), linked with the firmware and the tree's two pgtable.c
 * objects (the kernel-proper one's functions renamed kp_*). It provides what the objects need
 * from a host: a page pool behind kvm_pgtable_mm_ops with real reference counts, the stage-2
 * TLB helpers (each does exactly what the architecture asks for its arguments, and is recorded),
 * cache-maintenance callbacks (recorded, not run), an EL2 stage-1 map of its own in which free
 * pool pages are unmapped (a touch after free faults), WARN/BUG reporting through the bug table,
 * and the mailbox command that runs one operation.
 *
 * The state the harness reads (gen/kpgt.h, from harness/kernel/protocol.py) lives at KPGT_BASE.
 * API differences between trees come in as KPGT_* defines (harness.kernel.tree.TreeApi).
 */
#include <linux/types.h>
#include <asm/kvm_asm.h>
#include <asm/kvm_host.h>
#include <asm/kvm_pgtable.h>
#include <asm/tlbflush.h>
#include "gen/layout.h"
#include "gen/mailbox.h"
#include "gen/kpgt.h"

/* ---- what the firmware gives us ---------------------------------------------------------- */
extern struct mailbox *const fw_mailbox;
void fw_uninstall(void);
void fw_stage1_off(void);
extern u64 el2_sync_hook;
void kpgt_trap(void);
long kpgt_setjmp(u64 *ctx);
void __noreturn kpgt_longjmp(u64 *ctx, long value);
u64 kpgt_serve(u64 cmd);
u64 kpgt_exception(u64 *frame);

#define ST ((struct kpgt_state *)KPGT_BASE)
#define REFCOUNT ((volatile u32 *)(KPGT_BASE + KPGT_REFCOUNT_OFFSET))
#define EVENTS ((struct kpgt_event *)(KPGT_BASE + KPGT_EVENTS_OFFSET))
#define WARNS ((struct kpgt_warn *)(KPGT_BASE + KPGT_WARNS_OFFSET))
#define OWN ((u64 *)(KPGT_BASE + KPGT_OWN_TABLES_OFFSET))

#define BUG_BRK_IMM_VALUE 0x800
#define ESR_EC_OF(esr) (((esr) >> 26) & 0x3f)
#define ESR_EC_BRK64 0x3c
#define ESR_EC_DABT_CUR 0x25
#define ESR_EC_HVC64 0x16

/* ---- small helpers ------------------------------------------------------------------------ */
static inline u64 rd_id_mmfr0(void) { u64 v; asm volatile("mrs %0, id_aa64mmfr0_el1" : "=r"(v)); return v; }
static inline u64 rd_id_mmfr1(void) { u64 v; asm volatile("mrs %0, id_aa64mmfr1_el1" : "=r"(v)); return v; }

static void record(u64 kind, u64 a0, u64 a1, u64 a2)
{
	u64 n = ST->events;

	if (n >= KPGT_MAX_EVENTS) {
		ST->events_lost = ST->events_lost + 1;
		return;
	}
	EVENTS[n].kind = kind;
	EVENTS[n].a0 = a0;
	EVENTS[n].a1 = a1;
	EVENTS[n].a2 = a2;
	ST->events = n + 1;
}

void *memset(void *s, int c, size_t n);
void *memset(void *s, int c, size_t n)
{
	volatile unsigned char *p = s;

	while (n--)
		*p++ = (unsigned char)c;
	return s;
}

/* ---- the host's own EL2 stage 1 (4K granule, 32-bit VA, identity) --------------------------
 * L1: [0, 1 GiB) device, [1, 2 GiB) -> L2; L2: 2 MiB normal blocks, except the pool, which is
 * mapped with L3 pages so that every free pool page can be invalid. */
#define OWN_L1 (OWN)
#define OWN_L2 (OWN + 512)
#define OWN_L3 (OWN + 1024)
#define OWN_PTE_VALID 1UL
#define OWN_PTE_TABLE 3UL
#define OWN_PTE_PAGE 3UL
#define OWN_PTE_AF (1UL << 10)
#define OWN_PTE_SH_INNER (3UL << 8)
#define OWN_PTE_ATTR(i) ((u64)(i) << 2)
#define OWN_MAIR 0x04ffUL /* attr0 normal WB, attr1 device nGnRE */
#define OWN_TCR ((32UL) | (1UL << 8) | (1UL << 10) | (3UL << 12) | (2UL << 16) | (1UL << 23) | (1UL << 31))

static int own_ready;

static u64 *own_l3_entry(u64 pa)
{
	u64 off = pa - POOL_BASE;

	return &OWN_L3[off >> 12];
}

static void own_tlbi_page(u64 va)
{
	/* vae2, not vae2is: the payload's vae2is/vale2is are the tree's, trapped and recorded */
	asm volatile("dsb nshst\n tlbi vae2, %0\n dsb nsh\n isb" : : "r"(va >> 12) : "memory");
}

static void own_map_pool_pages(u64 pa, u64 size, bool valid)
{
	for (u64 a = pa; a < pa + size; a += 4096) {
		u64 *e = own_l3_entry(a);

		if (valid) {
			*e = a | OWN_PTE_PAGE | OWN_PTE_AF | OWN_PTE_SH_INNER | OWN_PTE_ATTR(0);
		} else {
			*e = 0;
			own_tlbi_page(a);
		}
	}
}

static void own_build(void)
{
	u64 ram = RAM_BASE, pool_l2 = (POOL_BASE - RAM_BASE) >> 21, pool_blocks = POOL_SIZE >> 21;

	memset(OWN, 0, (2 + pool_blocks) * 4096);
	OWN_L1[0] = 0 | OWN_PTE_VALID | OWN_PTE_AF | OWN_PTE_ATTR(1);
	OWN_L1[1] = (u64)OWN_L2 | OWN_PTE_TABLE;
	for (u64 i = 0; i < 512; i++)
		OWN_L2[i] = (ram + (i << 21)) | OWN_PTE_VALID | OWN_PTE_AF | OWN_PTE_SH_INNER | OWN_PTE_ATTR(0);
	for (u64 i = 0; i < pool_blocks; i++)
		OWN_L2[pool_l2 + i] = (u64)(OWN_L3 + 512 * i) | OWN_PTE_TABLE;
	own_ready = 1;
}

static int own_mmu_is_on(void)
{
	u64 sctlr, ttbr;

	asm volatile("mrs %0, sctlr_el2\n mrs %1, ttbr0_el2" : "=r"(sctlr), "=r"(ttbr));
	return (sctlr & 1) && ttbr == (u64)OWN_L1;
}

static int stage2_live(void)
{
	u64 hcr;

	asm volatile("mrs %0, hcr_el2" : "=r"(hcr));
	return hcr & 1; /* HCR_EL2.VM */
}

static void own_mmu_on(void)
{
	u64 sctlr;

	if (own_mmu_is_on())
		return; /* kept on for a live stage 2: no SCTLR_EL2 write, which would flush QEMU's TLB */
	fw_stage1_off(); /* a stage 2 installed live (the C tables, VMID 1) stays: its TLB is under test */
	asm volatile("msr mair_el2, %0\n msr tcr_el2, %1\n msr ttbr0_el2, %2\n isb\n tlbi alle2\n dsb ish\n isb"
		     : : "r"(OWN_MAIR), "r"(OWN_TCR), "r"((u64)OWN_L1) : "memory");
	asm volatile("mrs %0, sctlr_el2" : "=r"(sctlr));
	sctlr |= 1UL | (1UL << 2) | (1UL << 12); /* M, C, I */
	asm volatile("msr sctlr_el2, %0\n isb" : : "r"(sctlr) : "memory");
}

/* ---- the page pool behind kvm_pgtable_mm_ops ---------------------------------------------- */
static u64 pool_index(void *addr)
{
	return ((u64)addr - POOL_BASE) / PAGE_SIZE;
}

static bool in_pool(void *addr)
{
	return (u64)addr >= POOL_BASE && (u64)addr < POOL_BASE + ST->pool_pages * PAGE_SIZE;
}

static void *pool_alloc(u64 pages)
{
	u64 n = ST->pool_pages;

	for (u64 i = 0; i + pages <= n; i += pages) { /* naturally aligned, lowest first */
		u64 j;

		for (j = 0; j < pages && REFCOUNT[i + j] == 0; j++)
			;
		if (j < pages)
			continue;
		for (j = 0; j < pages; j++)
			REFCOUNT[i + j] = 1;
		own_map_pool_pages(POOL_BASE + i * PAGE_SIZE, pages * PAGE_SIZE, true);
		memset((void *)(POOL_BASE + i * PAGE_SIZE), 0, pages * PAGE_SIZE);
		return (void *)(POOL_BASE + i * PAGE_SIZE);
	}
	ST->alloc_fail = ST->alloc_fail + 1;
	return NULL;
}

static void pool_release(u64 i)
{
	own_map_pool_pages(POOL_BASE + i * PAGE_SIZE, PAGE_SIZE, false);
}

static void *host_zalloc_page(void *arg)
{
	void *p = pool_alloc(1);

	record(KEV_ZALLOC_PAGE, (u64)p, 0, 0);
	return p;
}

static void *host_zalloc_pages_exact(size_t size)
{
	u64 pages = (size + PAGE_SIZE - 1) / PAGE_SIZE, pow2 = 1;
	void *p;

	while (pow2 < pages)
		pow2 <<= 1;
	p = pool_alloc(pow2);
	if (p && pow2 > pages) { /* only the asked-for pages stay allocated */
		for (u64 j = pages; j < pow2; j++) {
			REFCOUNT[pool_index(p) + j] = 0;
			pool_release(pool_index(p) + j);
		}
	}
	record(KEV_ZALLOC_PAGES_EXACT, (u64)p, size, 0);
	return p;
}

static void host_put_one(void *addr, bool exact)
{
	u64 i;

	if (!in_pool(addr)) {
		ST->bad_put = ST->bad_put + 1;
		return;
	}
	i = pool_index(addr);
	if (REFCOUNT[i] == 0) {
		ST->bad_put = ST->bad_put + 1;
		return;
	}
	REFCOUNT[i] = REFCOUNT[i] - 1;
	if (!exact)
		record(KEV_PUT_PAGE, (u64)addr & ~(PAGE_SIZE - 1), REFCOUNT[i], 0);
	if (REFCOUNT[i] == 0)
		pool_release(i);
}

static void host_free_pages_exact(void *addr, size_t size)
{
	record(KEV_FREE_PAGES_EXACT, (u64)addr, size, 0);
	if (!in_pool(addr) || ((u64)addr & (PAGE_SIZE - 1))) {
		ST->bad_free = ST->bad_free + 1;
		return;
	}
	for (u64 off = 0; off < size; off += PAGE_SIZE)
		host_put_one((void *)((u64)addr + off), true);
}

static void host_get_page(void *addr)
{
	u64 i;

	if (!in_pool(addr)) {
		ST->bad_get = ST->bad_get + 1;
		return;
	}
	i = pool_index(addr);
	if (REFCOUNT[i] == 0) /* a reference on a free page: the page was freed while in use */
		ST->bad_get = ST->bad_get + 1;
	REFCOUNT[i] = REFCOUNT[i] + 1;
	record(KEV_GET_PAGE, (u64)addr & ~(PAGE_SIZE - 1), REFCOUNT[i], 0);
}

static void host_put_page(void *addr)
{
	host_put_one(addr, false);
}

static int host_page_count(void *addr)
{
	if (!in_pool(addr))
		return 0;
	return (int)REFCOUNT[pool_index(addr)];
}

static void *host_phys_to_virt(phys_addr_t phys)
{
	return (void *)phys;
}

static phys_addr_t host_virt_to_phys(void *addr)
{
	return (phys_addr_t)addr;
}

static void host_dcache_clean_inval_poc(void *addr, size_t size)
{
	record(KEV_DCACHE_CLEAN_INVAL_POC, (u64)addr, size, 0);
}

static void host_icache_inval_pou(void *addr, size_t size)
{
	record(KEV_ICACHE_INVAL_POU, (u64)addr, size, 0);
}

static struct kvm_pgtable_mm_ops host_mm_ops;

#if KPGT_FREE_UNLINKED_TABLE
static void host_free_unlinked_table(void *addr, s8 level)
{
	record(KEV_FREE_UNLINKED, (u64)addr, (u64)(long)level, 0);
	kvm_pgtable_stage2_free_unlinked(&host_mm_ops, addr, level);
}
#endif

static struct kvm_pgtable_mm_ops host_mm_ops = {
	.zalloc_page = host_zalloc_page,
	.zalloc_pages_exact = host_zalloc_pages_exact,
	.free_pages_exact = host_free_pages_exact,
#if KPGT_FREE_UNLINKED_TABLE
	.free_unlinked_table = host_free_unlinked_table,
#endif
	.get_page = host_get_page,
	.put_page = host_put_page,
	.page_count = host_page_count,
	.phys_to_virt = host_phys_to_virt,
	.virt_to_phys = host_virt_to_phys,
	.dcache_clean_inval_poc = host_dcache_clean_inval_poc,
	.icache_inval_pou = host_icache_inval_pou,
};

/* ---- the table under test ----------------------------------------------------------------- */
static struct kvm_pgtable pgt;
static struct kvm_s2_mmu mmu;
#if !KPGT_VTCR_IN_MMU
static struct kvm_arch host_arch;
#endif
static int have_table; /* 0 none, 1 hyp, 2 stage 2 */
#define HOST_VMID 1UL

static u64 vmid_of(struct kvm_s2_mmu *m)
{
	return HOST_VMID;
}

/* ---- stage-2 TLB maintenance: exactly what is asked, recorded ------------------------------
 * The VMID's VTTBR_EL2 is current while the invalidation runs (TLBI by IPA and VMALLS12E1 act
 * on the current VMID). A level hint becomes the TTL field of the TLBI (FEAT_TTL) as the tree's
 * own __tlbi_level reads its argument: only with the ARMv8_4_TTL capability; 0..3 a level and
 * TLBI_TTL_UNKNOWN none where the tree has it (6.12), else 0 none (6.1); level 0 with 16K/64K is a
 * reserved TTL, which the architecture treats as no hint. */
static void with_vmid(struct kvm_s2_mmu *m)
{
	asm volatile("msr vttbr_el2, %0\n isb" : : "r"((vmid_of(m) << 48) | (u64)pgt.pgd) : "memory");
}

static u64 ttl_hint(int level)
{
	u64 tg = PAGE_SIZE == SZ_4K ? 1 : PAGE_SIZE == SZ_16K ? 2 : 3;

	if (!cpus_have_final_cap(ARM64_HAS_ARMv8_4_TTL))
		return 0;
#ifdef TLBI_TTL_UNKNOWN
	if (level < 0 || level > 3)
		return 0;
#else
	if (level == 0)
		return 0;
	level &= 3;
#endif
	if (tg != 1 && level == 0)
		return 0;
	return ((tg << 2) | (u64)level) << 44;
}

void __kvm_tlb_flush_vmid_ipa(struct kvm_s2_mmu *m, phys_addr_t ipa, int level)
{
	record(KEV_TLBI_VMID_IPA, ipa, (u64)(long)level, vmid_of(m));
	with_vmid(m);
	asm volatile("dsb ishst\n tlbi ipas2e1is, %0\n dsb ish\n tlbi vmalle1is\n dsb ish\n isb"
		     : : "r"(((ipa >> 12) & GENMASK_ULL(43, 0)) | ttl_hint(level)) : "memory");
}

void __kvm_tlb_flush_vmid_ipa_nsh(struct kvm_s2_mmu *m, phys_addr_t ipa, int level)
{
	record(KEV_TLBI_VMID_IPA_NSH, ipa, (u64)(long)level, vmid_of(m));
	with_vmid(m);
	asm volatile("dsb nshst\n tlbi ipas2e1, %0\n dsb nsh\n tlbi vmalle1\n dsb nsh\n isb"
		     : : "r"(((ipa >> 12) & GENMASK_ULL(43, 0)) | ttl_hint(level)) : "memory");
}

void __kvm_tlb_flush_vmid_range(struct kvm_s2_mmu *m, phys_addr_t start, unsigned long pages)
{
	record(KEV_TLBI_VMID_RANGE, start, pages, vmid_of(m));
	with_vmid(m);
	asm volatile("dsb ishst" : : : "memory");
	if (pages > 4096) { /* more than a loop should do: the whole VMID covers it */
		asm volatile("tlbi vmalls12e1is" : : : "memory");
	} else {
		for (unsigned long i = 0; i < pages; i++)
			asm volatile("tlbi ipas2e1is, %0" : : "r"(((start + i * PAGE_SIZE) >> 12) & GENMASK_ULL(43, 0))
				     : "memory");
	}
	asm volatile("dsb ish\n tlbi vmalle1is\n dsb ish\n isb" : : : "memory");
}

void __kvm_tlb_flush_vmid(struct kvm_s2_mmu *m)
{
	record(KEV_TLBI_VMID, 0, 0, vmid_of(m));
	with_vmid(m);
	asm volatile("dsb ishst\n tlbi vmalls12e1is\n dsb ish\n isb" : : : "memory");
}

/* ---- what the objects name and a host must provide ----------------------------------------- */
void alt_cb_patch_nops(struct alt_instr *alt, __le32 *origptr, __le32 *updptr, int nr_inst);
void alt_cb_patch_nops(struct alt_instr *alt, __le32 *origptr, __le32 *updptr, int nr_inst)
{
	/* a boot-time patching callback: the harness applies it before boot; never called */
	asm volatile("brk #0x801");
}

void __rcu_read_lock(void);
void __rcu_read_lock(void) {}
void __rcu_read_unlock(void);
void __rcu_read_unlock(void) {}

static u64 jmp_ctx[14];

void __stack_chk_fail(void);
void __stack_chk_fail(void)
{
	record(KEV_STACK_CHK_FAIL, 0, 0, 0);
	ST->fault_kind = KFAULT_STACK_CHK;
	kpgt_longjmp(jmp_ctx, 1);
}

#if KPGT_NEEDS_CPU_HWCAPS
DECLARE_BITMAP(cpu_hwcaps, ARM64_NCAPS);
#endif

/* The kernel-proper object reads `current` (stack canary, preempt count) through SP_EL0. */
static u64 fake_task[2048] __aligned(4096);

/* ---- the kernel-proper object's functions (kp_ prefixed at link time) ---------------------- */
#define KP(fn) kp_##fn
extern typeof(kvm_pgtable_stage2_relax_perms) kp_kvm_pgtable_stage2_relax_perms;
extern typeof(kvm_pgtable_stage2_mkyoung) kp_kvm_pgtable_stage2_mkyoung;
extern typeof(kvm_pgtable_stage2_map) kp_kvm_pgtable_stage2_map;
extern typeof(kvm_pgtable_stage2_unmap) kp_kvm_pgtable_stage2_unmap;
extern typeof(kvm_pgtable_stage2_wrprotect) kp_kvm_pgtable_stage2_wrprotect;
#if KPGT_TEST_CLEAR_YOUNG
extern typeof(kvm_pgtable_stage2_test_clear_young) kp_kvm_pgtable_stage2_test_clear_young;
#endif
#if KPGT_SPLIT
extern typeof(kvm_pgtable_stage2_split) kp_kvm_pgtable_stage2_split;
#endif

/* ---- exceptions while the C code runs ------------------------------------------------------ */
static const s32 *bug_flags_for(u64 elr, u16 *line, u16 *flags);
extern const char __start___bug_table[], __stop___bug_table[];

struct host_bug_entry { /* the bug table's layout (arm64, relative pointers) */
	s32 bug_addr_disp;
	s32 file_disp;
	u16 line;
	u16 flags;
};

static const s32 *bug_flags_for(u64 elr, u16 *line, u16 *flags)
{
	const struct host_bug_entry *b;

	for (b = (const void *)__start___bug_table; (const char *)b < __stop___bug_table; b++) {
		u64 addr = (u64)&b->bug_addr_disp + (s64)b->bug_addr_disp;

		if (addr == elr) {
			*line = b->line;
			*flags = b->flags;
			return &b->bug_addr_disp;
		}
	}
	return NULL;
}

/* Called from kpgt_trap with the interrupted registers saved (x0..x30): returns to resume
 * (ELR_EL2 moved past a WARN's brk), or ends the operation. */
u64 kpgt_exception(u64 *frame)
{
	u64 esr, far, elr;
	u16 line = 0, flags = 0;

	asm volatile("mrs %0, esr_el2\n mrs %1, far_el2\n mrs %2, elr_el2" : "=r"(esr), "=r"(far), "=r"(elr));
	if (ESR_EC_OF(esr) == ESR_EC_HVC64 && (esr & KPGT_TLBI_TRAP_MASK) == KPGT_TLBI_TRAP_HVC) {
		/* a hyp TLBI the image's patch turned into hvc: record it, run it, resume after the hvc */
		u64 rt = esr & 31, vale = (esr >> 5) & 1, op = rt == 31 ? 0 : frame[rt];

		record(vale ? KEV_TLBI_VALE2IS : KEV_TLBI_VAE2IS, op, 0, 0);
		/* run as the outer-shareable forms (FEAT_TLBIOS: a domain that holds the inner-shareable
		 * one), whose encodings the image's patch does not look for */
		if (vale)
			asm volatile("sys #4, c8, c1, #5, %0" : : "r"(op) : "memory"); /* tlbi vale2os */
		else
			asm volatile("sys #4, c8, c1, #1, %0" : : "r"(op) : "memory"); /* tlbi vae2os */
		return 0;
	}
	if (ESR_EC_OF(esr) == ESR_EC_BRK64 && (esr & 0xffff) == BUG_BRK_IMM_VALUE) {
		const s32 *entry = bug_flags_for(elr, &line, &flags);
		u64 n = ST->warns;

		if (n < KPGT_MAX_WARNS) {
			WARNS[n].elr = elr;
			WARNS[n].line = line;
			WARNS[n].flags = flags | (entry ? 0 : 0x8000);
			WARNS[n].op_seq = ST->op_seq;
			ST->warns = n + 1;
		}
		if (entry && (flags & KPGT_WARN_FLAG)) {
			asm volatile("msr elr_el2, %0" : : "r"(elr + 4));
			return 0;
		}
		ST->fault_kind = KFAULT_BUG;
	} else {
		ST->fault_kind = ESR_EC_OF(esr) == ESR_EC_DABT_CUR ? KFAULT_DATA_ABORT : KFAULT_OTHER;
	}
	ST->fault_esr = esr;
	ST->fault_far = far;
	ST->fault_elr = elr;
	kpgt_longjmp(jmp_ctx, 1);
}

/* ---- operations ------------------------------------------------------------------------------ */
static void host_init(void)
{
	if (ST->magic == KPGT_MAGIC)
		return;
	memset((void *)KPGT_BASE, 0, KPGT_OWN_TABLES_OFFSET);
	ST->version = KPGT_VERSION;
	ST->page_size = PAGE_SIZE;
	ST->pool_base = POOL_BASE;
	ST->pool_pages = POOL_SIZE / PAGE_SIZE;
	if (ST->pool_pages > KPGT_MAX_POOL_PAGES)
		ST->pool_pages = KPGT_MAX_POOL_PAGES;
	own_build();
	ST->own_ttbr = (u64)OWN_L1;
	ST->magic = KPGT_MAGIC;
}

static int op_init_s2(u64 phys_shift, u64 mmfr0, u64 flags)
{
	u64 vtcr = kvm_get_vtcr(mmfr0 ? mmfr0 : rd_id_mmfr0(), rd_id_mmfr1(), (u32)phys_shift);
	int ret;

#if KPGT_VTCR_IN_MMU
	mmu.vtcr = vtcr;
#else
	host_arch.vtcr = vtcr;
	mmu.arch = &host_arch;
#endif
	ST->vtcr = vtcr;
#if KPGT_SPLIT
	mmu.split_page_cache.nobjs = 1 << 20; /* the pool is the memcache */
#endif
	ret = __kvm_pgtable_stage2_init(&pgt, &mmu, &host_mm_ops, (enum kvm_pgtable_stage2_flags)flags, NULL);
	if (!ret) {
		mmu.pgd_phys = (u64)pgt.pgd;
		mmu.pgt = &pgt;
	}
	return ret;
}

#if KPGT_MAP_HAS_FLAGS
#define S2_MAP(fn, a, s, p, pr, f) fn(&pgt, a, s, p, (enum kvm_pgtable_prot)(pr), (void *)&host_mm_ops, \
				       (enum kvm_pgtable_walk_flags)(f))
#else
#define S2_MAP(fn, a, s, p, pr, f) fn(&pgt, a, s, p, (enum kvm_pgtable_prot)(pr), (void *)&host_mm_ops)
#endif

static u64 run_op(u64 op, const volatile u64 *a, u64 *ret1)
{
	bool kp = a[7] == KBUILD_KERNEL;

	switch (op) {
	case KOP_INIT_HYP: {
		int ret = kvm_pgtable_hyp_init(&pgt, (u32)a[1], &host_mm_ops);

		*ret1 = (u64)pgt.pgd;
		if (!ret)
			have_table = 1;
		return (u64)(long)ret;
	}
	case KOP_INIT_S2: {
		int ret = op_init_s2(a[1], a[2], a[3]);

		*ret1 = (u64)pgt.pgd;
		if (!ret)
			have_table = 2;
		return (u64)(long)ret;
	}
	case KOP_HYP_MAP:
		return (u64)(long)kvm_pgtable_hyp_map(&pgt, a[1], a[2], a[3], (enum kvm_pgtable_prot)a[4]);
	case KOP_HYP_UNMAP:
		return kvm_pgtable_hyp_unmap(&pgt, a[1], a[2]);
	case KOP_S2_MAP:
		return (u64)(long)(kp ? S2_MAP(KP(kvm_pgtable_stage2_map), a[1], a[2], a[3], a[4], a[5])
				      : S2_MAP(kvm_pgtable_stage2_map, a[1], a[2], a[3], a[4], a[5]));
	case KOP_S2_UNMAP:
		return (u64)(long)(kp ? KP(kvm_pgtable_stage2_unmap)(&pgt, a[1], a[2])
				      : kvm_pgtable_stage2_unmap(&pgt, a[1], a[2]));
	case KOP_S2_WRPROTECT:
		return (u64)(long)(kp ? KP(kvm_pgtable_stage2_wrprotect)(&pgt, a[1], a[2])
				      : kvm_pgtable_stage2_wrprotect(&pgt, a[1], a[2]));
	case KOP_S2_FLUSH:
		return (u64)(long)kvm_pgtable_stage2_flush(&pgt, a[1], a[2]);
	case KOP_S2_MKYOUNG:
		*ret1 = (u64)(kp ? KP(kvm_pgtable_stage2_mkyoung)(&pgt, a[1]) : kvm_pgtable_stage2_mkyoung(&pgt, a[1]));
		return 0;
#if KPGT_TEST_CLEAR_YOUNG
	case KOP_S2_TEST_CLEAR_YOUNG:
		return (u64)(kp ? KP(kvm_pgtable_stage2_test_clear_young)(&pgt, a[1], a[2], a[3] != 0)
				: kvm_pgtable_stage2_test_clear_young(&pgt, a[1], a[2], a[3] != 0));
#endif
#if KPGT_MKOLD
	case KOP_S2_MKOLD:
		*ret1 = (u64)kvm_pgtable_stage2_mkold(&pgt, a[1]);
		return 0;
#endif
	case KOP_S2_RELAX_PERMS:
		return (u64)(long)(kp ? KP(kvm_pgtable_stage2_relax_perms)(&pgt, a[1], (enum kvm_pgtable_prot)a[2])
				      : kvm_pgtable_stage2_relax_perms(&pgt, a[1], (enum kvm_pgtable_prot)a[2]));
#if KPGT_SPLIT
	case KOP_S2_SPLIT:
		return (u64)(long)(kp ? KP(kvm_pgtable_stage2_split)(&pgt, a[1], a[2], &mmu.split_page_cache)
				      : kvm_pgtable_stage2_split(&pgt, a[1], a[2], &mmu.split_page_cache));
#endif
	case KOP_GET_LEAF: {
		kvm_pte_t pte = 0;
#if KPGT_LEVEL_S8
		s8 level = -2;
#else
		u32 level = 99;
#endif
		int ret = kvm_pgtable_get_leaf(&pgt, a[1], &pte, &level);

		*ret1 = pte;
		ST->leaf_level = (u64)(long)level;
		return (u64)(long)ret;
	}
	case KOP_DESTROY:
		if (have_table == 1)
			kvm_pgtable_hyp_destroy(&pgt);
		else
			kvm_pgtable_stage2_destroy(&pgt);
		have_table = 0;
		return 0;
	default:
		ST->status = KST_BAD_OP;
		return 0;
	}
}

u64 kpgt_serve(u64 cmd)
{
	const volatile u64 *a = fw_mailbox->arg;
	u64 op = a[0], ret0 = 0, ret1 = 0, saved_sp_el0;

	if (cmd != CMD_KPGT)
		return STATUS_BAD_CMD;
	host_init();
	ST->op = op;
	ST->op_seq = ST->op_seq + 1;
	ST->status = KST_OK;
	ST->fault_kind = KFAULT_NONE;
	ST->events = 0; /* the log holds this operation's callbacks */
	ST->events_lost = 0;
	if (op == KOP_ENTER) {
		own_mmu_on();
		if (!stage2_live())
			fw_stage1_off();
		return STATUS_OK;
	}
	if ((op == KOP_INIT_HYP || op == KOP_INIT_S2) && have_table) {
		ST->status = KST_BUSY;
		return STATUS_OK;
	}
	if (op != KOP_INIT_HYP && op != KOP_INIT_S2 && !have_table) {
		ST->status = KST_NO_TABLE;
		return STATUS_OK;
	}
	own_mmu_on();
	asm volatile("mrs %0, sp_el0\n msr sp_el0, %1" : "=&r"(saved_sp_el0) : "r"((u64)fake_task) : "memory");
	el2_sync_hook = (u64)kpgt_trap;
	if (kpgt_setjmp(jmp_ctx) == 0) {
		ret0 = run_op(op, a, &ret1);
	} else {
		ST->status = KST_FAULTED;
		have_table = 0; /* the table is in an unknown state: the host starts a new target */
	}
	el2_sync_hook = 0;
	asm volatile("msr sp_el0, %0" : : "r"(saved_sp_el0) : "memory");
	ST->pgd = (u64)pgt.pgd;
	if (!stage2_live())
		fw_stage1_off(); /* own MMU off: the request loop runs as before */
	fw_mailbox->ret0 = ret0;
	fw_mailbox->ret1 = ret1;
	return STATUS_OK;
}
