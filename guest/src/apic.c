/*
 * Local APIC (xAPIC, MMIO at 0xfee00000): AP start-up and the timer step.
 */
#include "guest.h"

#define LAPIC_BASE 0xfee00000ULL
#define LAPIC_ID 0x020
#define LAPIC_EOI 0x0b0
#define LAPIC_SVR 0x0f0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_CUR 0x390
#define LAPIC_TIMER_DIV 0x3e0
#define ICR_PENDING (1u << 12)
#define ICR_INIT 0x00004500 /* INIT, level assert */
#define ICR_SIPI 0x00004600 /* start-up, level assert; | vector */
#define LVT_MASKED (1u << 16)
#define LVT_PERIODIC (1u << 17)
#define TIMER_COUNT 100000

extern u64 pml4[];

static volatile u8 ap_up[MAX_APIC_ID + 1];

static u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
static void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC_BASE + reg, v); }

u32 lapic_id(void) { return lapic_read(LAPIC_ID) >> 24; }

/* The guest drives the LAPIC through xAPIC MMIO; check that is what is active. */
bool lapic_usable(struct result *r)
{
    u64 base = rdmsr(MSR_APIC_BASE);
    if (!(base & (1 << 11))) {
        res_str(r, "local APIC disabled in IA32_APIC_BASE");
        return false;
    }
    if (base & (1 << 10)) {
        res_str(r, "local APIC is in x2APIC mode");
        return false;
    }
    if ((base & ~0xfffULL) != LAPIC_BASE) {
        res_str(r, "local APIC not at 0xfee00000");
        return false;
    }
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR); /* software-enable */
    return true;
}

static bool icr_send(u32 apic_id, u32 low)
{
    u32 spins = 0;
    while (lapic_read(LAPIC_ICR_LO) & ICR_PENDING)
        if (++spins == 100000)
            return false;
    lapic_write(LAPIC_ICR_HI, apic_id << 24);
    lapic_write(LAPIC_ICR_LO, low);
    return true;
}

/* APs: print, then mark ourselves up (after the line, so the BSP's result follows it). */
void ap_main(void)
{
    u32 id = lapic_id();
    struct line l;
    line_begin(&l);
    line_str(&l, "smp cpu apic_id=");
    line_dec(&l, id);
    line_str(&l, " up");
    line_end(&l);
    if (id <= MAX_APIC_ID)
        __atomic_store_n(&ap_up[id], 1, __ATOMIC_RELEASE);
    halt_forever();
}

