/*
 * Constants shared by the C and assembly sources (no C syntax here).
 */
#ifndef VMKIT_LAYOUT_H
#define VMKIT_LAYOUT_H

/* Physical load address of the image (PT_LOAD p_paddr, bzImage code32_start). */
#define LOAD_ADDR 0x100000
/* Offset of the 64-bit entry inside the image (Linux: startup_64 at +0x200). */
#define ENTRY64_OFFSET 0x200

/* Debug port and the values written to it (the VMM timestamps these). */
#define DEBUG_PORT 0x80
#define DBG_PVH_ENTRY 0x01
#define DBG_LINUX64_ENTRY 0x02
#define DBG_READY 0x7f

/* Boot protocols (first argument of guest_main). */
#define BOOT_PVH 1
#define BOOT_LINUX64 2

/* GDT selectors (user data before user code, the order sysret would need). */
#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS 0x18 /* used with RPL 3 */
#define USER_CS 0x20 /* used with RPL 3 */
#define TSS_SEL 0x28
#define GDT_SIZE 0x38 /* null, 4 code/data descriptors, 16-byte TSS descriptor */

/* Control registers and MSRs. */
#define CR0_PE 0x00000001
#define CR0_ET 0x00000010
#define CR0_PG 0x80000000
#define CR4_PAE 0x00000020
#define MSR_EFER 0xc0000080
#define EFER_LME 0x100
#define MSR_APIC_BASE 0x1b

/* AP start-up: real-mode trampoline copied to TRAMPOLINE_ADDR, SIPI vector = addr >> 12. */
#define TRAMPOLINE_ADDR 0x2000
#define AP_STACK_SIZE 4096

/* Interrupt vectors. */
#define TIMER_VECTOR 0x40
#define SPURIOUS_VECTOR 0xff
#define IRQ_VECTOR_BASE 0x50 /* device interrupts (MSI-X test): IRQ_VECTORS stubs */
#define IRQ_VECTORS 32

/* Sizes of the fixed tables. */
#define CMDLINE_MAX 4095
#define MEMMAP_MAX 128
#define MODULES_MAX 8
#define ACPI_TABLES_MAX 48
#define PXM_MAX 128
#define MEMTEST_SEGS_MAX 256
#define MAX_APIC_ID 255
#define STEPS_MAX 32

/* Stacks. */
#define BOOT_STACK_SIZE 16384
#define TRAP_STACK_SIZE 8192
#define IST_STACK_SIZE 4096
#define USER_STACK_SIZE 16384

#endif
