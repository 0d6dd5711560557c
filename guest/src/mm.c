/*
 * Memory management: final page tables, a bump page allocator, and the
 * CPU tables (TSS, IDT).
 *
 * The identity map is mostly static (head.S): 0-3 GiB write-back and
 * user-accessible, 3-4 GiB uncached MMIO. mm_init trims it to the RAM top
 * from the memory map, turns RAM inside 3-4 GiB (if any) write-back, and
 * adds page directories for RAM above 4 GiB (up to 64 GiB).
 */
#include "guest.h"

#define PTE_P 0x001ULL
#define PTE_RW 0x002ULL
#define PTE_US 0x004ULL
#define PTE_PWT 0x008ULL
#define PTE_PCD 0x010ULL
#define PTE_PS 0x080ULL
#define PTE_ADDR 0x000ffffffffff000ULL
#define PTE_TABLE (PTE_P | PTE_RW | PTE_US)
#define PTE_RAM (PTE_P | PTE_RW | PTE_US | PTE_PS)
#define PAGE_2M (2 * MiB)
#define MAP_LIMIT (64 * GiB)
#define HOLE_START (3 * GiB)
#define HOLE_END (4 * GiB)

extern u64 pml4[512], pdpt[512], pd_low[3 * 512], pd_hole[512];
extern char trap_stack_top[], ist_stack_top[];

u64 mapped_top;
u64 alloc_top;

static void zero_qwords(u64 *p, u64 n) { __asm__ volatile("rep stosq" : "+D"(p), "+c"(n) : "a"(0ULL) : "memory"); }

static bool is_ram(u64 start, u64 size)
{
    u32 i;
    for (i = 0; i < boot.nmap; i++) {
        const struct mem_range *m = &boot.map[i];
        if (m->type == 1 && start >= m->start && start + size <= m->start + m->size)
            return true;
    }
    return false;
}

void *alloc_pages(u64 npages)
{
    u64 size = npages * 4096, p = ALIGN_UP(alloc_top, 4096);
    u32 i;
again:
    for (i = 0; i < boot.nmods; i++) { /* never hand out an initramfs */
        const struct module_range *m = &boot.mods[i];
        if (p < m->start + m->size && m->start < p + size) {
            p = ALIGN_UP(m->start + m->size, 4096);
            goto again;
        }
    }
    if (p + size > mapped_top || (boot.nmap && !is_ram(p, size)))
        return NULL;
    alloc_top = p + size;
    return (void *)p;
}

/* Maps [a, top) of one GiB with 2 MiB pages, the rest of the directory empty. */
static void fill_pd(u64 *pd, u64 a, u64 top)
{
    u64 e = a | PTE_RAM;
    u32 j = 0;
    /* Unrolled: the loop overhead is emulated too. */
    for (; j + 8 <= 512 && a + 8 * PAGE_2M <= top; j += 8, a += 8 * PAGE_2M, e += 8 * PAGE_2M) {
        pd[j] = e;
        pd[j + 1] = e + 1 * PAGE_2M;
        pd[j + 2] = e + 2 * PAGE_2M;
        pd[j + 3] = e + 3 * PAGE_2M;
        pd[j + 4] = e + 4 * PAGE_2M;
        pd[j + 5] = e + 5 * PAGE_2M;
        pd[j + 6] = e + 6 * PAGE_2M;
        pd[j + 7] = e + 7 * PAGE_2M;
    }
    for (; j < 512 && a < top; j++, a += PAGE_2M, e += PAGE_2M)
        pd[j] = e;
    if (j < 512)
        zero_qwords(&pd[j], 512 - j);
}

void mm_init(void)
{
    u64 top = boot.ram_top ? boot.ram_top : 1 * GiB; /* no map: what every VMM maps */
    u32 i;

    if (top > MAP_LIMIT)
        top = MAP_LIMIT;
    top = ALIGN_UP(top, PAGE_2M);
    mapped_top = top;
    alloc_top = ALIGN_UP((u64)_end, 4096);

    /* Drop what lies above the RAM top below 3 GiB: whole GiBs in the PDPT,
     * the rest in the page directory (each emulated store costs ~0.5 us). */
    if (top < HOLE_START) {
        u64 g = ALIGN_UP(top, GiB) / GiB;
        for (i = (u32)g; i < 3; i++)
            pdpt[i] = 0;
        if (top % GiB)
            zero_qwords(&pd_low[top / PAGE_2M], (GiB - top % GiB) / PAGE_2M);
    }

    /* RAM inside the 3-4 GiB window (a VMM may end low RAM above 3 GiB): write-back, user. */
    for (i = 0; i < boot.nmap; i++) {
        const struct mem_range *m = &boot.map[i];
        u64 s = ALIGN_UP(m->start, PAGE_2M), e = ALIGN_DOWN(m->start + m->size, PAGE_2M);
        if (m->type != 1)
            continue;
        if (s < HOLE_START)
            s = HOLE_START;
        if (e > HOLE_END)
            e = HOLE_END;
        for (; s < e; s += PAGE_2M)
            pd_hole[(s - HOLE_START) / PAGE_2M] = s | PTE_RAM;
    }

    /* RAM above 4 GiB: one page directory per GiB. */
    for (i = 4; (u64)i * GiB < top; i++) {
        u64 *pd = alloc_pages(1);
        if (!pd) {
            mapped_top = (u64)i * GiB; /* out of low RAM for tables: map less */
            break;
        }
        fill_pd(pd, (u64)i * GiB, top);
        pdpt[i] = (u64)pd | PTE_TABLE;
    }
    write_cr3((u64)pml4);
}

