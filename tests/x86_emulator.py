"""Runs freestanding x86-64 code on an emulated Intel CPU that has AVX-512 with VNNI (Bochs's CPU model
of a Core i5-1135G7, Tiger Lake, through bochscpu-python), so that the AVX-512 kernels are tested on
machines without AVX-512.

The code is C++ from csrc/, compiled with the flags CMakeLists.txt gives it and linked with no runtime
at all (-nostdlib -static) at a fixed address. It is called like a C function: integer arguments in
registers and on the stack, and a return address that is not mapped, so that returning ends the run
with a page fault there. Any other fault ends the run too and raises EmulatedFault: #UD for an
instruction the emulated CPU lacks, #PF for a read or write outside the mapped buffers.

Guest memory is identity-mapped (virtual == guest physical), one 4 KiB host page per guest page. Bochs
keeps one guest memory per process, so one X86Machine exists at a time.
"""
from __future__ import annotations

import ctypes
import re
import shutil
import struct
import subprocess
from pathlib import Path

import bochscpu
import bochscpu.cpu
import bochscpu.memory

ROOT = Path(__file__).resolve().parents[1]
PAGE = bochscpu.memory.page_size()
RETURN_ADDRESS = 0xDEAD0000  # never mapped
PAGE_TABLES = 0x1_0000_0000  # guest-physical home of the page tables, above everything mapped
STACK_TOP = 0x7000_0000
STACK_BYTES = 64 * 1024

XCR0_X87_SSE_AVX = 0x7
XCR0_AVX512 = 0xE7  # + opmask, upper halves of zmm0-15, zmm16-31
CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE = 1 << 9, 1 << 10, 1 << 18

_open_machine = False


class EmulatedFault(RuntimeError):
    pass


def cmake_flags(name: str) -> list[str]:
    """The compile flags CMakeLists.txt sets as `set(NAME "...")`, e.g. AVX512_FLAGS."""
    text = (ROOT / "CMakeLists.txt").read_text()
    match = re.search(rf'set\({name} "([^"]*)"\)', text)
    if match is None:
        raise LookupError(f"CMakeLists.txt sets no {name}")
    return match.group(1).split()


