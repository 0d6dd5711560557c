/* The powerbutton step: waits for the VMM to press the ACPI power button.
 *
 * vmkit signals it through its Generic Event Device (ACPI0013): an edge
 * interrupt on IOAPIC pin 5 and a one-byte event register at 0xfeb00000 whose
 * bit 3 means "power button" (the DSDT's _EVT does the same reads). The
 * address and pin are vmkit's layout; this guest does not interpret AML.
 */
#include "guest.h"

#define GED_ADDRESS 0xfeb00000ULL
#define GED_PIN 5
#define GED_POWER_BUTTON 0x08
#define POWERBUTTON_VECTOR (IRQ_VECTOR_BASE + IRQ_VECTORS - 1)
#define POWERBUTTON_TIMEOUT_MS 10000

bool step_powerbutton(struct result *r)
{
    u32 interrupts;
    u8 event;

    if (!lapic_usable(r))
        return false;
    if (!ioapic_map() || !map_mmio(GED_ADDRESS, 1, false)) {
        res_str(r, "cannot map the IOAPIC or the GED register");
        return false;
    }
    (void)rd8(GED_ADDRESS); /* drop a stale event */
    interrupts = wait_pin_interrupt(GED_PIN, POWERBUTTON_VECTOR, "powerbutton waiting",
                                    POWERBUTTON_TIMEOUT_MS);
    if (!interrupts) {
        res_str(r, "no GED interrupt within 10000 ms");
        return false;
    }
    event = rd8(GED_ADDRESS);
    if (!(event & GED_POWER_BUTTON)) {
        res_str(r, "GED interrupt without the power-button bit: event=");
        res_hex(r, event);
        return false;
    }
    if (rd8(GED_ADDRESS) != 0) {
        res_str(r, "the GED event was not cleared by reading it");
        return false;
    }
    res_kv_hex(r, "event", event);
    res_kv_dec(r, "interrupts", interrupts);
    return true;
}