bool step_smp(struct result *r)
{
    static u32 ids[MAX_APIC_ID + 1];
    const struct acpi_info *a = acpi_discover();
    u32 n, i, enabled, listed, bsp, want = 0, unreachable = 0, up, size;
    u64 deadline;
    u8 *stacks;

    if (!a->ok) {
        res_str(r, a->err);
        return false;
    }
    if (!a->madt) {
        res_str(r, "no MADT");
        return false;
    }
    if (!lapic_usable(r))
        return false;
    n = madt_cpus(ids, ARRAY_SIZE(ids), &enabled, &listed);
    bsp = lapic_id();
    for (i = 0; i < n; i++) {
        if (ids[i] == bsp)
            continue;
        if (ids[i] < MAX_APIC_ID)
            want++;
        else
            unreachable++; /* 0xff and x2APIC ids cannot be addressed through the xAPIC ICR */
    }

    /* Trampoline at 0x2000 (SIPI vector 2), running on our page tables. */
    size = (u32)(tramp_end - tramp_start);
    memcpy((void *)TRAMPOLINE_ADDR, tramp_start, size);
    *(volatile u32 *)(TRAMPOLINE_ADDR + (tramp_cr3 - tramp_start)) = (u32)(u64)pml4;
    stacks = want ? alloc_pages((u64)want * AP_STACK_SIZE / 4096) : NULL;
    if (want && !stacks) {
        res_str(r, "no memory for AP stacks");
        return false;
    }
    ap_stack_base = (u64)stacks;
    ap_slot = 0;
    for (i = 0; i < n; i++)
        if (ids[i] <= MAX_APIC_ID)
            ap_up[ids[i]] = 0;

    /* INIT, SIPI, SIPI (no delays: KVM latches INIT and SIPI in order). */
    for (i = 0; i < n; i++)
        if (ids[i] != bsp && ids[i] < MAX_APIC_ID)
            icr_send(ids[i], ICR_INIT);
    for (i = 0; i < n; i++)
        if (ids[i] != bsp && ids[i] < MAX_APIC_ID)
            icr_send(ids[i], ICR_SIPI | (TRAMPOLINE_ADDR >> 12));
    for (i = 0; i < n; i++)
        if (ids[i] != bsp && ids[i] < MAX_APIC_ID)
            icr_send(ids[i], ICR_SIPI | (TRAMPOLINE_ADDR >> 12));

    deadline = rdtsc() + ms_to_tsc(2000);
    do {
        up = 0;
        for (i = 0; i < n; i++)
            if (ids[i] != bsp && ids[i] < MAX_APIC_ID && __atomic_load_n(&ap_up[ids[i]], __ATOMIC_ACQUIRE))
                up++;
        if (up == want)
            break;
        cpu_relax();
    } while (rdtsc() < deadline);

    if (up == want && !unreachable) {
        res_kv_dec(r, "cpus", up + 1);
        return true;
    }
    res_str(r, "missing apic_id=");
    {
        bool first = true;
        for (i = 0; i < n; i++) {
            if (ids[i] == bsp || (ids[i] < MAX_APIC_ID && ap_up[ids[i]]))
                continue;
            if (!first)
                res_str(r, ",");
            res_dec(r, ids[i]);
            first = false;
        }
    }
    res_kv_dec(r, "cpus", up + 1);
    return false;
}

void lapic_tick_start(u32 count)
{
    lapic_write(LAPIC_TIMER_DIV, 0xb); /* divide by 1 */
    lapic_write(LAPIC_LVT_TIMER, LVT_PERIODIC | TIMER_VECTOR);
    lapic_write(LAPIC_TIMER_INIT, count);
}

void lapic_tick_stop(void)
{
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR);
    lapic_write(LAPIC_TIMER_INIT, 0);
}

bool step_timer(struct result *r)
{
    u64 deadline;
    if (!lapic_usable(r))
        return false;
    timer_fired = 0;
    lapic_write(LAPIC_TIMER_DIV, 0xb); /* divide by 1 */
    lapic_write(LAPIC_LVT_TIMER, TIMER_VECTOR); /* one-shot, unmasked */
    lapic_write(LAPIC_TIMER_INIT, TIMER_COUNT);
    deadline = rdtsc() + ms_to_tsc(1000);
    for (;;) {
        cli();
        if (timer_fired || rdtsc() > deadline)
            break;
        if (lapic_read(LAPIC_TIMER_CUR) == 0)
            /* Expired but not delivered yet: hlt could sleep forever, so poll. */
            __asm__ volatile("sti; pause" ::: "memory");
        else
            __asm__ volatile("sti; hlt" ::: "memory"); /* sti's shadow covers hlt */
    }
    cli();
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR);
    if (!timer_fired) {
        res_str(r, "no timer interrupt within 1000 ms");
        return false;
    }
    res_str(r, " source=lapic vector=");
    res_hex(r, TIMER_VECTOR);
    return true;
}

/*
 * The cpuhotplug and cpuunplug steps: vCPU hot-plug the way Linux's ACPI code
 * does it, without AML. Each waits for the VMM's Generic Event Device
 * interrupt with the CPU bit (bit 0 of its event register), then walks Cloud
 * Hypervisor's CPU hot-plug controller (the DSDT's PRST region) as the DSDT's
 * CSCN does: for each possible vCPU (the MADT's entries, in order) write its
 * index to the selection register (offset 0) and read its status (offset 4:
 * bit 0 enabled, 1 inserting, 2 removing), acknowledging each change by
 * writing its bit back. cpuhotplug starts each inserted vCPU with
 * INIT-SIPI-SIPI (it prints "smp cpu apic_id=<n> up" and halts); cpuunplug
 * ejects each one to remove (bit 3), as _EJ0 does. The registers' addresses
 * and the GED's interrupt come from the DSDT, so the steps run on vmkit and
 * on Cloud Hypervisor alike.
 */
#define GED_CPU_CHANGED 0x01
#define CPU_HP_ENABLED 0x01
#define CPU_HP_INSERTING 0x02
#define CPU_HP_REMOVING 0x04
#define CPU_HP_EJECT 0x08
#define HOTPLUG_VECTOR (IRQ_VECTOR_BASE + IRQ_VECTORS - 2)
#define HOTPLUG_TIMEOUT_MS 10000

static u64 cpu_hp_addr;

struct madt_list {
    u32 *ids, max, n;
};

static void list_cpu(u32 apic_id, u32 flags, void *ctx)
{
    struct madt_list *l = ctx;
    (void)flags;
    if (l->n < l->max)
        l->ids[l->n++] = apic_id;
}

/* Every MADT processor entry's APIC id, in order (the vCPU index is the position). */
static u32 madt_all_ids(u32 *ids, u32 max)
{
    struct madt_list l = {ids, max, 0};
    madt_for_each_cpu(list_cpu, &l);
    return l.n;
}

int ged_wait_event(u8 bit, const char *waiting, struct result *r)
{
    const struct hotplug_regs *hp = hotplug_regs();
    u64 ged = hp->ged;
    u32 gsi = hp->ged_gsi;
    u8 event;

    if (!lapic_usable(r))
        return -1;
    if ((hp->found & (HP_GED | HP_GED_GSI)) != (HP_GED | HP_GED_GSI) || gsi >= 24) {
        res_str(r, "no GED register region or interrupt (on the IOAPIC's 24 pins) in the DSDT");
        return -1;
    }
    if (!ioapic_map() || !map_mmio(ged, 1, false)) {
        res_str(r, "cannot map the IOAPIC or the GED");
        return -1;
    }
    if (!wait_pin_interrupt(gsi, HOTPLUG_VECTOR, waiting, HOTPLUG_TIMEOUT_MS)) {
        res_str(r, "no GED interrupt within 10000 ms");
        return -1;
    }
    event = rd8(ged);
    if (!(event & bit)) {
        res_str(r, "GED interrupt without the expected bit: event=");
        res_hex(r, event);
        return -1;
    }
    return event;
}

/* The CPU bit's event, with the controller located and mapped; -1 on failure. */
static int wait_cpu_event(const char *waiting, struct result *r)
{
    cpu_hp_addr = hotplug_regs()->cpu;
    if (!(hotplug_regs()->found & HP_CPU) || !map_mmio(cpu_hp_addr, 12, false)) {
        res_str(r, "no CPU hot-plug controller (PRST) in the DSDT, or it cannot be mapped");
        return -1;
    }
    return ged_wait_event(GED_CPU_CHANGED, waiting, r);
}

u32 wait_pin_interrupt(u32 pin, u32 vector, const char *waiting, u64 timeout_ms)
{
    u32 slot = vector - IRQ_VECTOR_BASE;
    u64 deadline;

    idt_install(vector, irq_stubs[slot]);
    irq_counts[slot] = 0;
    ioapic_route(pin, vector, lapic_id(), 0);
    say(waiting);
    lapic_tick_start(1000000); /* bounds each hlt */
    deadline = rdtsc() + ms_to_tsc(timeout_ms);
    for (;;) {
        cli();
        if (irq_counts[slot] || rdtsc() > deadline)
            break;
        __asm__ volatile("sti; hlt" ::: "memory"); /* sti's shadow covers hlt */
    }
    cli();
    lapic_tick_stop();
    ioapic_route(pin, vector, lapic_id(), ENTRY_MASKED);
    return irq_counts[slot];
}