def build_freestanding(sources: list[tuple[Path, list[str]]], entry: str, out: Path, base: int = 0x400000) -> Path:
    """Compiles each (source, its flags) and links them into a static ELF with no runtime, entry point
    `entry`, loaded from address `base` (so several can share a machine); functions the entry does not
    reach are dropped (with what they would need from libc)."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise FileNotFoundError("no C++ compiler (c++ or g++) on PATH")
    common = ["-std=c++17", "-O3", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'include'}", "-ffreestanding",
              "-fno-exceptions", "-fno-rtti", "-fno-asynchronous-unwind-tables", "-fno-stack-protector", "-fno-pic",
              "-ffunction-sections", "-fdata-sections"]
    def run(command):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}\n{done.stderr}")

    objects = []
    for i, (source, flags) in enumerate(sources):
        obj = out.with_name(f"{out.stem}.{i}.o")
        run([compiler, *common, *flags, "-c", str(source), "-o", str(obj)])
        objects.append(str(obj))
    run([compiler, "-no-pie", "-static", "-nostdlib", "-Wl,--gc-sections", f"-Wl,-e,{entry}",
         f"-Wl,-Ttext-segment={base:#x}", "-Wl,--build-id=none", "-o", str(out), *objects])
    return out


class X86Machine:
    def __init__(self):
        global _open_machine
        if _open_machine:
            raise RuntimeError("one X86Machine at a time: Bochs has one guest memory per process")
        _open_machine = True
        self._host_pages: dict[int, int] = {}  # guest page -> host page
        self._table_pages: list[int] = []
        self._tables = None
        self._tables_current = False
        self.map(STACK_TOP - STACK_BYTES, STACK_BYTES)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        global _open_machine
        for gpa in self._table_pages:
            bochscpu.memory.page_remove(gpa)
        for gpa, hva in self._host_pages.items():
            bochscpu.memory.page_remove(gpa)
            bochscpu.memory.release_host_page(hva)
        self._host_pages.clear()
        self._table_pages.clear()
        self._tables = None
        _open_machine = False

    def map(self, address: int, size: int):
        """Maps the pages covering [address, address + size), zero-filled."""
        for page in range(address & ~(PAGE - 1), address + size, PAGE):
            if page not in self._host_pages:
                hva = bochscpu.memory.allocate_host_page()
                ctypes.memset(hva, 0, PAGE)
                bochscpu.memory.page_insert(page, hva)
                self._host_pages[page] = hva
                self._tables_current = False

    def _chunks(self, address: int, size: int):
        done = 0
        while done < size:
            page, offset = (address + done) & ~(PAGE - 1), (address + done) & (PAGE - 1)
            if page not in self._host_pages:
                raise ValueError(f"guest page {page:#x} is not mapped")
            n = min(PAGE - offset, size - done)
            yield self._host_pages[page] + offset, done, n
            done += n

    def write(self, address: int, data: bytes):
        data = bytes(data)
        for host, done, n in self._chunks(address, len(data)):
            ctypes.memmove(host, data[done:done + n], n)

    def read(self, address: int, size: int) -> bytes:
        out = bytearray(size)
        for host, done, n in self._chunks(address, size):
            out[done:done + n] = ctypes.string_at(host, n)
        return bytes(out)

    def load_elf(self, path: Path) -> int:
        """Maps and copies the ELF's loadable segments; returns its entry point."""
        data = path.read_bytes()
        entry, phoff = struct.unpack_from("<QQ", data, 24)
        phentsize, phnum = struct.unpack_from("<HH", data, 54)
        for i in range(phnum):
            kind, _, offset, vaddr, _, filesz, memsz, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
            if kind == 1:  # PT_LOAD
                self.map(vaddr, memsz)
                self.write(vaddr, data[offset:offset + filesz] + bytes(memsz - filesz))
        return entry

    def _commit_page_tables(self):
        # Rebuilt from scratch: every mapped page, read/write/execute.
        for gpa in self._table_pages:
            bochscpu.memory.page_remove(gpa)
        tables = bochscpu.memory.PageMapLevel4Table()
        for page in self._host_pages:
            tables.insert(page, page, 1)
        self._table_pages = []
        for hva, gpa in tables.commit(PAGE_TABLES):
            bochscpu.memory.page_insert(gpa, hva)
            self._table_pages.append(gpa)
        self._tables = tables  # owns the host pages of the tables
        self._tables_current = True

    def call(self, function: int, *args: int, xcr0: int = XCR0_AVX512, osxsave: bool = True) -> int:
        """Calls function(*args) (System V ABI, integer arguments) in 64-bit mode; returns rax.
        xcr0 and osxsave set what the emulated OS has enabled of the extended register state."""
        if not self._tables_current:
            self._commit_page_tables()
        state = bochscpu.State()
        bochscpu.cpu.set_long_mode(state)
        state.cr4 = state.cr4 | CR4_OSFXSR | CR4_OSXMMEXCPT | (CR4_OSXSAVE if osxsave else 0)
        state.xcr0 = xcr0 if osxsave else 1
        state.cr3 = PAGE_TABLES
        for register, value in zip(["rdi", "rsi", "rdx", "rcx", "r8", "r9"], args):
            setattr(state, register, value)
        # Stack: the return address, then arguments 7 onwards; 16-byte aligned before the call.
        stack_args = args[6:]
        rsp = (STACK_TOP - 8 * len(stack_args) - 64) & ~0xF
        rsp -= 8
        self.write(rsp, b"".join(struct.pack("<q", v) for v in (RETURN_ADDRESS, *stack_args)))
        state.rsp = rsp
        state.rip = function
        state.rflags = 0x2
        state.mxcsr = 0x1F80  # the power-on value: every floating-point exception masked, as on Linux
        state.fpcw = 0x37F
        code = bochscpu.Segment()
        code.present, code.selector, code.base, code.limit, code.attr = True, 0x33, 0, 0xFFFFFFFF, 0x22FB
        data = bochscpu.Segment()
        data.present, data.selector, data.base, data.limit, data.attr = True, 0x2B, 0, 0xFFFFFFFF, 0xCF3
        state.cs = code
        state.ds = state.es = state.fs = state.gs = state.ss = data

        session = bochscpu.Session()
        session.missing_page_handler = _missing_page
        session.cpu.state = state
        faults = []

        def on_exception(sess, cpu_id, vector, error_code):
            faults.append((int(vector), int(error_code), sess.cpu.state.rip))
            sess.stop()

        hook = bochscpu.Hook()
        hook.exception = on_exception
        session.run([hook])
        end = session.cpu.state
        if not faults or faults[0][0] != 14 or end.rip != RETURN_ADDRESS:
            detail = "no fault" if not faults else f"vector {faults[0][0]}, error code {faults[0][1]:#x}"
            raise EmulatedFault(f"the call did not return: {detail} at rip {end.rip:#x}")
        return end.rax


def _missing_page(gpa: int):
    raise EmulatedFault(f"guest-physical page {gpa:#x} has no host page")
