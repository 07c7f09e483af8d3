"""The kernel<->host contract: every value a kgen kernel and the harness must agree on, written once.

The kernel learns these values from here through the build: numbers as named assembler constants
(`Layout.asm_constants`, like the layout's own), texts as assembler macros that emit them (`asm_string_macros`,
put in front of every template piece by kgen/build/asm.py). The harness imports them. So neither side writes a
literal the other also writes; a template that needs another value of the contract gets a name here first.

Below every package (only kgen/errors.py sits beside it): this module imports nothing of kgen. Facts of the hardware
(the UART's I/O ports, the Multiboot magic) are not the contract and stay in kgen/arch/hw.py; which of those ports
the contract uses is here.
"""
from __future__ import annotations

# ---- COM1: lines the kernel prints and the harness waits for ---------------------------------------------------
# The last line of the boot report (templates/report.s, parsed by kgen/guest/bootreport.py): the kernel is up.
BOOT_OK = "kgen: boot ok"
# The last line a kgen kernel prints before it writes the success value to the debug-exit port (templates/debugexit.s,
# exit_success). QEMU's exit status keeps only 8 bits of `(value << 1) | 1`, so any value ending in 0x10 - 0x90,
# 0xdead0010, a stray write - gives the success status; success needs this line too (kgen/harness/run.py).
EXIT_SUCCESS = "kgen: exit success"
# Printed once the kernel waits for calls on the call channel (templates/calls.s); kgen/harness/session.py waits for it.
SERVING = "kgen: serving calls on COM2"
# How a kgen kernel reports a CPU exception and a panic on COM1 (templates/interrupts.s, debugexit.s), each followed by
# its fields; kgen/guest/diagnose.py reads them back.
EXCEPTION_PREFIX = "kgen: exception"
PANIC_PREFIX = "kgen: panic: "
# On the kernel command line: stay up and serve calls instead of exiting.
SERVE_TOKEN = "kgen.serve"
# The frame allocator's line of the boot report (templates/pmm.s and pmm_bitmap.s, report_pmm; kgen/guest/pmmview.py
# parses it): "pmm: total=N reserved=N free=N frames; init N rdtsc ticks", these texts around the four numbers.
PMM_REPORT_PARTS = ("pmm: total=", " reserved=", " free=", " frames; init ", " rdtsc ticks")

# ---- QEMU's isa-debug-exit device: how a kernel ends the run with a status ---------------------------------------
# The port the device listens on: the kernel's exit port and the harness's `-device isa-debug-exit,iobase=`.
DEBUG_EXIT_PORT = 0xF4
# Values the kernel writes; QEMU exits with (value << 1) | 1 (see exit_status).
DEBUG_EXIT_SUCCESS = 0x10
DEBUG_EXIT_FAILURE = 0x11


def exit_status(value: int) -> int:
    """QEMU's process exit status after the kernel writes `value` to isa-debug-exit."""
    return (value << 1) | 1


# ---- the serial ports (QEMU's `-serial` options in order: 0 is COM1, 1 is COM2) --------------------------------
# COM1 carries text: the boot report, the lines above, exception and panic reports (Machine.serial).
# The call channel's port: the kernel drives that UART (CALL_PORT, CALL_IRQ in the templates); kgen/machine/machine.py
# connects it second, as `Machine.com2`.
CALL_SERIAL = 1

# ---- the call channel (templates/calls.s, kgen/guest/calls.py) ---------------------------------------------------
# Every field is one little-endian word of the kernel's architecture (4 bytes on i386, 8 on x86_64).
# Request: CALL_REQUEST_MAGIC, routine address, argument count n (at most CALL_MAX_ARGS), n arguments.
# Reply: the words of CALL_REPLY_FIELDS, in that order.
CALL_REQUEST_MAGIC = 0x4C4C4143     # "CALL"
CALL_REPLY_MAGIC = 0x54455221       # "!RET"
CALL_MAX_ARGS = 8
CALL_REPLY_FIELDS = ("magic", "status", "xax", "xdx", "tsc_low", "tsc_high")
CALL_STATUS_RAN = 0
CALL_STATUS_REFUSED = 1             # the address is outside the kernel's text: nothing ran

# ---- the access probe (probe_access in templates/peek.s) -----------------------------------------------------------
# probe_access(vaddr, kind) makes the CPU try one access of `kind` at vaddr and returns 0 when it went through, or
# PROBE_FAULTED | the page fault's error code (PF_* bits, cr2 in xdx) when the CPU refused it: the fault is contained,
# the kernel goes on serving calls. Above every error-code bit the CPU defines.
PROBE_READ = 0                      # a dword load
PROBE_WRITE = 1                     # a locked add of 0: a write for paging, the memory unchanged
PROBE_FETCH = 2                     # a call to vaddr (which must hold a `ret` if it is to come back)
PROBE_KINDS = {"read": PROBE_READ, "write": PROBE_WRITE, "fetch": PROBE_FETCH}
PROBE_FAULTED = 1 << 20


def asm_constants() -> dict[str, int]:
    """The contract's numbers as the templates name them."""
    return {
        "DEBUG_EXIT_PORT": DEBUG_EXIT_PORT,
        "DEBUG_EXIT_SUCCESS": DEBUG_EXIT_SUCCESS,
        "DEBUG_EXIT_FAILURE": DEBUG_EXIT_FAILURE,
        "CALL_REQUEST_MAGIC": CALL_REQUEST_MAGIC,
        "CALL_REPLY_MAGIC": CALL_REPLY_MAGIC,
        "CALL_MAX_ARGS": CALL_MAX_ARGS,
        "CALL_STATUS_RAN": CALL_STATUS_RAN,
        "CALL_STATUS_REFUSED": CALL_STATUS_REFUSED,
        "PROBE_READ": PROBE_READ,
        "PROBE_WRITE": PROBE_WRITE,
        "PROBE_FETCH": PROBE_FETCH,
        "PROBE_FAULTED": PROBE_FAULTED,
    }


# The texts the templates print, by the name of the macro that emits them (without a NUL: a template ends the line).
ASM_STRINGS = {
    "BOOT_OK_TEXT": BOOT_OK,
    "SERVING_TEXT": SERVING,
    "EXCEPTION_TEXT": EXCEPTION_PREFIX,
    "PANIC_TEXT": PANIC_PREFIX,
    **{f"PMM_REPORT_TEXT{i}": part for i, part in enumerate(PMM_REPORT_PARTS)},
}


def asm_string_macros() -> tuple[str, ...]:
    """`.macro NAME` / `.ascii "text"` / `.endm` for every text of ASM_STRINGS: a template writes NAME where the text
    goes, so the bytes stay where the template puts them. GNU as and keystone both expand such a macro."""
    lines: list[str] = []
    for name, text in ASM_STRINGS.items():
        if not text.isascii() or not text.isprintable() or '"' in text or "\\" in text:
            raise ValueError(f"protocol string {name} must be printable ASCII without quotes or backslashes")
        lines += [f".macro {name}", f'    .ascii "{text}"', ".endm"]
    return tuple(lines)
