/*
 * ACPI: find the RSDP, walk the XSDT (or RSDT), check checksums, count
 * the MADT's CPUs. Byte loops (checksums, the RSDP scan) run at CPL3.
 */
#include "guest.h"

static struct acpi_info acpi;
static bool acpi_done;

static bool sig_is(u64 addr, const char *sig)
{
    return rd8(addr) == (u8)sig[0] && rd8(addr + 1) == (u8)sig[1] && rd8(addr + 2) == (u8)sig[2] &&
           rd8(addr + 3) == (u8)sig[3];
}

static void set_err(const char *msg, const char *sig, u64 addr)
{
    struct result r;
    r.n = 0;
    res_str(&r, msg);
    if (sig) {
        res_str(&r, " ");
        res_strn(&r, sig, 4);
    }
    if (addr) {
        res_str(&r, " at ");
        res_hex(&r, addr);
    }
    if (r.n >= sizeof(acpi.err))
        r.n = sizeof(acpi.err) - 1;
    memcpy(acpi.err, r.buf, r.n);
    acpi.err[r.n] = 0;
}

/* Records a table (header checked for reachability); returns its index or -1. */
static int add_table(u64 addr)
{
    struct acpi_table *t;
    u32 len;
    if (!addr || !range_mapped(addr, 36)) {
        set_err("table not mapped", NULL, addr);
        return -1;
    }
    len = rd32(addr + 4);
    if (len < 36 || !range_mapped(addr, len)) {
        set_err("bad table length", (const char *)addr, addr);
        return -1;
    }
    if (acpi.ntables == ACPI_TABLES_MAX) {
        set_err("too many tables", NULL, 0);
        return -1;
    }
    t = &acpi.tables[acpi.ntables++];
    memcpy(t->sig, (const void *)addr, 4);
    t->addr = addr;
    t->len = len;
    return (int)acpi.ntables - 1;
}

static u64 find_rsdp(void)
{
    struct scan_job j;
    if (boot.rsdp)
        return boot.rsdp;
    /* Not in the boot info: scan the BIOS area like a PC OS (at CPL3). */
    j.start = 0xe0000;
    j.end = 0x100000;
    run_user(user_find_rsdp, &j);
    return j.found;
}

const struct acpi_info *acpi_discover(void)
{
    u64 rsdp, root;
    u32 i, n, esz, rev;

    if (acpi_done)
        return &acpi;
    acpi_done = true;
    acpi.ok = false;
    acpi.err[0] = 0;
    acpi.ntables = 0;
    acpi.fadt = acpi.madt = acpi.dsdt = acpi.facs = 0;
    acpi.fadt_len = acpi.madt_len = acpi.dsdt_len = 0;

    rsdp = find_rsdp();
    acpi.rsdp = rsdp;
    if (!rsdp) {
        set_err("no RSDP", NULL, 0);
        return &acpi;
    }
    if (!range_mapped(rsdp, 36) || rd64(rsdp) != 0x2052545020445352ULL) {
        set_err("bad RSDP signature", NULL, rsdp);
        return &acpi;
    }
    rev = rd8(rsdp + 15);
    acpi.rsdp_len = rev >= 2 ? rd32(rsdp + 20) : 20;
    if (acpi.rsdp_len < 20 || acpi.rsdp_len > 4096)
        acpi.rsdp_len = 20;
    if (rev >= 2 && rd64(rsdp + 24)) {
        root = rd64(rsdp + 24); /* XSDT: 64-bit entries */
        esz = 8;
    } else {
        root = rd32(rsdp + 16); /* RSDT: 32-bit entries */
        esz = 4;
    }
    if (add_table(root) < 0)
        return &acpi;
    n = (acpi.tables[0].len - 36) / esz;
    for (i = 0; i < n; i++) {
        u64 a = esz == 8 ? rd64(root + 36 + i * 8) : rd32(root + 36 + i * 4);
        int k = add_table(a);
        if (k < 0)
            return &acpi;
        if (sig_is(a, "FACP")) {
            acpi.fadt = a;
            acpi.fadt_len = acpi.tables[k].len;
        } else if (sig_is(a, "APIC")) {
            acpi.madt = a;
            acpi.madt_len = acpi.tables[k].len;
        }
    }
    if (acpi.fadt) {
        u64 f = acpi.fadt, d = 0;
        int k;
        if (acpi.fadt_len >= 148)
            d = rd64(f + 140); /* X_DSDT */
        if (!d)
            d = rd32(f + 40); /* DSDT */
        if (acpi.fadt_len >= 140)
            acpi.facs = rd64(f + 132); /* X_FIRMWARE_CTRL */
        if (!acpi.facs)
            acpi.facs = rd32(f + 36); /* FIRMWARE_CTRL */
        if (d) {
            k = add_table(d);
            if (k < 0)
                return &acpi;
            acpi.dsdt = d;
            acpi.dsdt_len = acpi.tables[k].len;
        }
    }
    acpi.ok = true;
    return &acpi;
}

u64 acpi_find_table(const char *sig, u32 *len)
{
    const struct acpi_info *a = acpi_discover();
    u32 i;
    for (i = 0; i < a->ntables; i++) {
        const char *t = a->tables[i].sig;
        if (t[0] == sig[0] && t[1] == sig[1] && t[2] == sig[2] && t[3] == sig[3]) {
            *len = a->tables[i].len;
            return a->tables[i].addr;
        }
    }
    return 0;
}

void madt_for_each_cpu(void (*visit)(u32 apic_id, u32 flags, void *ctx), void *ctx)
{
    const struct acpi_info *a = acpi_discover();
    u64 p, end;
    if (!a->madt)
        return;
    end = a->madt + a->madt_len;
    for (p = a->madt + 44; p + 2 <= end; p += rd8(p + 1)) {
        u8 type = rd8(p), len = rd8(p + 1);
        if (len < 2 || p + len > end)
            break;
        if (type == 0 && len >= 8) /* Processor Local APIC */
            visit(rd8(p + 3), rd32(p + 4), ctx);
        else if (type == 9 && len >= 16) /* Processor Local x2APIC */
            visit(rd32(p + 4), rd32(p + 8), ctx);
    }
}

struct madt_count {
    u32 *ids, max, n, enabled, listed;
};

static void count_cpu(u32 apic_id, u32 flags, void *ctx)
{
    struct madt_count *c = ctx;
    c->listed++;
    if (flags & 1) { /* enabled (bit 1 = online capable: listed, not started) */
        c->enabled++;
        if (c->n < c->max)
            c->ids[c->n++] = apic_id;
    }
}

/* Enabled CPUs' APIC ids into ids[]; counts of enabled and of all listed entries. */
u32 madt_cpus(u32 *ids, u32 max, u32 *enabled, u32 *listed)
{
    struct madt_count c = {ids, max, 0, 0, 0};
    madt_for_each_cpu(count_cpu, &c);
    *enabled = c.enabled;
    *listed = c.listed;
    return c.n;
}

static u8 sum_cpl0(u64 addr, u32 len)
{
    u8 s = 0;
    u32 i;
    for (i = 0; i < len; i++)
        s = (u8)(s + rd8(addr + i));
    return s;
}

void acpi_sums(struct csum_job *j)
{
    bool user_ok = true;
    u32 i;
    for (i = 0; i < j->n; i++)
        user_ok = user_ok && user_mapped(j->t[i].addr, j->t[i].len);
    if (user_ok) {
        run_user(user_checksum, j);
    } else {
        for (i = 0; i < j->n; i++) /* e.g. tables in the supervisor-only MMIO hole */
            j->t[i].sum = sum_cpl0(j->t[i].addr, j->t[i].len);
    }
}

static struct csum_job csum;

bool step_acpi(struct result *r)
{
    const struct acpi_info *a = acpi_discover();
    u32 i, enabled, listed, ids[1];

    if (!a->ok) {
        res_str(r, a->err);
        return false;
    }
    /* Entry 0: the RSDP's first 20 bytes; entry 1: the whole (extended) RSDP. */
    csum.n = 0;
    csum.t[csum.n].addr = a->rsdp;
    csum.t[csum.n++].len = 20;
    csum.t[csum.n].addr = a->rsdp;
    csum.t[csum.n++].len = a->rsdp_len;
    for (i = 0; i < a->ntables && csum.n < ACPI_TABLES_MAX; i++) {
        csum.t[csum.n].addr = a->tables[i].addr;
        csum.t[csum.n++].len = a->tables[i].len;
    }
    acpi_sums(&csum);
    for (i = 0; i < csum.n; i++) {
        if (csum.t[i].sum == 0)
            continue;
        res_str(r, "bad checksum ");
        if (i < 2)
            res_str(r, i == 0 ? "RSDP" : "RSDP extended");
        else
            res_strn(r, a->tables[i - 2].sig, 4);
        res_str(r, " at ");
        res_hex(r, csum.t[i].addr);
        return false;
    }

    madt_cpus(ids, 0, &enabled, &listed);
    res_kv_hex(r, "rsdp", a->rsdp);
    res_str(r, " tables=");
    for (i = 0; i < a->ntables; i++) {
        u32 k;
        if (i)
            res_str(r, ",");
        for (k = 0; k < 4; k++) {
            char c = a->tables[i].sig[k];
            res_strn(r, c > ' ' && c < 0x7f ? &c : "?", 1);
        }
    }
    res_kv_dec(r, "cpus", enabled);
    res_kv_dec(r, "max_cpus", listed);
    return true;
}

/* Prints the RSDP and every table found (the DSDT too) byte for byte, so a
 * host-side test can check them with ACPICA: "acpidump <SIG> addr=0x.. len=N"
 * then "acpidump <SIG> <offset hex> <up to 32 bytes hex>" lines. */
static void dump_bytes(const char *sig, u64 addr, u32 len)
{
    struct line l;
    u32 off, k;
    line_begin(&l);
    line_str(&l, "acpidump ");
    line_strn(&l, sig, 4);
    line_str(&l, " addr=");
    line_hex(&l, addr);
    line_str(&l, " len=");
    line_dec(&l, len);
    line_end(&l);
    for (off = 0; off < len; off += 32) {
        line_begin(&l);
        line_str(&l, "acpidump ");
        line_strn(&l, sig, 4);
        line_char(&l, ' ');
        line_hexpad(&l, off, 5);
        line_char(&l, ' ');
        for (k = off; k < len && k < off + 32; k++)
            line_hexpad(&l, rd8(addr + k), 2);
        line_end(&l);
    }
}

bool step_acpidump(struct result *r)
{
    const struct acpi_info *a = acpi_discover();
    u32 i;
    if (!a->ok) {
        res_str(r, a->err);
        return false;
    }
    dump_bytes("RSDP", a->rsdp, a->rsdp_len);
    for (i = 0; i < a->ntables; i++)
        dump_bytes(a->tables[i].sig, a->tables[i].addr, a->tables[i].len);
    res_kv_dec(r, "tables", a->ntables);
    return true;
}

const struct hotplug_regs *hotplug_regs(void)
{
    static struct hotplug_regs regs;
    static bool scanned;
    const struct acpi_info *a = acpi_discover();
    if (!scanned && a->dsdt && a->dsdt_len > 36) {
        regs.addr = a->dsdt;
        regs.len = a->dsdt_len;
        run_user(user_find_hotplug_regs, &regs);
    }
    scanned = true;
    return &regs;
}
