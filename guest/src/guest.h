/*
 * vmkit test guest: shared declarations.
 *
 * Everything here runs freestanding. CPL0 code must stay inside what KVM's
 * instruction emulator handles (see README.md): general-purpose registers
 * only, no x87/SSE, no popcnt/BMI, no int3/int n, no xsave family.
 */
#ifndef VMKIT_GUEST_H
#define VMKIT_GUEST_H

#include "layout.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define NORETURN __attribute__((noreturn))
#define PACKED __attribute__((packed))

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define ALIGN_UP(x, a) (((x) + (a) - 1) & ~((u64)(a) - 1))
#define ALIGN_DOWN(x, a) ((x) & ~((u64)(a) - 1))
#define KiB 1024ULL
#define MiB (1024ULL * KiB)
#define GiB (1024ULL * MiB)

/* ---- low-level CPU access (inline asm; all emulator-safe) ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u16 inw(u16 port)
{
    u16 v;
    __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u32 inl(u16 port)
{
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
static inline u64 read_cr2(void)
{
    u64 v;
    __asm__ volatile("mov %%cr2, %0" : "=r"(v));
    return v;
}
static inline void write_cr3(u64 v) { __asm__ volatile("mov %0, %%cr3" ::"r"(v) : "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline NORETURN void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt" ::: "memory");
}
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u8 rd8(u64 addr) { return *(volatile u8 *)addr; }
static inline u16 rd16(u64 addr) { return *(volatile u16 *)addr; }
static inline u32 rd32(u64 addr) { return *(volatile u32 *)addr; }
static inline u64 rd64(u64 addr) { return *(volatile u64 *)addr; }
static inline void wr8(u64 addr, u8 v) { *(volatile u8 *)addr = v; }
static inline void wr16(u64 addr, u16 v) { *(volatile u16 *)addr = v; }
static inline void wr32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline void wr64(u64 addr, u64 v) { *(volatile u64 *)addr = v; }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline void mfence(void) { __asm__ volatile("mfence" ::: "memory"); }

/* ---- lib.c ---- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
size_t strlen(const char *s);
bool str_eq(const char *a, const char *b);
/* Compares the first n bytes of a with the NUL-terminated b (and n == strlen(b)). */
bool word_eq(const char *a, size_t n, const char *b);
bool parse_u64(const char *s, size_t n, u64 *out);

/* ---- console.c: 16550 UART + line formatting ---- */
struct line {
    char buf[192];
    size_t n;
};
void serial_init(void);
/* Starts a line with "vmkit-guest: " and takes the console lock. */
void line_begin(struct line *l);
void line_str(struct line *l, const char *s);
void line_strn(struct line *l, const char *s, size_t n);
void line_char(struct line *l, char c);
void line_dec(struct line *l, u64 v);
void line_hex(struct line *l, u64 v); /* prints 0x... */
void line_hexpad(struct line *l, u64 v, u32 width); /* exactly width hex digits, no 0x */
/* Appends "\n", writes the line out and drops the console lock. */
void line_end(struct line *l);
/* One whole line from a plain string. */
void say(const char *s);
/* Exception path: forget a lock that this CPU may hold. */
void console_break_lock(void);

/* A step's result text: " key=value ..." on success, or the failure message. */
struct result {
    char buf[320];
    size_t n;
};
void res_str(struct result *r, const char *s);
void res_strn(struct result *r, const char *s, size_t n);
void res_dec(struct result *r, u64 v);
void res_hex(struct result *r, u64 v);
void res_kv_dec(struct result *r, const char *key, u64 v); /* " key=<dec>" */
void res_kv_hex(struct result *r, const char *key, u64 v); /* " key=0x<hex>" */

/* ---- boot.c: what the VMM handed over, copied out of the boot structures ---- */
struct mem_range {
    u64 start;
    u64 size;
    u32 type; /* e820 type: 1 = RAM */
};
struct module_range {
    u64 start;
    u64 size;
};
struct boot_info {
    u32 protocol;
    u32 cmdline_len;
    char cmdline[CMDLINE_MAX + 1];
    u32 nmap;
    struct mem_range map[MEMMAP_MAX];
    u32 nmods;
    struct module_range mods[MODULES_MAX];
    u64 rsdp; /* 0 if the boot structure did not give one */
    u64 ram_top; /* end of the highest RAM range */
};
extern struct boot_info boot;
void boot_copy_info(u32 protocol, u64 info);

