# The two 8259 PICs, moved to IRQ_BASE so IRQs do not land on CPU exception vectors, with every line masked
# except the ones pic_unmask opens. The kernel uses interrupts only to wake from `hlt`.

.section .text
pic_init:
    mov al, 0x11                                    # ICW1: edge triggered, cascade, ICW4 follows
    out PIC1_COMMAND, al
    out PIC2_COMMAND, al
    mov al, IRQ_BASE                                # ICW2: vector bases
    out PIC1_DATA, al
    mov al, IRQ_BASE + 0x8
    out PIC2_DATA, al
    mov al, 0x4                                     # ICW3: slave on the master's IRQ 2
    out PIC1_DATA, al
    mov al, 0x2
    out PIC2_DATA, al
    mov al, 0x1                                     # ICW4: 8086 mode
    out PIC1_DATA, al
    out PIC2_DATA, al
    mov al, 0xff                                    # everything masked
    out PIC1_DATA, al
    out PIC2_DATA, al
    ret

# pic_unmask(irq): open one line of the master PIC (IRQ 0-7)
pic_unmask:
    FRAME 0x0
    mov xcx, [xsp + ARG1]
    in al, PIC1_DATA
    mov dl, 0x1
    shl dl, cl
    not dl
    and al, dl
    out PIC1_DATA, al
    ret