static u8 cpu_hp_status(u32 index)
{
    wr32(cpu_hp_addr, index);
    return rd8(cpu_hp_addr + 4);
}

static void hotplug_line(const char *what, u32 index, u32 apic_id)
{
    struct line l;
    line_begin(&l);
    line_str(&l, what);
    line_str(&l, " uid=");
    line_dec(&l, index);
    line_str(&l, " apic_id=");
    line_dec(&l, apic_id);
    line_end(&l);
}

bool step_cpuhotplug(struct result *r)
{
    static u32 ids[MAX_APIC_ID + 1], added[MAX_APIC_ID + 1];
    u32 n, i, count = 0, up, size;
    u64 deadline;
    u8 *stacks;
    int event = wait_cpu_event("cpuhotplug waiting", r);

    if (event < 0)
        return false;
    n = madt_all_ids(ids, ARRAY_SIZE(ids));
    for (i = 0; i < n; i++) {
        u8 status = cpu_hp_status(i);
        if (!(status & CPU_HP_INSERTING))
            continue;
        wr8(cpu_hp_addr + 4, CPU_HP_INSERTING); /* acknowledge, as CSCN does */
        if (cpu_hp_status(i) & CPU_HP_INSERTING) {
            res_str(r, "the insertion was not acknowledged");
            return false;
        }
        if (!(status & CPU_HP_ENABLED) || ids[i] >= MAX_APIC_ID) {
            res_str(r, "inserted vCPU not enabled or not addressable: uid=");
            res_dec(r, i);
            return false;
        }
        hotplug_line("cpuhotplug inserted", i, ids[i]);
        added[count++] = ids[i];
    }
    if (!count) {
        res_str(r, "no vCPU being inserted");
        return false;
    }
    size = (u32)(tramp_end - tramp_start);
    memcpy((void *)TRAMPOLINE_ADDR, tramp_start, size);
    *(volatile u32 *)(TRAMPOLINE_ADDR + (tramp_cr3 - tramp_start)) = (u32)(u64)pml4;
    stacks = alloc_pages((u64)count * AP_STACK_SIZE / 4096);
    if (!stacks) {
        res_str(r, "no memory for AP stacks");
        return false;
    }
    ap_stack_base = (u64)stacks;
    ap_slot = 0;
    for (i = 0; i < count; i++)
        ap_up[added[i]] = 0;
    for (i = 0; i < count; i++)
        icr_send(added[i], ICR_INIT);
    for (i = 0; i < count; i++)
        icr_send(added[i], ICR_SIPI | (TRAMPOLINE_ADDR >> 12));
    for (i = 0; i < count; i++)
        icr_send(added[i], ICR_SIPI | (TRAMPOLINE_ADDR >> 12));
    deadline = rdtsc() + ms_to_tsc(2000);
    do {
        up = 0;
        for (i = 0; i < count; i++)
            if (__atomic_load_n(&ap_up[added[i]], __ATOMIC_ACQUIRE))
                up++;
        if (up == count)
            break;
        cpu_relax();
    } while (rdtsc() < deadline);
    res_kv_hex(r, "event", (u64)event);
    res_kv_dec(r, "added", count);
    res_kv_dec(r, "up", up);
    return up == count;
}