/* ---- mm.c: page tables, GDT/TSS/IDT, simple page allocator ---- */
extern u64 mapped_top;   /* identity map covers [0, mapped_top) plus the MMIO hole */
extern u64 alloc_top;    /* end of everything the guest allocated (footprint end) */
void mm_init(void);
void cpu_tables_init(void);
void *alloc_pages(u64 npages); /* NULL if no RAM is left */
bool range_mapped(u64 addr, u64 len); /* mapped at all (CPL0) */
bool user_mapped(u64 addr, u64 len);  /* mapped with U/S (CPL3) */
/* Identity-maps [addr, addr+len) uncached (2 MiB pages, below 2^46), user-accessible if asked. */
bool map_mmio(u64 addr, u64 len, bool user);
bool map_memory(u64 addr, u64 len);
void idt_install(u32 vec, u64 handler);
extern char _image_start[], _image_end[], _end[];

/* ---- entry.S ---- */
/* Runs fn(arg) at CPL3 on the user stack and returns its value (entry.S explains how). */
u64 run_user(u64 (*fn)(void *), void *arg);
extern const u64 exception_stubs[32];
void timer_irq_stub(void);
extern const u64 irq_stubs[IRQ_VECTORS];       /* vectors IRQ_VECTOR_BASE.. (MSI-X test) */
extern volatile u32 irq_counts[IRQ_VECTORS];   /* interrupts seen per vector */
void spurious_irq_stub(void);
void ap_entry64(void);
extern volatile u32 timer_fired;
extern u64 ap_stack_base;
extern volatile u32 ap_slot;
extern char tramp_start[], tramp_end[], tramp_cr3[];
extern u64 boot_gdt[];
NORETURN void triple_fault(void);

/* ---- user.c: code that runs at CPL3 (native speed) ---- */
struct seg {
    u64 start;
    u64 end;
};
struct memtest_job {
    u64 stride; /* one qword per stride between the fully tested ends */
    u32 nseg;
    struct seg segs[MEMTEST_SEGS_MAX];
    /* results */
    u64 checked_bytes;
    u32 failed;
    u64 fail_addr, fail_expected, fail_found;
};
u64 user_memtest(void *job);
u64 user_memcheck(void *job);
bool mem_hp_first_dimm(u64 *start, u64 *end);
struct cpl3_job {
    u64 iterations;
    u64 tsc;
};
u64 user_spin(void *job);
struct dirty_job {
    u64 start, end; /* the region, qword-aligned */
    u64 round;      /* writes this round's values after checking the last round's */
    u64 fail_addr, fail_expected, fail_found;
};
u64 user_dirty(void *job);
struct csum_job {
    u32 n;
    struct {
        u64 addr;
        u32 len;
        u8 sum;
    } t[ACPI_TABLES_MAX];
};
u64 user_checksum(void *job);
struct scan_job {
    u64 start, end;
    u64 found; /* 0 if not found */
};
u64 user_find_rsdp(void *job);
struct s5_job {
    u64 addr;
    u32 len;
    u32 found;
    u32 slp_typ;
};
u64 user_find_s5(void *job);
/* PCI host bridges (Device objects named PCxx) in the DSDT and their _PXM. */
struct pxm_job {
    u64 addr;
    u32 len;
    u32 n;         /* bridges found (at most PXM_MAX recorded) */
    u32 overflow;  /* 1 if more than PXM_MAX were found */
    struct {
        char name[4];
        u32 kind; /* 0: no _PXM, 1: a constant (value), 2: a _PXM it cannot read */
        u64 value;
    } dev[PXM_MAX];
};
u64 user_find_pxm(void *job);
/* tpm: one command through the CRB, and the DSDT's TPM device. */
enum { TPMX_OK, TPMX_TIMEOUT, TPMX_BAD_SIZE };
struct tpm_job {
    u64 crb;                /* the CRB's locality 0 page (user-mapped) */
    u64 buf_addr;           /* command and response buffer (CRB_CTRL_CMD_LADDR) */
    u32 buf_size;           /* CRB_CTRL_CMD_SIZE */
    const u8 *cmd;          /* in RAM, cmd_len bytes */
    u32 cmd_len;
    u8 *rsp;                /* in RAM, rsp_cap bytes */
    u32 rsp_cap;
    u64 timeout;            /* TSC ticks CRB_CTRL_START may stay set */
    /* results */
    u32 err;                /* TPMX_* */
    u32 rsp_len;            /* the response header's size (what was copied: at most rsp_cap) */
    u32 ctrl_sts, ctrl_start;
    u64 tsc;                /* from START to its clearing */
};
u64 user_tpm_exchange(void *job);
struct hid_job {
    u64 addr;               /* the DSDT */
    u32 len;
    u32 found;              /* "MSFT0101" seen; then a Memory32Fixed after it: */
    u32 crs_found, crs_base, crs_len;
};
u64 user_find_tpm_hid(void *job);