/* The 2 MiB page-directory entry for a (0 if a level is missing). */
static u64 pte_of(u64 a)
{
    u64 e;
    if (a >= (1ULL << 48))
        return 0;
    e = pml4[(a >> 39) & 511];
    if (!(e & PTE_P))
        return 0;
    e = ((const u64 *)(e & PTE_ADDR))[(a >> 30) & 511];
    if (!(e & PTE_P) || (e & PTE_PS))
        return 0; /* 1 GiB pages are never used here */
    return ((const u64 *)(e & PTE_ADDR))[(a >> 21) & 511];
}

/* The table entry t[i] points to, allocated (zeroed) if missing. */
static u64 *next_table(u64 *t, u32 i)
{
    u64 *n;
    if (t[i] & PTE_P)
        return (t[i] & PTE_PS) ? NULL : (u64 *)(t[i] & PTE_ADDR);
    n = alloc_pages(1);
    if (!n)
        return NULL;
    zero_qwords(n, 512);
    t[i] = (u64)n | PTE_TABLE;
    return n;
}

/*
 * Device memory (ECAM, BARs) may sit anywhere: in the 3-4 GiB hole, inside
 * what the static map covers as RAM, or above RAM (64-bit BARs). Each 2 MiB
 * page touched becomes uncached (PCD|PWT, PAT entry 3); U/S is kept if the
 * page had it (it may share its 2 MiB with RAM).
 */
static bool map_range(u64 addr, u64 len, bool user, bool cached);

bool map_mmio(u64 addr, u64 len, bool user) { return map_range(addr, len, user, false); }

/* Memory outside the boot map (a virtio-mem region): write-back, user-accessible. */
bool map_memory(u64 addr, u64 len) { return map_range(addr, len, true, true); }

static bool map_range(u64 addr, u64 len, bool user, bool cached)
{
    u64 p, end = addr + len;
    if (!len || end < addr || end > (1ULL << 46))
        return false;
    for (p = ALIGN_DOWN(addr, PAGE_2M); p < end; p += PAGE_2M) {
        u64 *pdp = next_table(pml4, (u32)(p >> 39) & 511);
        u64 *pd = pdp ? next_table(pdp, (u32)(p >> 30) & 511) : NULL;
        u64 old, e;
        if (!pd)
            return false;
        old = pd[(p >> 21) & 511];
        e = p | PTE_P | PTE_RW | PTE_PS | (cached ? 0 : PTE_PWT | PTE_PCD);
        if (user || ((old & PTE_P) && (old & PTE_US)))
            e |= PTE_US;
        if (old != e) {
            pd[(p >> 21) & 511] = e;
            __asm__ volatile("invlpg (%0)" ::"r"(p) : "memory");
        }
    }
    return true;
}

/* Whether [addr, addr+len) is mapped (for CPL3 if user). */
static bool mapped(u64 addr, u64 len, bool user)
{
    u64 p, end = addr + (len ? len : 1);
    if (end < addr)
        return false;
    for (p = ALIGN_DOWN(addr, PAGE_2M); p < end; p += PAGE_2M) {
        u64 e = pte_of(p);
        if (!(e & PTE_P) || (user && !(e & PTE_US)))
            return false;
    }
    return true;
}

bool range_mapped(u64 addr, u64 len) { return mapped(addr, len, false); }
bool user_mapped(u64 addr, u64 len) { return mapped(addr, len, true); }

/* ---- TSS, IDT ---- */

struct tss {
    u32 reserved0;
    u64 rsp[3];
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
} PACKED;

static struct tss tss;
static u64 idt[256 * 2] __attribute__((aligned(4096)));
struct {
    u16 limit;
    u64 base;
} PACKED idt_desc;

static void idt_set(u32 vec, u64 handler, u32 ist)
{
    idt[vec * 2] = (handler & 0xffff) | ((u64)KERNEL_CS << 16) | ((u64)ist << 32) |
                   (0x8eULL << 40) /* present, DPL 0, interrupt gate */ |
                   (((handler >> 16) & 0xffff) << 48);
    idt[vec * 2 + 1] = handler >> 32;
}

void idt_install(u32 vec, u64 handler) { idt_set(vec, handler, 0); }

void cpu_tables_init(void)
{
    u64 base = (u64)&tss, limit = sizeof(tss) - 1;
    u32 v;

    /* TSS: RSP0 for traps from CPL3, IST1 for #DF (a fresh stack even if RSP
     * is bad); no I/O bitmap. APs have no TSS, but only run CPL0 code. */
    tss.rsp[0] = (u64)trap_stack_top;
    tss.ist[0] = (u64)ist_stack_top;
    tss.iomap_base = sizeof(tss);
    boot_gdt[TSS_SEL / 8] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ULL << 40) |
                            (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    boot_gdt[TSS_SEL / 8 + 1] = base >> 32;
    __asm__ volatile("ltr %w0" ::"r"(TSS_SEL));

    for (v = 0; v < 32; v++)
        idt_set(v, exception_stubs[v], v == 8 ? 1 : 0);
    idt_set(TIMER_VECTOR, (u64)timer_irq_stub, 0);
    idt_set(SPURIOUS_VECTOR, (u64)spurious_irq_stub, 0);
    idt_desc.limit = sizeof(idt) - 1;
    idt_desc.base = (u64)idt;
    __asm__ volatile("lidt %0" ::"m"(idt_desc));
}
