/*
 * AP start-up trampoline. The BSP copies [tramp_start, tramp_end) to
 * TRAMPOLINE_ADDR (0x2000), patches tramp_cr3, and sends INIT-SIPI-SIPI
 * with vector 0x02: the AP starts here in real mode at CS=0x0200, IP=0.
 *
 * It goes straight from real mode to long mode (CR0.PE and CR0.PG set in
 * one write, which is architecturally allowed) and far-jumps to
 * ap_entry64 on the shared GDT and page tables. Data is addressed
 * relative to tramp_start because DS = CS = 0x0200.
 */
#include "layout.h"

    .section .text16, "ax"
    .code16
    .globl tramp_start, tramp_end, tramp_cr3
tramp_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (tramp_gdt_desc - tramp_start)
    movl (tramp_cr3 - tramp_start), %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $CR4_PAE, %eax
    movl %eax, %cr4
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl $(CR0_PG | CR0_ET | CR0_PE), %eax  /* also clears the reset CD/NW bits */
    movl %eax, %cr0
    ljmpl $KERNEL_CS, $ap_entry64

    .balign 4
tramp_gdt_desc:
    .word GDT_SIZE - 1
    .long boot_gdt
tramp_cr3:
    .long 0
tramp_end:
