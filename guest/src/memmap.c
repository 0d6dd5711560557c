/*
 * Step memmap: print the memory map, then pattern-test the RAM at CPL3.
 *
 * Not tested: [0, 1 MiB), the guest's own footprint (image, stacks, page
 * tables, AP stacks: [_image_start, alloc_top)), initramfs/modules and the
 * ACPI tables (QEMU's PVH memory map reports SeaBIOS's ACPI area as RAM).
 */
#include "guest.h"

static struct memtest_job job;

static void seg_add(u64 s, u64 e)
{
    if (s < e && job.nseg < MEMTEST_SEGS_MAX) {
        job.segs[job.nseg].start = s;
        job.segs[job.nseg].end = e;
        job.nseg++;
    }
}

/* Removes [xs, xe) from every segment, keeping their order. */
static void seg_sub(u64 xs, u64 xe)
{
    u32 i, k;
    if (xe <= xs)
        return;
    for (i = 0; i < job.nseg; i++) {
        u64 s = job.segs[i].start, e = job.segs[i].end;
        if (xe <= s || xs >= e)
            continue;
        if (xs <= s && xe >= e) { /* swallowed */
            for (k = i; k + 1 < job.nseg; k++)
                job.segs[k] = job.segs[k + 1];
            job.nseg--;
            i--;
        } else if (xs > s && xe < e) { /* split in two */
            if (job.nseg == MEMTEST_SEGS_MAX) {
                job.segs[i].end = xs; /* no room: drop the upper part */
                continue;
            }
            for (k = job.nseg; k > i + 1; k--)
                job.segs[k] = job.segs[k - 1];
            job.nseg++;
            job.segs[i].end = xs;
            job.segs[i + 1].start = xe;
            job.segs[i + 1].end = e;
            i++;
        } else if (xs <= s) {
            job.segs[i].start = xe;
        } else {
            job.segs[i].end = xs;
        }
    }
}

bool step_memmap(struct result *r)
{
    u32 i, ranges = 0;
    u64 ram_bytes = 0;
    const struct acpi_info *a;

    if (cfg.stride_bad) {
        res_str(r, "bad memmap_stride value (a multiple of 8 is needed)");
        return false;
    }
    for (i = 0; i < boot.nmap; i++) {
        const struct mem_range *m = &boot.map[i];
        struct line l;
        line_begin(&l);
        line_str(&l, "memmap range start=");
        line_hex(&l, m->start);
        line_str(&l, " end=");
        line_hex(&l, m->start + m->size);
        line_str(&l, " type=");
        line_dec(&l, m->type);
        line_end(&l);
        if (m->type == 1) {
            ranges++;
            ram_bytes += m->size;
        }
    }
    if (!ranges) {
        res_str(r, "no RAM in the memory map");
        return false;
    }

    /* What CPL3 can reach: RAM below 3 GiB and above 4 GiB up to the mapped top,
     * and whole 2 MiB pages of RAM inside 3-4 GiB (mm_init made those user pages). */
    job.nseg = 0;
    for (i = 0; i < boot.nmap; i++) {
        const struct mem_range *m = &boot.map[i];
        u64 s = m->start, e = m->start + m->size, lo, hi;
        if (m->type != 1)
            continue;
        if (e > mapped_top)
            e = mapped_top;
        seg_add(s, e < 3 * GiB ? e : 3 * GiB);
        lo = ALIGN_UP(s > 3 * GiB ? s : 3 * GiB, 2 * MiB);
        hi = ALIGN_DOWN(e < 4 * GiB ? e : 4 * GiB, 2 * MiB);
        seg_add(lo, hi);
        seg_add(s > 4 * GiB ? s : 4 * GiB, e);
    }
    seg_sub(0, 1 * MiB);
    seg_sub((u64)_image_start, alloc_top);
    for (i = 0; i < boot.nmods; i++)
        seg_sub(boot.mods[i].start, boot.mods[i].start + boot.mods[i].size);
    a = acpi_discover();
    if (a->rsdp)
        seg_sub(a->rsdp, a->rsdp + 36);
    for (i = 0; i < a->ntables; i++)
        seg_sub(a->tables[i].addr, a->tables[i].addr + a->tables[i].len);
    if (a->facs)
        seg_sub(a->facs, a->facs + 64);

    job.stride = cfg.memmap_stride;
    run_user(user_memtest, &job);
    if (job.failed) {
        res_str(r, "mismatch at ");
        res_hex(r, job.fail_addr);
        res_str(r, " expected ");
        res_hex(r, job.fail_expected);
        res_str(r, " found ");
        res_hex(r, job.fail_found);
        return false;
    }
    res_kv_dec(r, "ranges", ranges);
    res_kv_dec(r, "ram_bytes", ram_bytes);
    res_kv_dec(r, "checked_bytes", job.checked_bytes);
    return true;
}
