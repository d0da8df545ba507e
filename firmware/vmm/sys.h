/* pgtable-harness VMM: raw Linux arm64 system calls and the KVM ABI it uses (no libc).
 *
 * Numbers and layouts are the kernel's uapi (include/uapi/asm-generic/unistd.h,
 * include/uapi/linux/kvm.h, arch/arm64/include/uapi/asm/kvm.h), restated here. */
#ifndef VMM_SYS_H
#define VMM_SYS_H

typedef unsigned long u64;
typedef long s64;
typedef unsigned int u32;
typedef int s32;
typedef unsigned short u16;
typedef unsigned char u8;

/* --- system calls (asm-generic numbering, as arm64 uses) --- */
#define NR_mkdirat 34
#define NR_mount 40
#define NR_openat 56
#define NR_close 57
#define NR_read 63
#define NR_write 64
#define NR_pread64 67
#define NR_exit 93
#define NR_nanosleep 101
#define NR_getpid 172
#define NR_ioctl 29
#define NR_munmap 215
#define NR_clone 220
#define NR_mmap 222
#define NR_madvise 233
#define NR_wait4 260

#define AT_FDCWD (-100)
#define O_RDONLY 0
#define O_RDWR 02
#define O_NOCTTY 0400
#define O_CLOEXEC 02000000
#define PROT_READ 0x1
#define PROT_WRITE 0x2
#define MAP_SHARED 0x01
#define MAP_PRIVATE 0x02
#define MAP_ANONYMOUS 0x20
#define MADV_HUGEPAGE 14
#define MADV_NOHUGEPAGE 15
#define SIGCHLD 17
#define EINTR 4
#define EBUSY 16
#define ECHILD 10

static inline long syscall6(long n, long a, long b, long c, long d, long e, long f)
{
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    register long x4 __asm__("x4") = e;
    register long x5 __asm__("x5") = f;
    __asm__ volatile("svc #0"
                     : "+r"(x0)
                     : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5)
                     : "memory", "cc");
    return x0;
}

#define syscall0(n) syscall6((n), 0, 0, 0, 0, 0, 0)
#define syscall1(n, a) syscall6((n), (long)(a), 0, 0, 0, 0, 0)
#define syscall2(n, a, b) syscall6((n), (long)(a), (long)(b), 0, 0, 0, 0)
#define syscall3(n, a, b, c) syscall6((n), (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define syscall4(n, a, b, c, d) syscall6((n), (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)
#define syscall5(n, a, b, c, d, e) syscall6((n), (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), 0)

/* A raw return value in [-4095, -1] is -errno. */
static inline int is_err(long r) { return r < 0 && r >= -4095; }

/* --- ioctl numbers: _IOC(dir, type, nr, size) as asm-generic/ioctl.h encodes them --- */
#define IOC_NONE 0UL
#define IOC_WRITE 1UL
#define IOC_READ 2UL
#define IOC(dir, type, nr, size) (((dir) << 30) | ((u64)(size) << 16) | ((u64)(type) << 8) | (u64)(nr))
#define KVMIO 0xAE

struct kvm_userspace_memory_region {
    u32 slot;
    u32 flags;
    u64 guest_phys_addr;
    u64 memory_size;
    u64 userspace_addr;
};

struct kvm_dirty_log {
    u32 slot;
    u32 padding1;
    u64 dirty_bitmap; /* user pointer */
};

struct kvm_one_reg {
    u64 id;
    u64 addr;
};

struct kvm_vcpu_init {
    u32 target;
    u32 features[7];
};

_Static_assert(sizeof(struct kvm_userspace_memory_region) == 32, "kvm_userspace_memory_region");
_Static_assert(sizeof(struct kvm_dirty_log) == 16, "kvm_dirty_log");
_Static_assert(sizeof(struct kvm_one_reg) == 16, "kvm_one_reg");
_Static_assert(sizeof(struct kvm_vcpu_init) == 32, "kvm_vcpu_init");

#define KVM_GET_API_VERSION IOC(IOC_NONE, KVMIO, 0x00, 0)
#define KVM_CREATE_VM IOC(IOC_NONE, KVMIO, 0x01, 0)
#define KVM_CHECK_EXTENSION IOC(IOC_NONE, KVMIO, 0x03, 0)
#define KVM_GET_VCPU_MMAP_SIZE IOC(IOC_NONE, KVMIO, 0x04, 0)
#define KVM_CREATE_VCPU IOC(IOC_NONE, KVMIO, 0x41, 0)
#define KVM_GET_DIRTY_LOG IOC(IOC_WRITE, KVMIO, 0x42, sizeof(struct kvm_dirty_log))
#define KVM_SET_USER_MEMORY_REGION IOC(IOC_WRITE, KVMIO, 0x46, sizeof(struct kvm_userspace_memory_region))
#define KVM_RUN IOC(IOC_NONE, KVMIO, 0x80, 0)
#define KVM_SET_ONE_REG IOC(IOC_WRITE, KVMIO, 0xac, sizeof(struct kvm_one_reg))
#define KVM_ARM_VCPU_INIT IOC(IOC_WRITE, KVMIO, 0xae, sizeof(struct kvm_vcpu_init))
#define KVM_ARM_PREFERRED_TARGET IOC(IOC_READ, KVMIO, 0xaf, sizeof(struct kvm_vcpu_init))

#define KVM_API_VERSION 12
#define KVM_CAP_ARM_VM_IPA_SIZE 165
#define KVM_MEM_LOG_DIRTY_PAGES (1U << 0)

#define KVM_EXIT_MMIO 6

/* struct kvm_run: the fields this VMM reads (offsets from include/uapi/linux/kvm.h, arm64). */
#define KVM_RUN_EXIT_REASON 8
#define KVM_RUN_UNION 32
struct kvm_run_mmio {
    u64 phys_addr;
    u8 data[8];
    u32 len;
    u8 is_write;
};

/* KVM_{GET,SET}_ONE_REG ids of the core registers: KVM_REG_ARM64 | KVM_REG_SIZE_U64 |
 * KVM_REG_ARM_CORE | (offset in struct kvm_regs / 4); kvm_regs starts with user_pt_regs
 * {regs[31], sp, pc, pstate}. */
#define KVM_REG_ARM64 0x6000000000000000UL
#define KVM_REG_SIZE_U64 0x0030000000000000UL
#define KVM_REG_ARM_CORE (0x0010UL << 16)
#define CORE_REG(off) (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | ((u64)(off) / 4))
#define REG_X(n) CORE_REG((n) * 8)
#define REG_PC CORE_REG(32 * 8)
#define REG_PSTATE CORE_REG(33 * 8)
#define PSTATE_EL1H_DAIF 0x3c5UL /* EL1h, D, A, I, F masked */

/* /proc/self/pagemap and /proc/kpageflags */
#define PM_PFN_MASK ((1UL << 55) - 1)
#define PM_PRESENT (1UL << 63)
#define KPF_THP 22
#define KPF_ZERO_PAGE 24

#endif
