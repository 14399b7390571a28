"""The precopy comparison's guest (``bench/compare_qemu.py --mode precopy``), one boot sector
assembled here with ``as``/``ld``.

It enters 64-bit long mode with 2 MiB pages mapping the first 16 GiB, writes one byte into every
page of its RAM from 1 MiB up once (no page is left zero or untouched: livemig's model guest fills
every page with its pattern before it starts), then either halts for good with interrupts off
(idle) or becomes the light writer: it halts between ticks of the PIT and, at each tick,
increments the first byte of the next ``ppt`` pages in address order, wrapping at the end, and adds
them to a counter at :data:`COUNTER`. A halted guest, not a busy delay loop: livemig's writer
sleeps between its pages, and a spinning vCPU would take one of the host's CPUs from QEMU's
migration thread. The pace (PIT divisor, pages per tick) sits in the image at
:data:`PACE_OFFSET`, so it is set without assembling again.

RAM layout: QEMU's ``pc`` machine is told to keep at most :data:`LOW_LIMIT` below 4 GiB
(``max-ram-below-4g``); the rest of the RAM starts at 4 GiB, and the guest walks both parts."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

from livemig.benchmark.qemu_vm import GUEST_START

GIB = 1 << 30
LOW_LIMIT = 2 * GIB  #: the most RAM the guest has below 4 GiB (``max-ram-below-4g``)
PIT_HZ = 1_193_182  #: the PIT's input clock
MAX_TICK_HZ = 1000  #: at most this many ticks per second: more pages per tick above it
COUNTER = 0x500  #: u64: pages the writer has written (after the first pass)
PHASE = 0x508  #: byte: 1 once every page has been written once
PACE_OFFSET = 504  #: where the image holds its pace: u16 divisor (0: idle), u16 pages per tick

#: Real mode to 32-bit protected mode, page tables (2 MiB pages, 0..16 GiB identity), long mode;
#: then the first pass and either a halt (idle) or the PIT-paced writer. LOW_END, HIGH_START,
#: HIGH_END come from --defsym; at LOW_END the walk continues at HIGH_START (equal to HIGH_END and
#: LOW_END when all RAM is below 4 GiB), at HIGH_END it wraps to GUEST_START.
PRECOPY_ASM = """
    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7c00, %sp
    in $0x92, %al
    or $2, %al
    and $0xfe, %al
    out %al, $0x92
    lgdt gdt_desc
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmp $0x08, $pm
    .code32
pm:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7c00, %esp
    mov $0x1000, %edi          # PML4 at 0x1000, PDPT at 0x2000: zeroed
    xor %eax, %eax
    mov $0x800, %ecx
    rep stosl
    movl $0x2003, 0x1000
    mov $0x2000, %edi          # 16 PDPT entries: page directories at 0x10000 + i * 4096
    mov $0x10003, %eax
    mov $16, %ecx
1:  mov %eax, (%edi)
    add $0x1000, %eax
    add $8, %edi
    loop 1b
    mov $0x10000, %edi         # 8192 directory entries: 2 MiB pages, identity
    xor %ebx, %ebx
    mov $8192, %ecx
2:  mov %ebx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, (%edi)
    mov %ebx, %eax
    shr $11, %eax
    mov %eax, 4(%edi)
    inc %ebx
    add $8, %edi
    loop 2b
    mov %cr4, %eax
    or $0x20, %eax             # PAE
    mov %eax, %cr4
    mov $0x1000, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx      # EFER.LME
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax
    mov %eax, %cr0
    ljmp $0x18, $lm
    .code64
lm:
    movabs $LOW_END, %r8
    movabs $HIGH_START, %r9
    movabs $HIGH_END, %r10
    mov $GUEST_START, %r11
    mov %r11, %rdi
3:  incb (%rdi)                # the first pass: every page written once
    call advance
    cmp %r11, %rdi
    jne 3b
    movb $1, PHASE
    movzwl pace, %eax
    test %eax, %eax
    jnz writer
4:  hlt                        # idle: halted for good (interrupts are off)
    jmp 4b
writer:
    mov $0x11, %al             # the PIC: IRQ 0-7 at vectors 0x20-0x27, only IRQ 0 unmasked
    out %al, $0x20
    out %al, $0xa0
    mov $0x20, %al
    out %al, $0x21
    mov $0x28, %al
    out %al, $0xa1
    mov $4, %al
    out %al, $0x21
    mov $2, %al
    out %al, $0xa1
    mov $1, %al
    out %al, $0x21
    out %al, $0xa1
    mov $0xfe, %al
    out %al, $0x21
    mov $0xff, %al
    out %al, $0xa1
    mov $0x3000, %edi          # IDT at 0x3000: every one of its 0x30 vectors goes to tick
    mov $0x30, %ecx
5:  movw $tick, (%rdi)
    movw $0x18, 2(%rdi)
    movw $0x8e00, 4(%rdi)
    movw $0, 6(%rdi)
    movq $0, 8(%rdi)
    add $16, %rdi
    loop 5b
    lidt idt_desc
    mov $0x34, %al             # PIT channel 0, rate generator, divisor from the pace
    out %al, $0x43
    movzwl pace, %eax
    out %al, $0x40
    mov %ah, %al
    out %al, $0x40
    mov %r11, %rdi
    sti
6:  hlt
    movzwl pace + 2, %ecx
    mov %rcx, %rdx
7:  incb (%rdi)
    call advance
    loop 7b
    add %rdx, COUNTER
    jmp 6b
advance:                       # rdi to the next page of RAM, in address order, wrapping
    add $4096, %rdi
    cmp %r8, %rdi
    jne 8f
    mov %r9, %rdi
8:  cmp %r10, %rdi
    jb 9f
    mov %r11, %rdi
9:  ret
tick:
    push %rax
    mov $0x20, %al
    out %al, $0x20
    pop %rax
    iretq
    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff   # 0x08 code, 32-bit
    .quad 0x00cf92000000ffff   # 0x10 data
    .quad 0x00af9a000000ffff   # 0x18 code, 64-bit
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt
idt_desc:
    .word 0x30 * 16 - 1
    .quad 0x3000
    . = _start + 504
pace:
    .word 0, 0
    . = _start + 510
    .byte 0x55, 0xaa
"""


def ram_layout(mem_bytes: int) -> tuple[int, int, int]:
    """(LOW_END, HIGH_START, HIGH_END) of a guest of ``mem_bytes`` on the ``pc`` machine with
    ``max-ram-below-4g`` at LOW_LIMIT: RAM is [0, LOW_END) and [HIGH_START, HIGH_END)."""
    low = min(mem_bytes, LOW_LIMIT)
    if mem_bytes <= LOW_LIMIT:
        return low, low, low
    return low, 4 * GIB, 4 * GIB + mem_bytes - low


def pace_for(rate: float) -> tuple[int, int]:
    """(PIT divisor, pages per tick) for about ``rate`` pages/s, at most MAX_TICK_HZ ticks/s."""
    if not PIT_HZ / 0xFFFF <= rate <= 64 * MAX_TICK_HZ:  # the PIT's slowest tick, 64 pages a tick
        raise ValueError(f"the writer's rate must be in [19, {64 * MAX_TICK_HZ}] pages/s, got {rate:g}")
    ppt = max(1, math.ceil(rate / MAX_TICK_HZ))
    return max(1, min(0xFFFF, round(PIT_HZ * ppt / rate))), ppt


def set_pace(image: Path, divisor: int, ppt: int) -> None:
    """Writes the pace into the image (divisor 0: the idle guest)."""
    with image.open("r+b") as f:
        f.seek(PACE_OFFSET)
        f.write(divisor.to_bytes(2, "little") + ppt.to_bytes(2, "little"))


def build_precopy_guest(directory: Path, mem_bytes: int) -> Path:
    """Assembles the guest for ``mem_bytes`` of RAM (idle until :func:`set_pace`); its image."""
    src, obj, img = directory / "precopy.S", directory / "precopy.o", directory / "precopy.img"
    low, high_start, high_end = ram_layout(mem_bytes)
    src.write_text(PRECOPY_ASM)
    syms = {"GUEST_START": GUEST_START, "LOW_END": low, "HIGH_START": high_start, "HIGH_END": high_end,
            "PHASE": PHASE, "COUNTER": COUNTER}
    defs = [a for k, v in syms.items() for a in ("--defsym", f"{k}={v:#x}")]
    subprocess.run(["as", "--64", *defs, "-o", str(obj), str(src)], check=True, capture_output=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext", "0x7c00", "--oformat", "binary", "-e", "_start",
                    "-o", str(img), str(obj)], check=True, capture_output=True)
    if img.stat().st_size != 512:
        raise RuntimeError(f"the guest assembled to {img.stat().st_size} bytes, not one 512-byte sector")
    with img.open("r+b") as f:
        f.truncate(1 << 20)
    return img


__all__ = ["COUNTER", "GIB", "LOW_LIMIT", "PACE_OFFSET", "PHASE", "PRECOPY_ASM", "build_precopy_guest", "pace_for",
           "ram_layout", "set_pace"]
