/*
 * guest_main: basic init, the command line, the step runner, the summary,
 * and the exception handler.
 *
 * The path to "ready" is kept short: each CPL0 instruction is emulated on
 * kvm_pvm (~0.55 us), each port access is a VM exit (~10 us).
 */
#include "guest.h"

u64 tsc_khz;

struct config cfg;

static u32 passed, failed;
static const char *cur_step; /* non-NULL while a step runs */
static size_t cur_step_len;
static u32 exc_depth;

static void detect_tsc_khz(void)
{
    u32 a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    if (!(c & (1u << 31))) /* no hypervisor: no 0x4000_00xx leaves */
        return;
    cpuid(0x40000000, 0, &a, &b, &c, &d);
    if (a >= 0x40000010) {
        cpuid(0x40000010, 0, &a, &b, &c, &d);
        tsc_khz = a;
    }
}

u64 ms_to_tsc(u64 ms)
{
    /* Unknown rate: assume 5 GHz, so a timeout is never shorter than asked. */
    return ms * (tsc_khz ? tsc_khz : 5000000);
}

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

static bool starts_with(const char *w, size_t n, const char *prefix, size_t *plen)
{
    size_t k = strlen(prefix);
    size_t i;
    if (n < k)
        return false;
    for (i = 0; i < k; i++)
        if (w[i] != prefix[i])
            return false;
    *plen = k;
    return true;
}

