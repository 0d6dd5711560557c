/*
 * The numa step: the SRAT and SLIT the root table lists (checksums at CPL3),
 * printed entry by entry, and the _PXM of each PCI host bridge in the DSDT
 * (found at CPL3). Walking the tables' entries stays at CPL0: a few per node.
 */
#include "guest.h"

#define SLIT_PRINT_MAX 32 /* localities a "slit <i>:" line holds */

static struct csum_job numa_csum;
static struct pxm_job pxm;

static bool table_fail(struct result *r, const char *msg, const char *sig, u64 addr)
{
    res_str(r, msg);
    res_str(r, " ");
    res_strn(r, sig, 4);
    res_str(r, " at ");
    res_hex(r, addr);
    return false;
}

/* Prints the SRAT's entries; counts processor and memory affinities. */
static bool srat_entries(u64 srat, u32 len, u32 *cpus, u32 *mems, struct result *r)
{
    u64 p = srat + 48, end = srat + len; /* header, then 12 reserved bytes */
    struct line l;

    *cpus = *mems = 0;
    if (len < 48)
        return table_fail(r, "short table", "SRAT", srat);
    for (; p < end; p += rd8(p + 1)) {
        u8 type = rd8(p), elen = p + 2 <= end ? rd8(p + 1) : 0;
        if (elen < 2 || p + elen > end) {
            res_str(r, "bad SRAT entry type=");
            res_dec(r, type);
            res_str(r, " len=");
            res_dec(r, elen);
            res_str(r, " at ");
            res_hex(r, p);
            return false;
        }
        line_begin(&l);
        if (type == 0 && elen >= 16) { /* Processor Local APIC Affinity */
            u32 node = rd8(p + 2) | (u32)rd8(p + 9) << 8 | (u32)rd8(p + 10) << 16 |
                       (u32)rd8(p + 11) << 24;
            line_str(&l, "srat cpu type=0 apic=");
            line_dec(&l, rd8(p + 3));
            line_str(&l, " node=");
            line_dec(&l, node);
            line_str(&l, " flags=");
            line_hex(&l, rd32(p + 4));
            (*cpus)++;
        } else if (type == 2 && elen >= 24) { /* Processor Local x2APIC Affinity */
            line_str(&l, "srat cpu type=2 apic=");
            line_dec(&l, rd32(p + 8));
            line_str(&l, " node=");
            line_dec(&l, rd32(p + 4));
            line_str(&l, " flags=");
            line_hex(&l, rd32(p + 12));
            (*cpus)++;
        } else if (type == 1 && elen >= 40) { /* Memory Affinity */
            line_str(&l, "srat mem base=");
            line_hex(&l, rd64(p + 8));
            line_str(&l, " len=");
            line_hex(&l, rd64(p + 16));
            line_str(&l, " node=");
            line_dec(&l, rd32(p + 2));
            line_str(&l, " flags=");
            line_hex(&l, rd32(p + 28));
            (*mems)++;
        } else {
            line_str(&l, "srat other type=");
            line_dec(&l, type);
            line_str(&l, " len=");
            line_dec(&l, elen);
        }
        line_end(&l);
    }
    return true;
}

/* Prints the SLIT's matrix, a row per line. */
static bool slit_rows(u64 slit, u32 len, u64 *localities, struct result *r)
{
    struct line l;
    u64 n, i, k;

    if (len < 44)
        return table_fail(r, "short table", "SLIT", slit);
    n = rd64(slit + 36);
    *localities = n;
    if (n > SLIT_PRINT_MAX) {
        res_str(r, "more than 32 localities in SLIT: ");
        res_dec(r, n);
        return false;
    }
    if (len != 44 + n * n) {
        res_str(r, "SLIT length ");
        res_dec(r, len);
        res_str(r, " for ");
        res_dec(r, n);
        res_str(r, " localities");
        return false;
    }
    for (i = 0; i < n; i++) {
        line_begin(&l);
        line_str(&l, "slit ");
        line_dec(&l, i);
        line_str(&l, ":");
        for (k = 0; k < n; k++) {
            line_str(&l, " ");
            line_dec(&l, rd8(slit + 44 + i * n + k));
        }
        line_end(&l);
    }
    return true;
}

/* Prints each PCI host bridge's _PXM from the DSDT. */
static bool dsdt_pxm(u32 *bridges, struct result *r)
{
    const struct acpi_info *a = acpi_discover();
    struct line l;
    u32 i;

    *bridges = 0;
    if (!a->dsdt)
        return true;
    if (!user_mapped(a->dsdt, a->dsdt_len))
        return table_fail(r, "not user-accessible:", "DSDT", a->dsdt);
    pxm.addr = a->dsdt;
    pxm.len = a->dsdt_len;
    run_user(user_find_pxm, &pxm);
    if (pxm.overflow) {
        res_str(r, "more than 128 PCI host bridges in the DSDT");
        return false;
    }
    for (i = 0; i < pxm.n; i++) {
        line_begin(&l);
        line_str(&l, "dsdt pxm dev=");
        line_strn(&l, pxm.dev[i].name, 4);
        if (pxm.dev[i].kind == 1) {
            line_str(&l, " node=");
            line_dec(&l, pxm.dev[i].value);
        } else {
            line_str(&l, pxm.dev[i].kind ? " node=unreadable" : " node=none");
        }
        line_end(&l);
    }
    *bridges = pxm.n;
    return true;
}

bool step_numa(struct result *r)
{
    const struct acpi_info *a = acpi_discover();
    u64 srat, slit, localities;
    u32 srat_len = 0, slit_len = 0, cpus, mems, bridges, i;

    if (!a->ok) {
        res_str(r, a->err);
        return false;
    }
    srat = acpi_find_table("SRAT", &srat_len);
    slit = acpi_find_table("SLIT", &slit_len);
    if (!srat) {
        res_str(r, slit ? "no SRAT (a SLIT without it)" : "no SRAT");
        return false;
    }
    if (!slit) {
        res_str(r, "no SLIT");
        return false;
    }
    numa_csum.n = 2;
    numa_csum.t[0].addr = srat;
    numa_csum.t[0].len = srat_len;
    numa_csum.t[1].addr = slit;
    numa_csum.t[1].len = slit_len;
    acpi_sums(&numa_csum);
    for (i = 0; i < 2; i++)
        if (numa_csum.t[i].sum)
            return table_fail(r, "bad checksum", i ? "SLIT" : "SRAT", numa_csum.t[i].addr);
    if (!srat_entries(srat, srat_len, &cpus, &mems, r) || !slit_rows(slit, slit_len, &localities, r) ||
        !dsdt_pxm(&bridges, r))
        return false;
    res_kv_dec(r, "cpus", cpus);
    res_kv_dec(r, "mems", mems);
    res_kv_dec(r, "localities", localities);
    res_kv_dec(r, "bridges", bridges);
    return true;
}