/* ---- acpi.c ---- */
struct acpi_table {
    char sig[4];
    u64 addr;
    u32 len;
};
struct acpi_info {
    bool ok;
    char err[96];
    u64 rsdp;
    u32 rsdp_len;
    u32 ntables;       /* root table first, then its entries, then the DSDT */
    struct acpi_table tables[ACPI_TABLES_MAX];
    u64 fadt, madt, dsdt, facs;
    u32 fadt_len, madt_len, dsdt_len;
};
/* Finds the RSDP and walks the root table (cached; checksums are not checked here). */
const struct acpi_info *acpi_discover(void);
bool step_acpi(struct result *r);
bool step_acpidump(struct result *r);
/* A table listed by the root table (or the DSDT): its address and length, 0 if absent. */
u64 acpi_find_table(const char *sig, u32 *len);
/* Calls visit(apic_id, flags) for each MADT processor entry (local APIC or x2APIC), in order. */
void madt_for_each_cpu(void (*visit)(u32 apic_id, u32 flags, void *ctx), void *ctx);
u32 madt_cpus(u32 *ids, u32 max, u32 *enabled, u32 *listed);
/* Byte sums of the job's tables: at CPL3, or at CPL0 where a table is not user-accessible. */
void acpi_sums(struct csum_job *j);
/* Where the VMM's hot-plug registers are, read from the DSDT as an AML
 * interpreter finds them (vmkit and Cloud Hypervisor place them differently):
 * the OperationRegions GDST (GED event byte), PRST (CPU), MHPR (memory) and
 * PCST (PCI), and the GED's interrupt from its _CRS. `found` has a bit per
 * field found. Scanned once, at CPL3. */
#define HP_GED 0x01
#define HP_GED_GSI 0x02
#define HP_CPU 0x04
#define HP_MEMORY 0x08
#define HP_PCI 0x10
struct hotplug_regs {
    u64 addr;  /* the DSDT scanned */
    u32 len;
    u32 found;
    u64 ged, cpu, memory, pci;
    u32 ged_gsi;
};
const struct hotplug_regs *hotplug_regs(void);
u64 user_find_hotplug_regs(void *job);

/* ---- numa.c ---- */
bool step_numa(struct result *r);

/* ---- apic.c ---- */
bool step_smp(struct result *r);
bool step_cpuhotplug(struct result *r);
bool step_memhotplug(struct result *r);
bool step_memhpgarbage(struct result *r);
bool step_cpuunplug(struct result *r);
bool step_pcihotplug(struct result *r);
bool step_pciunplug(struct result *r);
bool step_pcihostile(struct result *r);
/* Waits (10 s at most) for the GED interrupt, found from the DSDT as the
 * hot-plug controllers are, and reads its event byte: the byte if it has
 * `bit`, else -1 with the reason in r. */
int ged_wait_event(u8 bit, const char *waiting, struct result *r);
bool step_timer(struct result *r);
void ap_main(void);
u32 lapic_id(void);
bool lapic_usable(struct result *r);
/* Periodic LAPIC timer on TIMER_VECTOR: a wake-up for hlt loops. */
void lapic_tick_start(u32 count);
void lapic_tick_stop(void);