static void parse_cmdline(void)
{
    const char *s = boot.cmdline;
    size_t i = 0, n = boot.cmdline_len;

    cfg.steps = "hello";
    cfg.steps_len = 5;
    cfg.exit = "poweroff";
    cfg.exit_len = 8;
    cfg.pio_rounds = 10000;
    cfg.cpl3_iterations = 100000000;
    cfg.memmap_stride = 64 * KiB;
    cfg.ticks = 50;
    cfg.tick_ms = 20;
    cfg.blk_sector = 0;
    cfg.blk_count = 8;
    cfg.bench_mode = "read";
    cfg.bench_mode_len = 4;
    cfg.bench_size = 4096;
    cfg.bench_depth = 1;
    cfg.bench_count = 10000;
    cfg.net_timeout_ms = 5000;
    cfg.bench_stall_ms = 2000;
    cfg.dirty_mib = 16;
    cfg.dirty_rounds = 100;
    cfg.dirty_ms = 10;
    cfg.pvpanic_event = 1;
    cfg.watchdog_pets = 3;
    cfg.watchdog_pet_ms = 1000;
    cfg.vsock_port = 1234;
    cfg.vsock_host_port = 1235;
    cfg.vsock_accept = 2;
    cfg.vsock_connect = 2;
    cfg.vsock_bytes = 16384;
    cfg.vsock_timeout_ms = 10000;
    cfg.vsock_check = 1;
    cfg.vsock_echo = 1;
    cfg.pmem_offset = 0;
    cfg.pmem_bytes = 4096;
    cfg.balloon_mib = 64;
    cfg.balloon_timeout_ms = 30000;
    cfg.virtiomem_timeout_ms = 30000;
    cfg.virtiomem_wait = 1;
    cfg.fs_read = "host.txt";
    cfg.fs_read_len = 8;
    cfg.fs_write = "guest.txt";
    cfg.fs_write_len = 9;
    cfg.fs_bytes = 16384;
    cfg.fs_rounds = 1;
    cfg.tpm_timeout_ms = 10000;
    while (i < n) {
        size_t start, len, k;
        while (i < n && is_space(s[i]))
            i++;
        start = i;
        while (i < n && !is_space(s[i]))
            i++;
        len = i - start;
        if (!len)
            continue;
        if (starts_with(s + start, len, "steps=", &k)) {
            cfg.steps = s + start + k;
            cfg.steps_len = len - k;
        } else if (starts_with(s + start, len, "exit=", &k)) {
            cfg.exit = s + start + k;
            cfg.exit_len = len - k;
        } else if (starts_with(s + start, len, "pio_rounds=", &k)) {
            cfg.pio_bad = !parse_u64(s + start + k, len - k, &cfg.pio_rounds);
        } else if (starts_with(s + start, len, "cpl3_iterations=", &k)) {
            cfg.cpl3_bad = !parse_u64(s + start + k, len - k, &cfg.cpl3_iterations);
        } else if (starts_with(s + start, len, "memmap_stride=", &k)) {
            cfg.stride_bad = !parse_u64(s + start + k, len - k, &cfg.memmap_stride) ||
                             cfg.memmap_stride < 8 || cfg.memmap_stride % 8;
        } else if (starts_with(s + start, len, "ticks=", &k)) {
            cfg.ticks_bad |= !parse_u64(s + start + k, len - k, &cfg.ticks);
        } else if (starts_with(s + start, len, "tick_ms=", &k)) {
            cfg.ticks_bad |= !parse_u64(s + start + k, len - k, &cfg.tick_ms);
        } else if (starts_with(s + start, len, "blk_sector=", &k)) {
            cfg.blk_bad |= !parse_u64(s + start + k, len - k, &cfg.blk_sector);
        } else if (starts_with(s + start, len, "blk_count=", &k)) {
            cfg.blk_bad |= !parse_u64(s + start + k, len - k, &cfg.blk_count);
        } else if (starts_with(s + start, len, "blkbench_mode=", &k)) {
            cfg.bench_mode = s + start + k;
            cfg.bench_mode_len = len - k;
        } else if (starts_with(s + start, len, "blkbench_size=", &k)) {
            cfg.bench_bad |= !parse_u64(s + start + k, len - k, &cfg.bench_size);
        } else if (starts_with(s + start, len, "blkbench_depth=", &k)) {
            cfg.bench_bad |= !parse_u64(s + start + k, len - k, &cfg.bench_depth);
        } else if (starts_with(s + start, len, "blkbench_stall_ms=", &k)) {
            cfg.bench_bad |= !parse_u64(s + start + k, len - k, &cfg.bench_stall_ms) ||
                             !cfg.bench_stall_ms || cfg.bench_stall_ms > 600000;
        } else if (starts_with(s + start, len, "blkbench_count=", &k)) {
            cfg.bench_bad |= !parse_u64(s + start + k, len - k, &cfg.bench_count);
        } else if (starts_with(s + start, len, "blkbench_lax_len=", &k)) {
            cfg.bench_bad |= !parse_u64(s + start + k, len - k, &cfg.bench_lax_len);
        } else if (starts_with(s + start, len, "dirty_mib=", &k)) {
            cfg.dirty_bad |= !parse_u64(s + start + k, len - k, &cfg.dirty_mib);
        } else if (starts_with(s + start, len, "dirty_rounds=", &k)) {
            cfg.dirty_bad |= !parse_u64(s + start + k, len - k, &cfg.dirty_rounds);
        } else if (starts_with(s + start, len, "dirty_ms=", &k)) {
            cfg.dirty_bad |= !parse_u64(s + start + k, len - k, &cfg.dirty_ms);
        } else if (starts_with(s + start, len, "dirty_dimm=", &k)) {
            cfg.dirty_bad |= !parse_u64(s + start + k, len - k, &cfg.dirty_dimm);
        } else if (starts_with(s + start, len, "net_timeout_ms=", &k)) {
            cfg.net_bad = !parse_u64(s + start + k, len - k, &cfg.net_timeout_ms);
        } else if (starts_with(s + start, len, "net_lax_len=", &k)) {
            cfg.net_bad |= !parse_u64(s + start + k, len - k, &cfg.net_lax_len);
        } else if (starts_with(s + start, len, "pvpanic_event=", &k)) {
            cfg.pvpanic_bad = !parse_u64(s + start + k, len - k, &cfg.pvpanic_event) ||
                              cfg.pvpanic_event > 0xff;
        } else if (starts_with(s + start, len, "watchdog_pets=", &k)) {
            cfg.watchdog_bad |= !parse_u64(s + start + k, len - k, &cfg.watchdog_pets);
        } else if (starts_with(s + start, len, "watchdog_pet_ms=", &k)) {
            cfg.watchdog_bad |= !parse_u64(s + start + k, len - k, &cfg.watchdog_pet_ms);
        } else if (starts_with(s + start, len, "vsock_port=", &k)) {
            cfg.vsock_bad |= !parse_u64(s + start + k, len - k, &cfg.vsock_port);
        } else if (starts_with(s + start, len, "vsock_host_port=", &k)) {
            cfg.vsock_bad |= !parse_u64(s + start + k, len - k, &cfg.vsock_host_port);
        } else if (starts_with(s + start, len, "vsock_accept=", &k)) {
            cfg.vsock_bad |= !parse_u64(s + start + k, len - k, &cfg.vsock_accept);
        } else if (starts_with(s + start, len, "vsock_connect=", &k)) {
            cfg.vsock_bad |= !parse_u64(s + start + k, len - k, &cfg.vsock_connect);
        } else if (starts_with(s + start, len, "vsock_bytes=", &k)) {
            cfg.vsock_bad |= !parse_u64(s + start + k, len - k, &cfg.vsock_bytes);
        } else if (starts_with(s + start, len, "balloon_mib=", &k)) {
            cfg.balloon_bad |= !parse_u64(s + start + k, len - k, &cfg.balloon_mib);
        } else if (starts_with(s + start, len, "balloon_lax_len=", &k)) {
            cfg.balloon_bad |= !parse_u64(s + start + k, len - k, &cfg.balloon_lax_len);
        } else if (starts_with(s + start, len, "balloon_timeout_ms=", &k)) {
            cfg.balloon_bad |= !parse_u64(s + start + k, len - k, &cfg.balloon_timeout_ms);
        } else if (starts_with(s + start, len, "virtiomem_timeout_ms=", &k)) {
            cfg.virtiomem_bad |= !parse_u64(s + start + k, len - k, &cfg.virtiomem_timeout_ms);
        } else if (starts_with(s + start, len, "virtiomem_wait=", &k)) {
            cfg.virtiomem_bad |= !parse_u64(s + start + k, len - k, &cfg.virtiomem_wait);
        } else if (starts_with(s + start, len, "virtiomem_hostile=", &k)) {
            cfg.virtiomem_bad |= !parse_u64(s + start + k, len - k, &cfg.virtiomem_hostile);
        } else if (starts_with(s + start, len, "pmem_offset=", &k)) {
            cfg.pmem_bad |= !parse_u64(s + start + k, len - k, &cfg.pmem_offset);
        } else if (starts_with(s + start, len, "pmem_bytes=", &k)) {
            cfg.pmem_bad |= !parse_u64(s + start + k, len - k, &cfg.pmem_bytes);
        } else if (starts_with(s + start, len, "vsock_check=", &k)) {
            cfg.vsock_bad |= !parse_u64(s + start + k, len - k, &cfg.vsock_check);
        } else if (starts_with(s + start, len, "vsock_cpl3=", &k)) {
            cfg.vsock_bad |= !parse_u64(s + start + k, len - k, &cfg.vsock_cpl3);
        } else if (starts_with(s + start, len, "vsock_echo=", &k)) {
            cfg.vsock_bad |= !parse_u64(s + start + k, len - k, &cfg.vsock_echo);
        } else if (starts_with(s + start, len, "vsock_timeout_ms=", &k)) {
            cfg.vsock_bad |= !parse_u64(s + start + k, len - k, &cfg.vsock_timeout_ms);
        } else if (starts_with(s + start, len, "fs_read=", &k)) {
            cfg.fs_read = s + start + k;
            cfg.fs_read_len = len - k;
        } else if (starts_with(s + start, len, "fs_write=", &k)) {
            cfg.fs_write = s + start + k;
            cfg.fs_write_len = len - k;
        } else if (starts_with(s + start, len, "fs_rounds=", &k)) {
            cfg.fs_bad |= !parse_u64(s + start + k, len - k, &cfg.fs_rounds) || !cfg.fs_rounds ||
                          cfg.fs_rounds > 100000;
        } else if (starts_with(s + start, len, "fs_bytes=", &k)) {
            cfg.fs_bad |= !parse_u64(s + start + k, len - k, &cfg.fs_bytes);
        } else if (starts_with(s + start, len, "tpm_timeout_ms=", &k)) {
            cfg.tpm_bad = !parse_u64(s + start + k, len - k, &cfg.tpm_timeout_ms);
        }
        /* anything else (console=ttyS0, ...) is ignored */
    }
}