bool step_cpuunplug(struct result *r)
{
    static u32 ids[MAX_APIC_ID + 1];
    u32 n, i, count = 0;
    int event = wait_cpu_event("cpuunplug waiting", r);

    if (event < 0)
        return false;
    n = madt_all_ids(ids, ARRAY_SIZE(ids));
    for (i = 0; i < n; i++) {
        if (!(cpu_hp_status(i) & CPU_HP_REMOVING))
            continue;
        wr8(cpu_hp_addr + 4, CPU_HP_REMOVING); /* acknowledge, as CSCN does */
        wr8(cpu_hp_addr + 4, CPU_HP_EJECT);    /* _EJ0 */
        if (cpu_hp_status(i) & CPU_HP_ENABLED) {
            res_str(r, "still enabled after its eject: uid=");
            res_dec(r, i);
            return false;
        }
        hotplug_line("cpuunplug ejected", i, ids[i]);
        count++;
    }
    res_kv_hex(r, "event", (u64)event);
    res_kv_dec(r, "removed", count);
    return count > 0;
}

/*
 * The memhotplug step: ACPI memory hot-plug the way Linux's ACPI code does
 * it, without AML. It waits for the GED interrupt with the memory bit (bit
 * 1), then walks Cloud Hypervisor's memory hot-plug controller (the DSDT's
 * MHPR region: vmkit and Cloud Hypervisor place it differently) as the
 * DSDT's MSCN, MSTA and MCRS do: for each of the 8
 * slots write its number to the selection register (offset 0) and read its
 * status (offset 0x14: bit 0 enabled, 1 inserting); for each slot being
 * inserted, read its base (offsets 0, 4) and length (8, 0xc), acknowledge
 * (write bit 1 back), map the range and pattern-test it at CPL3 (every byte
 * of its first and last 64 KiB, one qword per 64 KiB between). ACPI memory
 * is never unplugged in Cloud Hypervisor v37: the step keeps it, and when it
 * runs again (`memhotplug,memhotplug`) it first checks that every DIMM an
 * earlier run tested still holds the pattern that run left ("kept=" bytes):
 * a VM snapshotted or migrated in between must bring its DIMMs along.
 */
#define GED_MEMORY_CHANGED 0x02
#define MEM_HP_SIZE 0x18
#define MEM_HP_ADDR mem_hp_addr
#define MEM_HP_STATUS (mem_hp_addr + 0x14)
#define MEM_HP_SLOTS 8
#define MEM_HP_ENABLED 0x01
#define MEM_HP_INSERTING 0x02

static u64 mem_hp_addr;
/* The DIMMs earlier memhotplug runs tested, holding their pattern. */
static struct memtest_job mem_hp_kept;

/* Finds the controller in the DSDT and maps `len` bytes of it. */
static bool mem_hp_map(u64 len, struct result *r)
{
    mem_hp_addr = hotplug_regs()->memory;
    if (!(hotplug_regs()->found & HP_MEMORY) || !map_mmio(mem_hp_addr, len, false)) {
        res_str(r, "no memory hot-plug controller (MHPR) in the DSDT, or it cannot be mapped");
        return false;
    }
    return true;
}

bool mem_hp_first_dimm(u64 *start, u64 *end)
{
    if (!mem_hp_kept.nseg)
        return false;
    *start = mem_hp_kept.segs[0].start;
    *end = mem_hp_kept.segs[0].end;
    return true;
}

static u64 mem_hp_qword(u64 offset)
{
    return rd32(MEM_HP_ADDR + offset) | ((u64)rd32(MEM_HP_ADDR + offset + 4) << 32);
}

bool step_memhotplug(struct result *r)
{
    static struct memtest_job job;
    u64 total = 0, kept = 0;
    u32 i, count = 0;
    int event;

    if (!mem_hp_map(MEM_HP_SIZE, r))
        return false;
    event = ged_wait_event(GED_MEMORY_CHANGED, "memhotplug waiting", r);
    if (event < 0)
        return false;
    if (mem_hp_kept.nseg) {
        mem_hp_kept.stride = 64 * KiB;
        run_user(user_memcheck, &mem_hp_kept);
        if (mem_hp_kept.failed) {
            res_str(r, "an earlier DIMM lost its pattern at ");
            res_hex(r, mem_hp_kept.fail_addr);
            res_str(r, " found ");
            res_hex(r, mem_hp_kept.fail_found);
            return false;
        }
        for (i = 0; i < mem_hp_kept.nseg; i++)
            kept += mem_hp_kept.segs[i].end - mem_hp_kept.segs[i].start;
    }
    for (i = 0; i < MEM_HP_SLOTS; i++) {
        struct line l;
        u64 base, size;
        u8 status;
        wr32(MEM_HP_ADDR, i);
        status = rd8(MEM_HP_STATUS);
        if (!(status & MEM_HP_INSERTING))
            continue;
        base = mem_hp_qword(0);
        size = mem_hp_qword(8);
        wr8(MEM_HP_STATUS, MEM_HP_INSERTING); /* acknowledge, as MSCN does */
        if (rd8(MEM_HP_STATUS) != MEM_HP_ENABLED) {
            res_str(r, "not enabled, or the insertion was not acknowledged: slot=");
            res_dec(r, i);
            return false;
        }
        line_begin(&l);
        line_str(&l, "memhotplug inserted slot=");
        line_dec(&l, i);
        line_str(&l, " base=");
        line_hex(&l, base);
        line_str(&l, " size=");
        line_hex(&l, size);
        line_end(&l);
        if (!size || base + size < base || !map_mmio(base, size, true)) {
            res_str(r, "cannot map the hot-added range: slot=");
            res_dec(r, i);
            return false;
        }
        job.stride = 64 * KiB;
        job.nseg = 1;
        job.segs[0].start = base;
        job.segs[0].end = base + size;
        run_user(user_memtest, &job);
        if (job.failed) {
            res_str(r, "hot-added memory failed its pattern test at ");
            res_hex(r, job.fail_addr);
            return false;
        }
        total += size;
        count++;
        if (mem_hp_kept.nseg < MEMTEST_SEGS_MAX)
            mem_hp_kept.segs[mem_hp_kept.nseg++] = job.segs[0];
    }
    res_kv_hex(r, "event", (u64)event);
    res_kv_dec(r, "slots", count);
    res_kv_hex(r, "bytes", total);
    res_kv_dec(r, "tested", job.checked_bytes);
    if (kept)
        res_kv_hex(r, "kept", kept);
    return count > 0;
}

/*
 * The memhpgarbage step: a hostile guest's writes to the memory hot-plug
 * controller (every offset of its page, odd sizes, slot numbers past the 8
 * slots, eject requests); then it reads slot 0 back, which must still
 * answer as a slot does. The VMM must survive all of it.
 */
bool step_memhpgarbage(struct result *r)
{
    u64 off;
    u32 sel;
    u8 status;

    if (!mem_hp_map(0x1000, r))
        return false;
    for (off = 0; off < 0x40; off++) {
        wr8(MEM_HP_ADDR + off, 0xff);
        (void)rd8(MEM_HP_ADDR + off);
        if (off + 2 <= 0x40) {
            wr16(MEM_HP_ADDR + off, 0xffff);
            (void)rd16(MEM_HP_ADDR + off);
        }
        if (off + 4 <= 0x40) {
            wr32(MEM_HP_ADDR + off, 0xffffffffU);
            (void)rd32(MEM_HP_ADDR + off);
        }
    }
    for (sel = 8; sel < 0x100; sel += 7) {
        wr32(MEM_HP_ADDR, sel);
        wr8(MEM_HP_STATUS, 0xff);
        if (rd32(MEM_HP_STATUS) || rd32(MEM_HP_ADDR) || rd32(MEM_HP_ADDR + 8)) {
            res_str(r, "a slot past the 8 answered: slot=");
            res_dec(r, sel);
            return false;
        }
    }
    wr32(MEM_HP_ADDR, 0);
    status = rd8(MEM_HP_STATUS);
    res_kv_hex(r, "slot0_status", status);
    return true;
}