/* ---- main.c ---- */
struct config {
    const char *steps; /* steps=a,b,c (not NUL-terminated: see steps_len) */
    size_t steps_len;
    const char *exit; /* exit=<how> */
    size_t exit_len;
    u64 pio_rounds;
    u64 cpl3_iterations;
    u64 memmap_stride;
    u64 ticks, tick_ms;
    bool pio_bad, cpl3_bad, stride_bad, ticks_bad; /* value did not parse */
    u64 blk_sector, blk_count;
    bool blk_bad;
    const char *bench_mode; /* blkbench_mode= (not NUL-terminated) */
    size_t bench_mode_len;
    u64 bench_size, bench_depth, bench_count, bench_lax_len, bench_stall_ms;
    bool bench_bad;
    u64 net_timeout_ms, net_lax_len;
    bool net_bad;
    u64 dirty_mib, dirty_rounds, dirty_ms, dirty_dimm;
    bool dirty_bad;
    u64 pvpanic_event;
    bool pvpanic_bad;
    u64 watchdog_pets, watchdog_pet_ms;
    bool watchdog_bad;
    u64 vsock_port, vsock_host_port, vsock_accept, vsock_connect, vsock_bytes, vsock_timeout_ms;
    u64 vsock_check, vsock_echo, vsock_cpl3;
    u64 pmem_offset, pmem_bytes;
    bool pmem_bad;
    u64 balloon_mib, balloon_timeout_ms, balloon_lax_len;
    bool balloon_bad;
    u64 virtiomem_timeout_ms, virtiomem_hostile, virtiomem_wait;
    bool virtiomem_bad;
    bool vsock_bad;
    const char *fs_read, *fs_write; /* fs_read=, fs_write= (not NUL-terminated) */
    size_t fs_read_len, fs_write_len;
    u64 fs_bytes, fs_rounds;
    bool fs_bad;
    u64 tpm_timeout_ms;
    bool tpm_bad;
};
extern struct config cfg;
extern u64 tsc_khz; /* 0 if unknown */
bool step_cpl3(struct result *r);
bool step_pio(struct result *r);
bool step_dirty(struct result *r);
/* Timeout helper: TSC ticks for ms milliseconds (over-estimates if the TSC rate is unknown). */
u64 ms_to_tsc(u64 ms);
NORETURN void exception_handler(u64 *frame);

/* ---- pci.c, virtio.c, vsteps.c, blk.c ---- */
bool step_pci(struct result *r);
bool step_rng(struct result *r);
bool step_blk(struct result *r);
bool step_console(struct result *r);
bool step_msix(struct result *r);
bool step_blkbench(struct result *r);
bool step_net(struct result *r);
bool step_watchdog(struct result *r);
bool step_pvpanic(struct result *r);
bool step_vsock(struct result *r);
bool step_pmem(struct result *r);
bool step_balloon(struct result *r);
bool step_virtiomem(struct result *r);
bool step_fs(struct result *r);
bool step_tpm(struct result *r);

/* ---- ioapic.c ---- */
#define ENTRY_MASKED (1u << 16)
#define ENTRY_LEVEL (1u << 15)
bool ioapic_map(void);
u32 ioapic_read(u32 reg);
void ioapic_write(u32 reg, u32 v);
void ioapic_route(u32 pin, u32 vector, u32 apic_id, u32 flags);
/* Routes IOAPIC `pin` to `vector` on this CPU, says `waiting`, and halts until
 * the interrupt comes or `timeout_ms` pass; the pin is masked again after.
 * Returns the interrupts seen (0: none in time). IOAPIC and LAPIC must be set
 * up by the caller. */
u32 wait_pin_interrupt(u32 pin, u32 vector, const char *waiting, u64 timeout_ms);
bool step_ioapic(struct result *r);

/* ---- power.c ---- */
bool step_powerbutton(struct result *r);

/* ---- memmap.c ---- */
bool step_memmap(struct result *r);

/* ---- exit.c ---- */
NORETURN void do_exit(const char *how, size_t len);

#endif