/* ---- steps ---- */

static bool step_hello(struct result *r)
{
    (void)r;
    return true;
}

bool step_cpl3(struct result *r)
{
    struct cpl3_job j;
    if (cfg.cpl3_bad) {
        res_str(r, "bad cpl3_iterations value");
        return false;
    }
    j.iterations = cfg.cpl3_iterations;
    run_user(user_spin, &j);
    res_kv_dec(r, "iterations", j.iterations);
    res_kv_dec(r, "tsc", j.tsc);
    if (tsc_khz)
        res_kv_dec(r, "ns", j.tsc * 1000000 / tsc_khz);
    return true;
}

bool step_pio(struct result *r)
{
    u64 n = cfg.pio_rounds, t0, t1, per;
    if (cfg.pio_bad) {
        res_str(r, "bad pio_rounds value");
        return false;
    }
    t0 = rdtsc();
    if (n) /* 0x3e8 is unassigned: each outb is a plain exit to the VMM */
        __asm__ volatile("1: outb %%al, %%dx\n\tdec %0\n\tjnz 1b" : "+c"(n) : "a"(0), "d"(0x3e8) : "memory");
    t1 = rdtsc();
    per = cfg.pio_rounds ? (t1 - t0) / cfg.pio_rounds : 0;
    res_kv_dec(r, "rounds", cfg.pio_rounds);
    res_kv_dec(r, "tsc_per_round", per);
    if (tsc_khz)
        res_kv_dec(r, "ns_per_round", per * 1000000 / tsc_khz);
    return true;
}

/* Prints "tick <n>" every tick_ms: visible progress, so a VMM's pause and
 * resume can be checked from outside. */
static bool step_ticks(struct result *r)
{
    u64 i, next;
    if (cfg.ticks_bad) {
        res_str(r, "bad ticks or tick_ms value");
        return false;
    }
    next = rdtsc();
    for (i = 0; i < cfg.ticks; i++) {
        struct line l;
        next += ms_to_tsc(cfg.tick_ms);
        while (rdtsc() < next)
            __asm__ volatile("pause");
        line_begin(&l);
        line_str(&l, "tick ");
        line_dec(&l, i);
        line_end(&l);
    }
    res_kv_dec(r, "ticks", cfg.ticks);
    return true;
}

/* Rewrites dirty_mib MiB every round (at least dirty_ms apart), each round
 * checking every qword still holds the last round's value first, and prints
 * "dirty round <i>": a VMM that loses a page the guest wrote (a migration
 * that misses a dirty page) makes it fail, naming the address. With
 * dirty_dimm=1 the MiBs are the start of the first DIMM an earlier
 * memhotplug step tested (hot-added memory has KVM slots of its own). */
bool step_dirty(struct result *r)
{
    struct dirty_job j;
    u64 size, next, round;
    void *region;
    if (cfg.dirty_bad || !cfg.dirty_mib || !cfg.dirty_rounds) {
        res_str(r, "bad dirty_mib, dirty_rounds or dirty_ms value");
        return false;
    }
    size = cfg.dirty_mib * MiB;
    if (cfg.dirty_dimm) {
        u64 start, end;
        if (!mem_hp_first_dimm(&start, &end) || end - start < size) {
            res_str(r, "no hot-added DIMM of dirty_mib (run memhotplug first)");
            return false;
        }
        region = (void *)start;
    } else {
        region = alloc_pages(size / 4096);
    }
    if (!region) {
        res_str(r, "not enough RAM for dirty_mib");
        return false;
    }
    j.start = (u64)region;
    j.end = j.start + size;
    next = rdtsc();
    for (round = 0; round < cfg.dirty_rounds; round++) {
        struct line l;
        while (rdtsc() < next)
            __asm__ volatile("pause");
        next = rdtsc() + ms_to_tsc(cfg.dirty_ms);
        j.round = round;
        if (run_user(user_dirty, &j)) {
            res_str(r, "mismatch at ");
            res_hex(r, j.fail_addr);
            res_str(r, " round ");
            res_dec(r, round);
            res_str(r, " expected ");
            res_hex(r, j.fail_expected);
            res_str(r, " found ");
            res_hex(r, j.fail_found);
            return false;
        }
        line_begin(&l);
        line_str(&l, "dirty round ");
        line_dec(&l, round);
        line_end(&l);
    }
    res_kv_dec(r, "mib", cfg.dirty_mib);
    res_kv_dec(r, "rounds", cfg.dirty_rounds);
    return true;
}

static const struct {
    const char *name;
    bool (*fn)(struct result *);
} steps[] = {
    {"ticks", step_ticks}, {"dirty", step_dirty},
    {"hello", step_hello}, {"memmap", step_memmap}, {"acpi", step_acpi}, {"smp", step_smp},
    {"timer", step_timer}, {"cpl3", step_cpl3},     {"pio", step_pio},
    {"pci", step_pci},     {"rng", step_rng},       {"blk", step_blk},
    {"console", step_console}, {"msix", step_msix}, {"blkbench", step_blkbench},
    {"net", step_net}, {"powerbutton", step_powerbutton}, {"ioapic", step_ioapic},
    {"pvpanic", step_pvpanic}, {"watchdog", step_watchdog}, {"vsock", step_vsock},
    {"pmem", step_pmem}, {"balloon", step_balloon}, {"virtiomem", step_virtiomem},
    {"numa", step_numa},
    {"acpidump", step_acpidump}, {"cpuhotplug", step_cpuhotplug}, {"cpuunplug", step_cpuunplug},
    {"memhotplug", step_memhotplug}, {"memhpgarbage", step_memhpgarbage},
    {"fs", step_fs}, {"tpm", step_tpm}, {"pcihotplug", step_pcihotplug},
    {"pciunplug", step_pciunplug}, {"pcihostile", step_pcihostile},
};

