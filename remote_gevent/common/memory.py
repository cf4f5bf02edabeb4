"""Hand memory freed during start-up back to the operating system (glibc only).

Start-up (imports, compiling modules that have no bytecode cache, reading the config,
the first TLS handshake) leaves freed blocks in glibc's heaps that stay resident: glibc
only gives back memory at the top of its main heap, and only above a threshold.
:func:`release` runs a full garbage collection, then ``malloc_trim(0)``, which returns
every free page of every malloc arena to the kernel. The agent calls it once it is up
and idle. Anywhere but glibc, or if anything goes wrong, it does nothing: this is an
optimisation, never a reason to fail.
"""

import gc
import logging
import os
from typing import Any, Optional

log = logging.getLogger(__name__)

_malloc_trim: Any = None  # glibc's malloc_trim once looked up; False: not available


def _lookup() -> Any:
    """``malloc_trim`` as a callable, or False.

    Through ``_cffi_backend`` (cffi's C module, the base of its ABI mode: PyNaCl has it
    loaded already, so it costs nothing); ctypes only as a fallback, since importing it
    costs about 0.4 MiB of RSS of its own.
    """
    global _malloc_trim
    if _malloc_trim is None:
        _malloc_trim = False
        try:
            if not os.confstr("CS_GNU_LIBC_VERSION"):  # None (or ValueError): not glibc
                return False
        except (ValueError, OSError):
            return False
        try:
            import _cffi_backend as backend

            func_type = backend.new_function_type(
                (backend.new_primitive_type("size_t"),), backend.new_primitive_type("int"),
                False)
            _malloc_trim = backend.load_library(None).load_function(func_type, "malloc_trim")
        except Exception as exc:  # noqa: BLE001 - any failure: try ctypes
            log.debug("malloc_trim through _cffi_backend: %s", exc)
            try:
                import ctypes

                func = ctypes.CDLL(None).malloc_trim
                func.argtypes = (ctypes.c_size_t,)
                func.restype = ctypes.c_int
                _malloc_trim = func
            except (AttributeError, OSError, ImportError) as exc2:
                log.debug("malloc_trim not available: %s", exc2)
    return _malloc_trim


def rss_kib() -> Optional[int]:
    """This process's resident set size in KiB (Linux), None when unknown."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def release() -> bool:
    """``gc.collect()``, then glibc's ``malloc_trim(0)``; True if the trim ran."""
    gc.collect()
    trim = _lookup()
    if not trim:
        return False
    try:
        trim(0)
    except Exception as exc:  # noqa: BLE001 - never fatal
        log.debug("malloc_trim failed: %s", exc)
        return False
    return True
