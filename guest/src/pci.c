/*
 * PCI: configuration space through ECAM (ACPI MCFG) or, without an MCFG,
 * ports 0xcf8/0xcfc on segment 0; enumeration from each allocation's start
 * bus along PCI-to-PCI bridges; BAR sizing. BARs are used as firmware or
 * the VMM programmed them, never reassigned.
 *
 * Each config access is an MMIO or port exit (~10 us): bus 0 alone costs a
 * few hundred, so buses are followed through bridges rather than scanned.
 */
#include "pci.h"

#define PCI_HDR_TYPE 0x0e
#define PCI_BAR0 0x10
#define PCI_CAP_PTR 0x34
#define PCI_SECONDARY_BUS 0x19

struct pci_seg {
    u64 base; /* ECAM address of bus 0 (MCFG semantics); 0: port I/O */
    u16 seg;
    u8 start, end;
};

static struct pci_seg segs[PCI_SEGS_MAX];
static u32 nsegs;
static struct pci_dev devs[PCI_DEVS_MAX];
static u32 ndevs;
static bool scanned, scan_ok;
static char scan_err[96];
static u8 bus_seen[PCI_SEGS_MAX][32]; /* bitmap per allocation: buses already scanned */

static u32 cf8_addr(const struct pci_dev *d, u32 reg)
{
    return 0x80000000u | ((u32)d->bus << 16) | ((u32)d->dev << 11) | ((u32)d->fn << 8) | (reg & 0xfc);
}

u32 pci_read32(const struct pci_dev *d, u32 reg)
{
    if (d->ecam)
        return rd32(d->ecam + reg);
    outl(0xcf8, cf8_addr(d, reg));
    return inl(0xcfc);
}

u16 pci_read16(const struct pci_dev *d, u32 reg)
{
    if (d->ecam)
        return rd16(d->ecam + reg);
    outl(0xcf8, cf8_addr(d, reg));
    return inw((u16)(0xcfc + (reg & 2)));
}

u8 pci_read8(const struct pci_dev *d, u32 reg)
{
    if (d->ecam)
        return rd8(d->ecam + reg);
    outl(0xcf8, cf8_addr(d, reg));
    return inb((u16)(0xcfc + (reg & 3)));
}

void pci_write32(const struct pci_dev *d, u32 reg, u32 v)
{
    if (d->ecam) {
        wr32(d->ecam + reg, v);
        return;
    }
    outl(0xcf8, cf8_addr(d, reg));
    outl(0xcfc, v);
}

void pci_write16(const struct pci_dev *d, u32 reg, u16 v)
{
    if (d->ecam) {
        wr16(d->ecam + reg, v);
        return;
    }
    outl(0xcf8, cf8_addr(d, reg));
    outw((u16)(0xcfc + (reg & 2)), v);
}

u8 pci_find_cap(const struct pci_dev *d, u8 id, u8 after)
{
    u32 guard;
    u8 p;
    if (!(pci_read16(d, PCI_STATUS) & PCI_STATUS_CAPS))
        return 0;
    p = after ? pci_read8(d, after + 1) : pci_read8(d, PCI_CAP_PTR);
    for (guard = 0; guard < 48; guard++) { /* a looping list must not hang us */
        p &= 0xfc;
        if (p < 0x40)
            return 0;
        if (pci_read8(d, p) == id)
            return p;
        p = pci_read8(d, p + 1);
    }
    return 0;
}

static void set_err(const char *msg, u64 v)
{
    struct result r;
    r.n = 0;
    res_str(&r, msg);
    if (v != ~0ULL)
        res_hex(&r, v);
    if (r.n >= sizeof(scan_err))
        r.n = sizeof(scan_err) - 1;
    memcpy(scan_err, r.buf, r.n);
    scan_err[r.n] = 0;
}

/*
 * Sizes the BARs by writing all ones and reading back, with I/O and memory
 * decoding off meanwhile (a half-written BAR must not claim addresses), and
 * restores them and the command register. Host bridges keep decoding, as
 * in Linux: some cannot turn it off.
 */
static void size_bars(struct pci_dev *d)
{
    u32 nbars = d->hdr == 0 ? 6 : d->hdr == 1 ? 2 : d->hdr == 2 ? 1 : 0, i;
    u16 cmd;
    bool off;

    if (!nbars)
        return;
    cmd = pci_read16(d, PCI_COMMAND);
    off = (cmd & (PCI_CMD_IO | PCI_CMD_MEM)) && (d->class >> 8) != 0x0600;
    if (off)
        pci_write16(d, PCI_COMMAND, cmd & ~(PCI_CMD_IO | PCI_CMD_MEM));
    for (i = 0; i < nbars; i++) {
        u32 reg = PCI_BAR0 + 4 * i, lo, mlo, hi = 0, mhi = 0;
        struct pci_bar *b = &d->bar[i];
        u64 mask;

        lo = pci_read32(d, reg);
        pci_write32(d, reg, 0xffffffff);
        mlo = pci_read32(d, reg);
        pci_write32(d, reg, lo);
        if (lo & 1) { /* I/O: 16-bit decode at least */
            if (mlo & 0xfffc) {
                b->flags = BAR_IO;
                b->addr = lo & ~3u;
                b->size = (~(u64)(mlo & 0xfffc) + 1) & 0xffff;
            }
            continue;
        }
        if (((lo >> 1) & 3) == 2 && i + 1 < nbars) { /* 64-bit: the next BAR is the upper half */
            hi = pci_read32(d, reg + 4);
            pci_write32(d, reg + 4, 0xffffffff);
            mhi = pci_read32(d, reg + 4);
            pci_write32(d, reg + 4, hi);
            b->flags = BAR_64;
            mask = ((u64)mhi << 32) | (mlo & ~0xfu);
        } else {
            mask = 0xffffffff00000000ULL | (mlo & ~0xfu);
        }
        if (lo & 8)
            b->flags |= BAR_PREF;
        if ((mlo & ~0xfu) || mhi) {
            b->addr = ((u64)hi << 32) | (lo & ~0xfu);
            b->size = ~mask + 1;
        } else {
            b->flags = 0;
        }
        if (b->flags & BAR_64)
            i++;
    }
    if (off)
        pci_write16(d, PCI_COMMAND, cmd);
}

static bool scan_bus(u32 si, u32 bus, u32 depth)
{
    const struct pci_seg *s = &segs[si];
    u32 dev, fn, nfn;

    bus_seen[si][bus / 8] |= (u8)(1u << (bus % 8));
    for (dev = 0; dev < 32; dev++) {
        nfn = 1;
        for (fn = 0; fn < nfn; fn++) {
            struct pci_dev t, *d;
            u32 id;
            memset(&t, 0, sizeof(t));
            t.seg = s->seg;
            t.bus = (u8)bus;
            t.dev = (u8)dev;
            t.fn = (u8)fn;
            if (s->base)
                t.ecam = s->base + ((u64)bus << 20) + ((u64)dev << 15) + ((u64)fn << 12);
            id = pci_read32(&t, 0);
            if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0)
                continue; /* no function here (fn 0 absent: nfn stays 1) */
            if (fn == 0 && (pci_read8(&t, PCI_HDR_TYPE) & 0x80))
                nfn = 8; /* multi-function */
            if (ndevs == PCI_DEVS_MAX) {
                set_err("more than 64 PCI functions", ~0ULL);
                return false;
            }
            d = &devs[ndevs++];
            *d = t;
            d->vendor = (u16)id;
            d->device = (u16)(id >> 16);
            d->class = pci_read32(&t, 0x08) >> 8;
            d->hdr = pci_read8(&t, PCI_HDR_TYPE) & 0x7f;
            d->subsys = d->hdr == 0 ? pci_read16(&t, 0x2e) : 0;
            size_bars(d);
            if (d->hdr == 1) { /* PCI-to-PCI bridge: its secondary bus, if firmware numbered it */
                u32 sec = pci_read8(&t, PCI_SECONDARY_BUS);
                if (sec > bus && sec >= s->start && sec <= s->end && depth < 32 &&
                    !(bus_seen[si][sec / 8] & (1u << (sec % 8))))
                    if (!scan_bus(si, sec, depth + 1))
                        return false;
            }
        }
    }
    return true;
}

