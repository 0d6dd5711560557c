/*
 * pvpanic step: the PCI pvpanic device (vendor 0x1b36, device 0x0011). Its
 * BAR 0 holds one byte: reading gives the events the host understands,
 * writing reports one (what Linux's pvpanic-pci driver does on a panic).
 */
#include "pci.h"

#define PVPANIC_VENDOR 0x1b36
#define PVPANIC_DEVICE 0x0011

bool step_pvpanic(struct result *r)
{
    struct pci_dev *d;
    volatile u8 *reg;
    u32 n, i;
    u8 supported;

    if (cfg.pvpanic_bad) {
        res_str(r, "bad pvpanic_event value");
        return false;
    }
    d = pci_devices(&n, r);
    if (!d)
        return false;
    for (i = 0; i < n; i++)
        if (d[i].vendor == PVPANIC_VENDOR && d[i].device == PVPANIC_DEVICE)
            break;
    if (i == n) {
        res_str(r, "no pvpanic device");
        return false;
    }
    d += i;
    if (!d->bar[0].addr || (d->bar[0].flags & BAR_IO)) {
        res_str(r, "pvpanic BAR 0 is not an assigned memory BAR bdf=");
        res_bdf(r, d);
        return false;
    }
    if (!map_mmio(d->bar[0].addr, 1, false)) {
        res_str(r, "cannot map the pvpanic BAR at ");
        res_hex(r, d->bar[0].addr);
        return false;
    }
    pci_write16(d, PCI_COMMAND, pci_read16(d, PCI_COMMAND) | PCI_CMD_MEM);
    reg = (volatile u8 *)d->bar[0].addr;
    supported = *reg;
    *reg = (u8)cfg.pvpanic_event;
    res_str(r, " bdf=");
    res_bdf(r, d);

    res_kv_hex(r, "supported", supported);
    res_kv_hex(r, "event", cfg.pvpanic_event);
    return true;
}