static void print_step(const char *name, size_t len, bool ok, const struct result *r)
{
    struct line l;
    line_begin(&l);
    line_str(&l, "step ");
    line_strn(&l, name, len);
    line_str(&l, ok ? " ok" : " fail ");
    line_strn(&l, r->buf, r->n);
    line_end(&l);
}

static void run_step(const char *name, size_t len)
{
    struct result r;
    bool ok = false, found = false;
    u32 i;

    r.n = 0;
    cur_step = name;
    cur_step_len = len;
    for (i = 0; i < ARRAY_SIZE(steps); i++) {
        if (word_eq(name, len, steps[i].name)) {
            found = true;
            ok = steps[i].fn(&r);
            break;
        }
    }
    if (!found)
        res_str(&r, "unknown step");
    cur_step = NULL;
    if (ok)
        passed++;
    else
        failed++;
    print_step(name, len, ok, &r);
}

static void print_summary(void)
{
    struct line l;
    line_begin(&l);
    line_str(&l, "summary passed=");
    line_dec(&l, passed);
    line_str(&l, " failed=");
    line_dec(&l, failed);
    line_end(&l);
}

void guest_main(u32 protocol, u64 info);
void guest_main(u32 protocol, u64 info)
{
    struct line l;
    size_t i, start;

    outb(0x21, 0xff); /* mask both 8259s: nothing may arrive as a stray vector */
    outb(0xa1, 0xff);
    serial_init();
    boot_copy_info(protocol, info);

    line_begin(&l);
    line_str(&l, protocol == BOOT_PVH ? "boot protocol=pvh cmdline=\"" : "boot protocol=linux64 cmdline=\"");
    for (i = 0; i < boot.cmdline_len; i++) {
        char c = boot.cmdline[i];
        line_char(&l, c < ' ' || c == 0x7f ? ' ' : c); /* keep the output one line */
    }
    line_str(&l, "\"");
    line_end(&l);

    mm_init();
    cpu_tables_init();
    outb(DEBUG_PORT, DBG_READY);
    say("ready");

    detect_tsc_khz();
    parse_cmdline();
    for (i = 0, start = 0; i <= cfg.steps_len; i++) {
        if (i == cfg.steps_len || cfg.steps[i] == ',') {
            if (i > start)
                run_step(cfg.steps + start, i - start);
            start = i + 1;
        }
    }
    print_summary();
    do_exit(cfg.exit, cfg.exit_len);
}

/*
 * Exceptions 0-31 (from entry.S). On the BSP: report, count the running
 * step as failed, print the summary and leave through the requested exit.
 * On an AP: report and halt.
 */
NORETURN void exception_handler(u64 *f)
{
    struct line l;
    u64 vector = f[15];
    bool bsp = rdmsr(MSR_APIC_BASE) & (1 << 8);

    console_break_lock(); /* this CPU may have faulted while printing */
    if (bsp && ++exc_depth > 1) {
        say("exception while handling an exception");
        triple_fault();
    }
    line_begin(&l);
    line_str(&l, "exception vector=");
    line_hex(&l, vector);
    line_str(&l, " error=");
    line_hex(&l, f[16]);
    line_str(&l, " rip=");
    line_hex(&l, f[17]);
    line_str(&l, " cr2=");
    line_hex(&l, read_cr2());
    line_str(&l, " cs=");
    line_hex(&l, f[18]);
    line_str(&l, " rsp=");
    line_hex(&l, f[20]);
    if (!bsp) {
        line_str(&l, " apic_id=");
        line_dec(&l, lapic_id());
    }
    line_end(&l);
    if (!bsp)
        halt_forever();

    if (cur_step) {
        struct result r;
        r.n = 0;
        res_str(&r, "exception vector=");
        res_hex(&r, vector);
        res_str(&r, " rip=");
        res_hex(&r, f[17]);
        failed++;
        print_step(cur_step, cur_step_len, false, &r);
    } else {
        line_begin(&l);
        line_str(&l, "fail exception vector=");
        line_hex(&l, vector);
        line_str(&l, " outside a step");
        line_end(&l);
        failed++;
    }
    print_summary();
    if (!cfg.exit) { /* before the command line was parsed */
        cfg.exit = "poweroff";
        cfg.exit_len = 8;
    }
    do_exit(cfg.exit, cfg.exit_len);
}