static bool pci_scan(void)
{
    u32 mlen = 0, i, n;
    u64 mcfg = acpi_find_table("MCFG", &mlen);

    nsegs = 0;
    n = mcfg && mlen >= 44 ? (mlen - 44) / 16 : 0;
    for (i = 0; i < n && nsegs < PCI_SEGS_MAX; i++) {
        u64 e = mcfg + 44 + 16 * i;
        struct pci_seg *s = &segs[nsegs];
        s->base = rd64(e);
        s->seg = rd16(e + 8);
        s->start = rd8(e + 10);
        s->end = rd8(e + 11);
        if (s->end < s->start)
            continue;
        if (!s->base) {
            set_err("MCFG allocation with base 0", ~0ULL);
            return false;
        }
        /* The window starts at the start bus; the base is where bus 0 would be. */
        if (!map_mmio(s->base + ((u64)s->start << 20), ((u64)s->end - s->start + 1) << 20, false)) {
            set_err("cannot map ECAM at ", s->base + ((u64)s->start << 20));
            return false;
        }
        nsegs++;
    }
    if (!nsegs) { /* no MCFG: the PC config ports, segment 0, bus 0 up */
        segs[0].base = 0;
        segs[0].seg = 0;
        segs[0].start = 0;
        segs[0].end = 255;
        nsegs = 1;
    }
    memset(bus_seen, 0, sizeof(bus_seen));
    ndevs = 0;
    for (i = 0; i < nsegs; i++)
        if (!scan_bus(i, segs[i].start, 0))
            return false;
    return true;
}

struct pci_dev *pci_devices(u32 *n, struct result *r)
{
    if (!scanned) {
        scanned = true;
        scan_ok = pci_scan();
    }
    *n = ndevs;
    if (!scan_ok) {
        res_str(r, scan_err);
        return NULL;
    }
    return devs;
}

void line_bdf(struct line *l, const struct pci_dev *d)
{
    line_hexpad(l, d->seg, 4);
    line_char(l, ':');
    line_hexpad(l, d->bus, 2);
    line_char(l, ':');
    line_hexpad(l, d->dev, 2);
    line_char(l, '.');
    line_hexpad(l, d->fn, 1);
}

void res_bdf(struct result *r, const struct pci_dev *d)
{
    static const char hx[] = "0123456789abcdef";
    char s[12];
    s[0] = hx[(d->seg >> 12) & 15];
    s[1] = hx[(d->seg >> 8) & 15];
    s[2] = hx[(d->seg >> 4) & 15];
    s[3] = hx[d->seg & 15];
    s[4] = ':';
    s[5] = hx[d->bus >> 4];
    s[6] = hx[d->bus & 15];
    s[7] = ':';
    s[8] = hx[d->dev >> 4];
    s[9] = hx[d->dev & 15];
    s[10] = '.';
    s[11] = hx[d->fn & 7];
    res_strn(r, s, 12);
}

bool step_pci(struct result *r)
{
    struct pci_dev *d;
    u32 n, i, k, nseg = 0;

    d = pci_devices(&n, r);
    if (!d)
        return false;
    for (i = 0; i < n; i++) {
        struct line l;
        line_begin(&l);
        line_str(&l, "pci dev bdf=");
        line_bdf(&l, &d[i]);
        line_str(&l, " vendor=0x");
        line_hexpad(&l, d[i].vendor, 4);
        line_str(&l, " device=0x");
        line_hexpad(&l, d[i].device, 4);
        line_str(&l, " class=0x");
        line_hexpad(&l, d[i].class, 6);
        for (k = 0; k < 6; k++) {
            const struct pci_bar *b = &d[i].bar[k];
            if (!b->size)
                continue;
            line_str(&l, " bar");
            line_dec(&l, k);
            line_char(&l, '=');
            line_hex(&l, b->addr);
            line_char(&l, '/');
            line_hex(&l, b->size);
            if (b->flags & BAR_64)
                line_str(&l, ",64");
            if (b->flags & BAR_PREF)
                line_str(&l, ",pref");
            if (b->flags & BAR_IO)
                line_str(&l, ",io");
        }
        line_end(&l);
    }
    for (i = 0; i < nsegs; i++) { /* distinct segment numbers */
        for (k = 0; k < i && segs[k].seg != segs[i].seg; k++)
            ;
        if (k == i)
            nseg++;
    }
    if (!n) {
        res_str(r, "no PCI devices found");
        return false;
    }
    res_kv_dec(r, "segments", nseg);
    res_kv_dec(r, "devices", n);
    return true;
}

/*
 * The pcihotplug and pciunplug steps: PCI hot-plug the way Linux's ACPI code
 * does it, without AML. Each waits for the VMM's Generic Event Device
 * interrupt with the PCI bit (bit 2 of its event register), then reads Cloud
 * Hypervisor's PCI hot-plug controller (the DSDT's PCST region: vmkit and
 * Cloud Hypervisor place it differently) as the DSDT's PCNT does, for each
 * segment of
 * the MCFG: write the segment to PSEG (offset 12), read PCIU (offset 0,
 * slots added) or PCID (offset 4, slots to remove). pcihotplug probes each
 * added slot's function 0 (it joins the device list, so the blk step that
 * follows drives it); pciunplug ejects each slot to remove by writing its
 * bit to B0EJ (offset 8), as _EJ0 does, and checks that the function is gone
 * from config space.
 */
#define PHP_GED_PCI_CHANGED 0x04
#define PHP_ADDR php_addr
#define PHP_PCIU (PHP_ADDR + 0)
#define PHP_PCID (PHP_ADDR + 4)
#define PHP_B0EJ (PHP_ADDR + 8)
#define PHP_PSEG (PHP_ADDR + 12)

static u64 php_addr;

/* Finds the controller in the DSDT and maps `len` bytes of it. */
static bool php_map(u64 len, struct result *r)
{
    php_addr = hotplug_regs()->pci;
    if (!(hotplug_regs()->found & HP_PCI) || !map_mmio(php_addr, len, false)) {
        res_str(r, "no PCI hot-plug controller (PCST) in the DSDT, or it cannot be mapped");
        return false;
    }
    return true;
}

static int php_wait(const char *waiting, struct result *r)
{
    u32 n;

    if (!pci_devices(&n, r)) /* enumerated before the change, as at boot */
        return -1;
    if (!php_map(16, r))
        return -1;
    return ged_wait_event(PHP_GED_PCI_CHANGED, waiting, r);
}

/* Selects segment seg (PSEG); false if the controller did not take it. */
static bool php_select(u16 seg)
{
    wr32(PHP_PSEG, seg);
    return rd32(PHP_PSEG) == seg;
}

static void php_line(const char *what, const struct pci_dev *d)
{
    struct line l;
    line_begin(&l);
    line_str(&l, what);
    line_str(&l, " bdf=");
    line_bdf(&l, d);
    line_str(&l, " vendor=0x");
    line_hexpad(&l, d->vendor, 4);
    line_str(&l, " device=0x");
    line_hexpad(&l, d->device, 4);
    line_end(&l);
}

/* The config-space handle of (segment si's) bus 0, slot dev, function 0. */
static void php_dev(u32 si, u32 dev, struct pci_dev *t)
{
    memset(t, 0, sizeof(*t));
    t->seg = segs[si].seg;
    t->dev = (u8)dev;
    if (segs[si].base)
        t->ecam = segs[si].base + ((u64)dev << 15);
}

bool step_pcihotplug(struct result *r)
{
    u32 si, dev, added = 0;
    int event = php_wait("pcihotplug waiting", r);

    if (event < 0)
        return false;
    for (si = 0; si < nsegs; si++) {
        u32 up;
        if (!php_select(segs[si].seg)) {
            res_str(r, "PSEG did not take segment ");
            res_dec(r, segs[si].seg);
            return false;
        }
        up = rd32(PHP_PCIU);
        if (rd32(PHP_PCIU)) {
            res_str(r, "PCIU not cleared by its read");
            return false;
        }
        for (dev = 0; dev < 32; dev++) {
            struct pci_dev t, *d;
            u32 id;
            if (!(up & (1u << dev)))
                continue;
            php_dev(si, dev, &t);
            id = pci_read32(&t, 0);
            if ((id & 0xffff) == 0xffff || (id & 0xffff) == 0) {
                res_str(r, "slot marked up has no function: dev=");
                res_dec(r, dev);
                return false;
            }
            if (ndevs == PCI_DEVS_MAX) {
                res_str(r, "more than 64 PCI functions");
                return false;
            }
            d = &devs[ndevs++];
            *d = t;
            d->vendor = (u16)id;
            d->device = (u16)(id >> 16);
            d->class = pci_read32(&t, 0x08) >> 8;
            d->hdr = pci_read8(&t, PCI_HDR_TYPE) & 0x7f;
            d->subsys = d->hdr == 0 ? pci_read16(&t, 0x2e) : 0;
            size_bars(d);
            php_line("pcihotplug added", d);
            added++;
        }
    }
    res_kv_hex(r, "event", (u64)event);
    res_kv_dec(r, "added", added);
    if (!added)
        res_str(r, " no slot marked up");
    return added > 0;
}

bool step_pciunplug(struct result *r)
{
    u32 si, dev, i, ejected = 0;
    int event = php_wait("pciunplug waiting", r);

    if (event < 0)
        return false;
    for (si = 0; si < nsegs; si++) {
        u32 down;
        if (!php_select(segs[si].seg)) {
            res_str(r, "PSEG did not take segment ");
            res_dec(r, segs[si].seg);
            return false;
        }
        down = rd32(PHP_PCID);
        for (dev = 0; dev < 32; dev++) {
            struct pci_dev t;
            if (!(down & (1u << dev)))
                continue;
            php_dev(si, dev, &t);
            wr32(PHP_B0EJ, 1u << dev); /* _EJ0 */
            if ((pci_read32(&t, 0) & 0xffff) != 0xffff) {
                res_str(r, "function still present after its eject: dev=");
                res_dec(r, dev);
                return false;
            }
            for (i = 0; i < ndevs; i++) /* gone: later steps must not use it */
                if (devs[i].seg == t.seg && devs[i].bus == 0 && devs[i].dev == dev) {
                    devs[i].vendor = 0xffff;
                    devs[i].class = 0;
                }
            t.vendor = 0xffff;
            t.device = 0xffff;
            php_line("pciunplug ejected", &t);
            ejected++;
        }
    }
    res_kv_hex(r, "event", (u64)event);
    res_kv_dec(r, "ejected", ejected);
    if (!ejected)
        res_str(r, " no slot marked down");
    return ejected > 0;
}

/*
 * The pcihostile step: what a hostile guest can do to the PCI hot-plug
 * controller. Accesses of every size at every offset of its 16 bytes (and
 * past them), segments that do not exist written to PSEG, then an eject of
 * every slot of segment 0 (the host bridge, the boot devices, empty slots).
 * It prints what is left: PSEG's value and the slots of segment 0 that still
 * have a function.
 */
bool step_pcihostile(struct result *r)
{
    static const u32 segments[] = {0xffffffffu, 0x10000, 0xff, PCI_SEGS_MAX};
    u32 n, off, i, present = 0;
    u64 noise = 0;

    if (!pci_devices(&n, r))
        return false;
    if (!php_map(4096, r))
        return false;
    for (off = 0; off < 32; off++) {
        noise += rd8(PHP_ADDR + off);
        if (off != 8) /* a byte of B0EJ would eject nothing: 4-byte accesses only */
            wr8(PHP_ADDR + off, 0xff);
        if (!(off & 1)) {
            noise += rd16(PHP_ADDR + off);
            wr16(PHP_ADDR + off, 0xffff);
        }
    }
    wr32(PHP_PCIU, 0xffffffffu); /* read-only bitmaps */
    wr32(PHP_PCID, 0xffffffffu);
    for (i = 0; i < ARRAY_SIZE(segments); i++)
        wr32(PHP_PSEG, segments[i]);
    res_kv_hex(r, "pseg", rd32(PHP_PSEG));
    wr32(PHP_PSEG, segs[0].seg);
    wr32(PHP_B0EJ, 0xffffffffu); /* eject every slot */
    for (i = 0; i < 32; i++) {
        struct pci_dev t;
        php_dev(0, i, &t);
        if ((pci_read32(&t, 0) & 0xffff) != 0xffff)
            present |= 1u << i;
    }
    res_kv_hex(r, "present", present);
    (void)noise;
    return true;
}
