/* pgtable-harness VMM: /init of an initramfs the harness writes (harness/live/initramfs.py).
 *
 * Runs as PID 1 of a Linux arm64 kernel with KVM: creates a VM with a few memslots, one vCPU at
 * EL1 with the MMU off (IPA = address), and runs a guest job table (guest.h) chosen by
 * `vmm.guest=NAME` on the kernel command line (touch, dirty-log, memslot, two-vms; default
 * touch). Reports on the console, one record a line: `@@vmm {json}` (harness/live/vmm.py parses
 * them). Never exits: after `ready` the vCPU spins in the guest; after an `error` the VMM sleeps. */
#include "guest.h"
#include "sys.h"

void *memset(void *dst, int c, u64 n);
void *memcpy(void *dst, const void *src, u64 n);
void vmm_main(long *sp);

extern const u8 guest_code[];
extern const u8 guest_code_end[];

#define SZ_4K 0x1000UL
#define SZ_2M 0x200000UL
#define PAGE_SHIFT 12

/* --- the guest's memory --- */
#define NSLOTS 4
#define MAX_PAGES 1024 /* 4 MiB of 4K pages: the largest slot */
#define SLOT_CODE 0    /* code, job table, 4K runs */
#define SLOT_THP 1     /* 2 x 2 MiB, THP-backed */
#define SLOT_SMALL 2   /* 4K pages; deleted by `memslot` */
#define SLOT_MOVE 3    /* one 2 MiB THP block; moved by `memslot` */
#define CODE_IPA 0x40000000UL
#define JOBS_IPA (CODE_IPA + SZ_4K)
#define THP_IPA 0x40400000UL
#define SMALL_IPA 0x41000000UL
#define MOVE_IPA 0x41200000UL
#define MOVED_IPA 0x48000000UL
#define MAX_JOBS (SZ_4K / JOB_SIZE)

static const struct {
    u64 ipa;
    u64 size;
    int huge;
} LAYOUT[NSLOTS] = {
    {CODE_IPA, SZ_2M, 0},
    {THP_IPA, 2 * SZ_2M, 1},
    {SMALL_IPA, SZ_2M, 0},
    {MOVE_IPA, SZ_2M, 1},
};

/* Pages the guest dirties in SLOT_THP once logging is on (`dirty-log`). */
static const u32 DIRTY_PAGES[] = {3, 5, 64, 511, 512, 700, 1023};

#define PH_TOUCHED 1
#define PH_DIRTIED 2
#define PH_MOVED 3
#define PH_SPINNING 4
static const char *const PHASE_NAMES[] = {"?", "touched", "dirtied", "moved", "spinning"};

#define ACC_R 1
#define ACC_W 2
#define ACC_X 4

struct job {
    u64 op, addr, count, stride;
};

struct slot {
    int used;
    u32 flags;
    u64 ipa;
    u64 size;
    u8 *host;
    int huge;
    u8 fresh[MAX_PAGES]; /* accesses made since the last report (ACC_*) */
};

static struct {
    int index;
    int fd;
    int vcpu;
    u8 *run;
    int pagemap;
    int kpageflags;
    struct slot slots[NSLOTS];
    struct job *jobs; /* in guest memory (SLOT_CODE), host view */
    u32 njobs;
    u32 accounted; /* jobs whose accesses are recorded */
} V;

enum pattern { P_TOUCH, P_DIRTY_LOG, P_MEMSLOT, P_TWO_VMS };
static const char *const PATTERN_NAMES[] = {"touch", "dirty-log", "memslot", "two-vms"};
static enum pattern pattern;

static int out_fd = 1;
static int kvm_fd = -1;
static int cur_vm = -1;                /* the "vm" of every record (-1: none) */
static volatile u32 *shared;           /* two-vms: per VM 0 running, 1 spinning, 2 failed */
static u64 dirty_bitmap[MAX_PAGES / 64];
static char cmdline[4096];

/* --- system call wrappers --- */
static long sys_write(int fd, const void *buf, u64 n) { return syscall3(NR_write, fd, buf, n); }
static long sys_openat(const char *path, int flags) { return syscall4(NR_openat, AT_FDCWD, path, flags, 0); }
static long sys_ioctl(int fd, u64 req, long arg) { return syscall3(NR_ioctl, fd, req, arg); }
static long sys_pread(int fd, void *buf, u64 n, u64 off) { return syscall4(NR_pread64, fd, buf, n, off); }
static long sys_mmap(u64 len, int prot, int flags, int fd) { return syscall6(NR_mmap, 0, (long)len, prot, flags, fd, 0); }

static void sleep_ms(long ms)
{
    struct { long sec, nsec; } ts = {ms / 1000, (ms % 1000) * 1000000L};
    syscall2(NR_nanosleep, &ts, 0);
}

static void __attribute__((noreturn)) hang(void)
{
    for (;;)
        sleep_ms(3600 * 1000L);
}

static int seq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

/* --- records: `@@vmm {json}` lines --- */
struct rec {
    char b[2048];
    u32 n;
};

static void put(struct rec *r, const char *s)
{
    while (*s && r->n < sizeof r->b - 3)
        r->b[r->n++] = *s++;
}

static void put_hex(struct rec *r, u64 v)
{
    char t[19];
    int i = 18;
    t[i] = 0;
    do {
        t[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    t[--i] = 'x';
    t[--i] = '0';
    put(r, t + i);
}

static void put_dec(struct rec *r, s64 v)
{
    char t[21];
    int i = 20;
    u64 u = v < 0 ? -(u64)v : (u64)v;
    t[i] = 0;
    do {
        t[--i] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        t[--i] = '-';
    put(r, t + i);
}

static void key(struct rec *r, const char *k)
{
    put(r, ",\"");
    put(r, k);
    put(r, "\":");
}

static void f_str(struct rec *r, const char *k, const char *v)
{
    key(r, k);
    put(r, "\"");
    for (; *v; v++) {
        char c[2] = {*v, 0};
        if (*v == '"' || *v == '\\')
            put(r, "\\");
        put(r, (u8)*v < 0x20 ? "?" : c);
    }
    put(r, "\"");
}

static void f_int(struct rec *r, const char *k, s64 v)
{
    key(r, k);
    put_dec(r, v);
}

static void f_hex(struct rec *r, const char *k, u64 v)
{
    key(r, k);
    put(r, "\"");
    put_hex(r, v);
    put(r, "\"");
}

static void f_bool(struct rec *r, const char *k, int v)
{
    key(r, k);
    put(r, v ? "true" : "false");
}

static void begin(struct rec *r, const char *event)
{
    r->n = 0;
    put(r, "@@vmm {\"event\":\"");
    put(r, event);
    put(r, "\"");
    if (cur_vm >= 0)
        f_int(r, "vm", cur_vm);
}

static void end(struct rec *r)
{
    r->b[r->n++] = '}';
    r->b[r->n++] = '\n';
    u32 done = 0;
    while (done < r->n) {
        long w = sys_write(out_fd, r->b + done, r->n - done);
        if (w == -EINTR)
            continue;
        if (w <= 0)
            return;
        done += (u32)w;
    }
}

static void __attribute__((noreturn)) fail2(const char *what, long ret, const char *k, u64 v)
{
    struct rec r;
    begin(&r, "error");
    f_str(&r, "what", what);
    f_int(&r, "errno", is_err(ret) ? -ret : 0);
    if (k)
        f_hex(&r, k, v);
    end(&r);
    if (shared && cur_vm >= 0)
        shared[cur_vm] = 2;
    hang();
}

static void __attribute__((noreturn)) fail(const char *what, long ret) { fail2(what, ret, 0, 0); }

static long check(const char *what, long ret)
{
    if (is_err(ret))
        fail(what, ret);
    return ret;
}

/* --- memory and memslots --- */
static struct slot *slot_of(u64 ipa)
{
    for (int i = 0; i < NSLOTS; i++) {
        struct slot *s = &V.slots[i];
        if (s->used && ipa >= s->ipa && ipa - s->ipa < s->size)
            return s;
    }
    return 0;
}

static u8 *host_of(u64 ipa)
{
    struct slot *s = slot_of(ipa);
    return s ? s->host + (ipa - s->ipa) : 0;
}

static void memslot_record(struct slot *s, const char *op, u64 size)
{
    struct rec r;
    begin(&r, "memslot");
    f_str(&r, "op", op);
    f_int(&r, "slot", s - V.slots);
    f_hex(&r, "ipa", s->ipa);
    f_hex(&r, "size", size);
    f_hex(&r, "uaddr", (u64)s->host);
    f_int(&r, "flags", s->flags);
    f_str(&r, "advice", s->huge ? "hugepage" : "nohugepage");
    end(&r);
}

static void set_region(struct slot *s, u64 size, const char *op)
{
    struct kvm_userspace_memory_region m = {
        .slot = (u32)(s - V.slots),
        .flags = s->flags,
        .guest_phys_addr = s->ipa,
        .memory_size = size,
        .userspace_addr = (u64)s->host,
    };
    check("KVM_SET_USER_MEMORY_REGION", sys_ioctl(V.fd, KVM_SET_USER_MEMORY_REGION, (long)&m));
    s->used = size != 0;
    memslot_record(s, op, size);
}

static void add_slot(int i)
{
    struct slot *s = &V.slots[i];
    u64 size = LAYOUT[i].size;
    long p = check("mmap guest memory", sys_mmap(size + SZ_2M, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1));
    u64 a = ((u64)p + SZ_2M - 1) & ~(SZ_2M - 1); /* 2 MiB aligned, as the IPA is: blocks possible */
    check("madvise", syscall3(NR_madvise, a, size, LAYOUT[i].huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE));
    s->host = (u8 *)a;
    s->ipa = LAYOUT[i].ipa;
    s->size = size;
    s->huge = LAYOUT[i].huge;
    s->flags = 0;
    set_region(s, size, "create");
}

/* --- jobs --- */
static void job(u64 op, u64 addr, u64 count, u64 stride)
{
    if (V.njobs >= MAX_JOBS)
        fail("job table full", 0);
    V.jobs[V.njobs++] = (struct job){op, addr, count, stride};
    /* What the guest will find: its own address where it loads, a ret where it branches. */
    for (u64 i = 0; i < count && (op == OP_READ || op == OP_EXEC); i++) {
        u64 ipa = addr + i * stride;
        u8 *h = host_of(ipa);
        if (!h)
            fail2("job outside every memslot", 0, "ipa", ipa);
        if (op == OP_READ)
            *(volatile u64 *)h = ipa;
        else
            *(volatile u32 *)h = RET_INSN;
    }
}

static void touch_jobs(int variant)
{
    u64 b = CODE_IPA + (u64)variant * 0x8000;
    job(OP_READ, b + 0x10000, 8, SZ_4K);
    job(OP_WRITE, b + 0x20000, 8, SZ_4K);
    job(OP_EXEC, b + 0x30000, 4, SZ_4K);
    job(OP_WRITE, THP_IPA, 512, SZ_4K);                 /* a 2 MiB block, written */
    job(OP_READ, THP_IPA + SZ_2M, 512, SZ_4K);          /* a 2 MiB block, read... */
    job(OP_EXEC, THP_IPA + SZ_2M + 0x800, 512, SZ_4K);  /* ...and executed */
    if (V.slots[SLOT_SMALL].used)
        job(OP_WRITE, SMALL_IPA, 4, SZ_4K);
    if (V.slots[SLOT_MOVE].used)
        job(OP_WRITE, MOVE_IPA, 512, SZ_4K);
    job(OP_PHASE, PH_TOUCHED, 0, 0);
}

static void build_jobs(void)
{
    touch_jobs(V.index);
    if (pattern == P_DIRTY_LOG) {
        for (u32 i = 0; i < sizeof DIRTY_PAGES / sizeof DIRTY_PAGES[0]; i++)
            job(OP_WRITE, THP_IPA + (u64)DIRTY_PAGES[i] * SZ_4K, 1, 0);
        job(OP_PHASE, PH_DIRTIED, 0, 0);
    } else if (pattern == P_MEMSLOT) {
        job(OP_WRITE, MOVED_IPA, 512, SZ_4K); /* the moved slot at its new IPA */
        job(OP_PROBE, SMALL_IPA, 1, 0);       /* the deleted slot: an MMIO exit now */
        job(OP_PROBE, MOVE_IPA, 1, 0);        /* the moved slot's old IPA: likewise */
        job(OP_PHASE, PH_MOVED, 0, 0);
    }
    job(OP_PHASE, PH_SPINNING, 0, 0);
    job(OP_END, 0, 0, 0);
}

static void mark(u64 ipa, u8 acc)
{
    struct slot *s = slot_of(ipa);
    if (s)
        s->fresh[(ipa - s->ipa) >> PAGE_SHIFT] |= acc;
}

/* Record the accesses of the jobs the guest ran before the phase job `upto`; check its stores. */
static void account(u32 upto)
{
    for (; V.accounted < upto; V.accounted++) {
        const struct job *j = &V.jobs[V.accounted];
        u8 acc = j->op == OP_READ ? ACC_R : j->op == OP_WRITE ? ACC_W : j->op == OP_EXEC ? ACC_X : 0;
        for (u64 i = 0; i < j->count && acc; i++) {
            u64 ipa = j->addr + i * j->stride;
            mark(ipa, acc);
            u8 *h = host_of(ipa);
            if (j->op == OP_WRITE && (!h || *(volatile u64 *)h != ipa))
                fail2("a guest store is not in the VMM's memory", 0, "ipa", ipa);
        }
    }
}

static u64 page_info(u64 hva, int *present, int *thp)
{
    u64 e = 0, f = 0;
    check("read /proc/self/pagemap", sys_pread(V.pagemap, &e, 8, (hva >> PAGE_SHIFT) * 8));
    *present = (e & PM_PRESENT) != 0;
    u64 pfn = e & PM_PFN_MASK;
    *thp = 0;
    if (*present && V.kpageflags >= 0 && sys_pread(V.kpageflags, &f, 8, pfn * 8) == 8)
        *thp = (f >> KPF_THP) & 1;
    return *present ? pfn : 0;
}

/* The pages touched since the last report, as runs of contiguous IPAs and PFNs. */
static void report_pages(const char *phase)
{
    for (int i = 0; i < NSLOTS; i++) {
        struct slot *s = &V.slots[i];
        u64 n = s->used ? s->size >> PAGE_SHIFT : 0;
        for (u64 p = 0; p < n;) {
            u8 acc = s->fresh[p];
            if (!acc) {
                p++;
                continue;
            }
            int present, thp, pr2, thp2;
            u64 pfn = page_info((u64)s->host + (p << PAGE_SHIFT), &present, &thp);
            u64 c = 1;
            while (p + c < n && s->fresh[p + c] == acc) {
                u64 pfn2 = page_info((u64)s->host + ((p + c) << PAGE_SHIFT), &pr2, &thp2);
                if (pr2 != present || thp2 != thp || (present && pfn2 != pfn + c))
                    break;
                c++;
            }
            char a[4];
            int k = 0;
            if (acc & ACC_R)
                a[k++] = 'r';
            if (acc & ACC_W)
                a[k++] = 'w';
            if (acc & ACC_X)
                a[k++] = 'x';
            a[k] = 0;
            struct rec r;
            begin(&r, "pages");
            f_str(&r, "phase", phase);
            f_int(&r, "slot", i);
            f_hex(&r, "ipa", s->ipa + (p << PAGE_SHIFT));
            f_hex(&r, "uaddr", (u64)s->host + (p << PAGE_SHIFT));
            f_int(&r, "count", (s64)c);
            f_hex(&r, "pfn", pfn);
            f_bool(&r, "present", present);
            f_bool(&r, "thp", thp);
            f_str(&r, "access", a);
            end(&r);
            for (u64 q = p; q < p + c; q++)
                s->fresh[q] = 0;
            p += c;
        }
    }
}

static void report_dirty(int i)
{
    struct slot *s = &V.slots[i];
    u64 pages = s->size >> PAGE_SHIFT;
    struct kvm_dirty_log d = {.slot = (u32)i, .dirty_bitmap = (u64)dirty_bitmap};
    memset(dirty_bitmap, 0, sizeof dirty_bitmap);
    check("KVM_GET_DIRTY_LOG", sys_ioctl(V.fd, KVM_GET_DIRTY_LOG, (long)&d));
    struct rec r;
    begin(&r, "dirty");
    f_int(&r, "slot", i);
    f_hex(&r, "ipa", s->ipa);
    f_int(&r, "pages", (s64)pages);
    key(&r, "bitmap");
    put(&r, "[");
    for (u64 w = 0; w < (pages + 63) / 64; w++) {
        put(&r, w ? ",\"" : "\"");
        put_hex(&r, dirty_bitmap[w]);
        put(&r, "\"");
    }
    put(&r, "]");
    end(&r);
}

static void phase(u64 code)
{
    u32 at = 0;
    while (at < V.njobs && !(V.jobs[at].op == OP_PHASE && V.jobs[at].addr == code && at >= V.accounted))
        at++;
    if (code == 0 || code >= sizeof PHASE_NAMES / sizeof PHASE_NAMES[0] || at == V.njobs)
        fail2("unknown phase from the guest", 0, "code", code);
    const char *name = PHASE_NAMES[code];
    account(at);
    report_pages(name);
    struct rec r;
    begin(&r, "phase");
    f_str(&r, "name", name);
    end(&r);
    V.accounted = at + 1;

    if (code == PH_TOUCHED && pattern == P_DIRTY_LOG) {
        V.slots[SLOT_THP].flags |= KVM_MEM_LOG_DIRTY_PAGES;
        set_region(&V.slots[SLOT_THP], V.slots[SLOT_THP].size, "log");
    } else if (code == PH_TOUCHED && pattern == P_MEMSLOT) {
        set_region(&V.slots[SLOT_SMALL], 0, "delete");
        V.slots[SLOT_MOVE].ipa = MOVED_IPA;
        set_region(&V.slots[SLOT_MOVE], V.slots[SLOT_MOVE].size, "move");
    } else if (code == PH_DIRTIED) {
        report_dirty(SLOT_THP);
    } else if (code == PH_SPINNING) {
        if (shared) {
            shared[V.index] = 1;
        } else {
            cur_vm = -1;
            begin(&r, "ready");
            f_str(&r, "pattern", PATTERN_NAMES[pattern]);
            f_int(&r, "vms", 1);
            end(&r);
            cur_vm = V.index;
        }
    }
}

static void set_reg(u64 id, u64 value)
{
    struct kvm_one_reg reg = {.id = id, .addr = (u64)&value};
    check("KVM_SET_ONE_REG", sys_ioctl(V.vcpu, KVM_SET_ONE_REG, (long)&reg));
}

static void __attribute__((noreturn)) run_vm(int index)
{
    struct rec r;
    V.index = index;
    cur_vm = index;
    V.pagemap = (int)check("open /proc/self/pagemap", sys_openat("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
    long kpf = sys_openat("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
    V.kpageflags = is_err(kpf) ? -1 : (int)kpf;

    V.fd = (int)check("KVM_CREATE_VM", sys_ioctl(kvm_fd, KVM_CREATE_VM, 0));
    long ipa_limit = sys_ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_ARM_VM_IPA_SIZE);
    begin(&r, "vm");
    f_int(&r, "pid", syscall0(NR_getpid));
    f_int(&r, "ipa_limit", ipa_limit);
    end(&r);

    int nslots = pattern == P_TWO_VMS ? 2 : NSLOTS;
    for (int i = 0; i < nslots; i++)
        add_slot(i);

    V.vcpu = (int)check("KVM_CREATE_VCPU", sys_ioctl(V.fd, KVM_CREATE_VCPU, 0));
    long run_size = check("KVM_GET_VCPU_MMAP_SIZE", sys_ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0));
    V.run = (u8 *)check("mmap kvm_run", sys_mmap((u64)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, V.vcpu));
    struct kvm_vcpu_init init;
    memset(&init, 0, sizeof init);
    check("KVM_ARM_PREFERRED_TARGET", sys_ioctl(V.fd, KVM_ARM_PREFERRED_TARGET, (long)&init));
    memset(init.features, 0, sizeof init.features);
    check("KVM_ARM_VCPU_INIT", sys_ioctl(V.vcpu, KVM_ARM_VCPU_INIT, (long)&init));

    u8 *code = host_of(CODE_IPA);
    memcpy(code, guest_code, (u64)(guest_code_end - guest_code));
    V.jobs = (struct job *)host_of(JOBS_IPA);
    build_jobs();
    mark(CODE_IPA, ACC_X);
    mark(JOBS_IPA, ACC_R);
    set_reg(REG_X(0), JOBS_IPA);
    set_reg(REG_X(1), MMIO_DONE);
    set_reg(REG_PC, CODE_IPA);
    set_reg(REG_PSTATE, PSTATE_EL1H_DAIF);
    begin(&r, "vcpu");
    f_int(&r, "target", init.target);
    f_hex(&r, "pc", CODE_IPA);
    f_hex(&r, "pstate", PSTATE_EL1H_DAIF);
    f_int(&r, "jobs", V.njobs);
    end(&r);

    for (;;) {
        long ret = sys_ioctl(V.vcpu, KVM_RUN, 0);
        if (ret == -EINTR)
            continue;
        check("KVM_RUN", ret);
        u32 reason = *(volatile u32 *)(V.run + KVM_RUN_EXIT_REASON);
        if (reason != KVM_EXIT_MMIO)
            fail2("unexpected KVM_RUN exit", 0, "reason", reason);
        struct kvm_run_mmio *m = (struct kvm_run_mmio *)(V.run + KVM_RUN_UNION);
        u64 data = 0;
        for (u32 i = 0; i < m->len && i < 8; i++)
            data |= (u64)m->data[i] << (8 * i);
        if (m->is_write && m->phys_addr == MMIO_DONE) {
            phase(data);
        } else if (m->is_write && m->phys_addr == MMIO_BAD) {
            fail2("a guest load did not return its address", 0, "ipa", data);
        } else {
            begin(&r, "mmio");
            f_hex(&r, "ipa", m->phys_addr);
            f_int(&r, "len", m->len);
            f_bool(&r, "write", m->is_write);
            f_hex(&r, "data", m->is_write ? data : 0);
            end(&r);
            if (!m->is_write)
                memset(m->data, 0, sizeof m->data);
        }
    }
}

static void read_cmdline(void)
{
    long fd = sys_openat("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    if (is_err(fd))
        return;
    long n = sys_pread((int)fd, cmdline, sizeof cmdline - 1, 0);
    cmdline[n > 0 ? n : 0] = 0;
    syscall1(NR_close, fd);
}

static int choose_pattern(void)
{
    static const char opt[] = "vmm.guest=";
    char name[32] = "touch";
    for (char *p = cmdline; *p;) {
        while (*p == ' ' || *p == '\n')
            p++;
        char *w = p;
        while (*p && *p != ' ' && *p != '\n')
            p++;
        u64 len = (u64)(p - w);
        if (len > sizeof opt - 1 && len - (sizeof opt - 1) < sizeof name) {
            u64 i = 0;
            while (i < sizeof opt - 1 && w[i] == opt[i])
                i++;
            if (i == sizeof opt - 1) {
                memcpy(name, w + i, len - i);
                name[len - i] = 0;
            }
        }
    }
    for (int i = 0; i < (int)(sizeof PATTERN_NAMES / sizeof PATTERN_NAMES[0]); i++)
        if (seq(name, PATTERN_NAMES[i]))
            return i;
    struct rec r;
    begin(&r, "error");
    f_str(&r, "what", "unknown vmm.guest pattern");
    f_int(&r, "errno", 0);
    f_str(&r, "pattern", name);
    end(&r);
    hang();
}

void vmm_main(long *sp)
{
    (void)sp;
    long fd = sys_openat("/dev/console", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (!is_err(fd))
        out_fd = (int)fd;
    long m = syscall5(NR_mount, "proc", "/proc", "proc", 0, 0);
    if (is_err(m) && m != -EBUSY)
        fail("mount /proc", m);
    read_cmdline();
    pattern = (enum pattern)choose_pattern();
    struct rec r;
    begin(&r, "start");
    f_str(&r, "pattern", PATTERN_NAMES[pattern]);
    f_int(&r, "pid", syscall0(NR_getpid));
    end(&r);

    kvm_fd = (int)check("open /dev/kvm", sys_openat("/dev/kvm", O_RDWR | O_CLOEXEC));
    long api = check("KVM_GET_API_VERSION", sys_ioctl(kvm_fd, KVM_GET_API_VERSION, 0));
    if (api != KVM_API_VERSION)
        fail2("unexpected KVM API version", 0, "api", (u64)api);
    if (pattern != P_TWO_VMS)
        run_vm(0);

    /* two-vms: one child process per VM (a VM belongs to the mm that created it). */
    shared = (volatile u32 *)check("mmap shared page", sys_mmap(SZ_4K, PROT_READ | PROT_WRITE,
                                                                 MAP_SHARED | MAP_ANONYMOUS, -1));
    for (int i = 0; i < 2; i++) {
        long pid = check("clone", syscall5(NR_clone, SIGCHLD, 0, 0, 0, 0));
        if (pid == 0)
            run_vm(i);
    }
    while (!(shared[0] == 1 && shared[1] == 1)) {
        if (shared[0] == 2 || shared[1] == 2)
            hang(); /* the child reported its error */
        sleep_ms(10);
    }
    begin(&r, "ready");
    f_str(&r, "pattern", PATTERN_NAMES[pattern]);
    f_int(&r, "vms", 2);
    end(&r);
    for (;;) {
        int status;
        if (syscall4(NR_wait4, -1, &status, 0, 0) == -ECHILD)
            hang();
    }
}
