/*
 * Interrupt/exception entry stubs, the CPL3 round trip (iretq down, ud2
 * back), the AP 64-bit entry and the triple-fault exit.
 * Only general-purpose registers are touched.
 */
#include "layout.h"

    .text

/* ---- exceptions 0-31: push a uniform frame and call exception_handler ---- */
.macro EXC_NOERR n
exc\n:
    pushq $0                            /* no error code: keep the frame uniform */
    pushq $\n
    jmp exc_common
.endm
.macro EXC_ERR n
exc\n:
    pushq $\n
    jmp exc_common
.endm

EXC_NOERR 0
EXC_NOERR 1
EXC_NOERR 2
EXC_NOERR 3
EXC_NOERR 4
EXC_NOERR 5
/* #UD: also the way back from CPL3 (see run_user) */
exc6:
    cmpq $user_exit, (%rsp)             /* frame: rip cs rflags rsp ss */
    jne 1f
    cmpq $(USER_CS | 3), 8(%rsp)
    je user_returned
1:  pushq $0
    pushq $6
    jmp exc_common
EXC_NOERR 7
EXC_ERR   8
EXC_NOERR 9
EXC_ERR   10
EXC_ERR   11
EXC_ERR   12
EXC_ERR   13
EXC_ERR   14
EXC_NOERR 15
EXC_NOERR 16
EXC_ERR   17
EXC_NOERR 18
EXC_NOERR 19
EXC_NOERR 20
EXC_ERR   21
EXC_NOERR 22
EXC_NOERR 23
EXC_NOERR 24
EXC_NOERR 25
EXC_NOERR 26
EXC_NOERR 27
EXC_NOERR 28
EXC_ERR   29
EXC_ERR   30
EXC_NOERR 31

/*
 * Frame passed to exception_handler (u64 words, lowest address first):
 * r15 r14 r13 r12 r11 r10 r9 r8 rbp rdi rsi rdx rcx rbx rax
 * vector error rip cs rflags rsp ss
 */
exc_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    cld
    movq %rsp, %rdi
    andq $-16, %rsp
    call exception_handler              /* does not return */
1:  cli
    hlt
    jmp 1b

    .section .rodata
    .balign 8
    .globl exception_stubs
exception_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exc\n
    .endr
    .text

/* ---- LAPIC timer (vector 0x40): flag it and EOI ---- */
    .globl timer_irq_stub
timer_irq_stub:
    pushq %rax
    movl $1, timer_fired(%rip)
    movl $0xfee000b0, %eax              /* LAPIC EOI register */
    movl $0, (%rax)
    popq %rax
    iretq

/* ---- device interrupts (MSI-X test), vectors IRQ_VECTOR_BASE + n: count and EOI ---- */
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
irq\n:
    pushq %rax
    movl $\n, %eax
    jmp irq_common
    .endr
irq_common:
    lock incl irq_counts(,%rax,4)
    movl $0xfee000b0, %eax              /* LAPIC EOI register */
    movl $0, (%rax)
    popq %rax
    iretq

    .section .rodata
    .balign 8
    .globl irq_stubs
irq_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad irq\n
    .endr
    .if (. - irq_stubs) - 8 * IRQ_VECTORS
    .error "irq_stubs does not match IRQ_VECTORS"
    .endif
    .text

/* ---- spurious LAPIC interrupt: no EOI ---- */
    .globl spurious_irq_stub
spurious_irq_stub:
    iretq

/*
 * u64 run_user(u64 (*fn)(void *), void *arg)
 * Runs fn(arg) at CPL3 (native speed on kvm_pvm) on the user stack,
 * entered with iretq, IOPL=0. IF=1 as in any OS's user mode: nothing is
 * unmasked that could interrupt it, and a VMM watchdog may take a vCPU
 * spinning with IF=0 for a dead one. The way back is the ud2 at user_exit:
 * the #UD stub recognises it and resumes run_user's caller with fn's
 * return value.
 *
 * Why not syscall: on kvm_pvm, syscall from CPL3 does jump to LSTAR but
 * leaves the vCPU at CPL3 (the next port access faults with CS=0x23).
 * Exceptions from CPL3 do switch to CPL0 through the TSS, everywhere.
 */
    .globl run_user
run_user:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, kernel_saved_rsp(%rip)
    leaq user_stack_top(%rip), %rax
    pushq $(USER_DS | 3)                /* SS */
    pushq %rax                          /* RSP */
    pushq $0x202                        /* RFLAGS: IF=1, IOPL=0 */
    pushq $(USER_CS | 3)                /* CS */
    leaq user_entry(%rip), %rax
    pushq %rax                          /* RIP */
    movq %rdi, %rax
    movq %rsi, %rdi
    iretq
user_entry:                             /* CPL3 */
    call *%rax
user_exit:
    ud2                                 /* -> exc6 -> user_returned, RAX = result */

/* From exc6, at CPL0 on the TSS RSP0 stack: drop the frame, resume run_user's caller. */
user_returned:
    movq kernel_saved_rsp(%rip), %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret

/* ---- APs arrive here from the trampoline, in 64-bit mode on our GDT/CR3 ---- */
    .globl ap_entry64
ap_entry64:
    movl $KERNEL_DS, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    movl $1, %eax
    lock xaddl %eax, ap_slot(%rip)      /* claim a stack slot */
    incl %eax
    imulq $AP_STACK_SIZE, %rax
    addq ap_stack_base(%rip), %rax
    movq %rax, %rsp
    lidt idt_desc(%rip)
    call ap_main
1:  cli
    hlt
    jmp 1b

/* ---- exit=triple-fault: no usable IDT, then #UD -> #DF -> shutdown ---- */
    .globl triple_fault
triple_fault:
    cli
    lidt zero_idt_desc(%rip)
    ud2
    jmp triple_fault

    .section .rodata
    .balign 16
zero_idt_desc:
    .word 0
    .quad 0

    .bss
    .balign 8
kernel_saved_rsp:
    .quad 0
    .globl timer_fired, ap_stack_base, ap_slot, irq_counts
irq_counts:
    .skip 4 * IRQ_VECTORS
timer_fired:
    .long 0
ap_slot:
    .long 0
ap_stack_base:
    .quad 0

    .bss
    .balign 4096
    .skip USER_STACK_SIZE
user_stack_top:
    .globl trap_stack_top, ist_stack_top
    .skip TRAP_STACK_SIZE
trap_stack_top:
    .skip IST_STACK_SIZE
ist_stack_top:
