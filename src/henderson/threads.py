"""Threads: how many a fit may use, and the BLAS libraries set to match (issue 15).

:func:`resolve_threads` decides the count: the ``threads=`` argument, else the
``HENDERSON_THREADS`` environment variable, else :func:`default_threads` (the CPUs
this process may use, from its affinity mask and its cgroup's CPU quota).
:func:`fit_threads` holds that count for the duration of a fit: BLAS (every OpenBLAS
or MKL threadpoolctl finds: NumPy's, SciPy's, CHOLMOD's) and OpenMP are limited to it
and restored afterwards, and henderson's own Python threads (the block elimination's
two halves, bootstrap replicates, PLINK decoding, the block-diagonal kernel) ask
:func:`active_threads` how many they may start. Our threads and BLAS's run in
different phases of a fit; where our threads run beside BLAS calls (bootstrap
replicates), BLAS gets one thread.

On a busy machine (:func:`machine_is_busy`) a fit whose count nobody set runs BLAS on
one thread: OpenBLAS's threads spin and wait for each other, and when another process
holds a core a parallel LAPACK call waits for a thread that is not running. Measured
on the 2-core machine of the benchmarks with one other busy process, n = 2,000:
``dsytrd`` 0.5 s on one thread against 11-14 s on two; ``eigh`` 1.2-1.7 s against
4-7 s; InstEval REML beside two busy processes 14-20 s on two BLAS threads against
~2 s on one (docs/benchmarks.md, "Threads on a shared machine", has the figures).
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
import threading
import time

#: the environment variable that sets the thread count when ``threads=`` is not given
ENVIRONMENT_VARIABLE = "HENDERSON_THREADS"

#: where the cgroup file systems are mounted
CGROUP_ROOT = "/sys/fs/cgroup"

#: the machine counts as busy (and BLAS gets one thread by default) when the runnable
#: threads of other processes, or the 1-minute load average, reach this share of the
#: CPUs this process may use less one: on 2 CPUs, one busy core
BUSY_SHARE = 1.0

#: seconds for which a reading of the machine's load stands: a loop of small fits
#: reads ``/proc/loadavg`` a few times a second, not once a fit (10-50 µs a read)
BUSY_RECHECK = 0.1


def cgroup_cpu_limit(root: str = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``quota / period``), or None
    when there is none.

    Reads cgroup v2's ``cpu.max`` (``"max 100000"``: no quota; ``"150000 100000"``:
    1.5 CPUs), else v1's ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (a quota of
    -1: none), under ``root`` (in the process's own cgroup when ``/proc/self/cgroup``
    names one, else at the root of the mount, as in a container).

    Examples
    --------
    >>> from henderson.threads import cgroup_cpu_limit
    >>> limit = cgroup_cpu_limit()
    >>> limit is None or limit > 0
    True
    """
    for folder in _cgroup_folders(root, "", "cpu.max"):
        text = _read(os.path.join(folder, "cpu.max"))
        if text is not None:
            fields = text.split()
            if len(fields) < 2 or fields[0] == "max":
                return None
            return _ratio(fields[0], fields[1])
    for controller in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        for folder in _cgroup_folders(root, controller, "cpu.cfs_quota_us"):
            quota = _read(os.path.join(folder, "cpu.cfs_quota_us"))
            period = _read(os.path.join(folder, "cpu.cfs_period_us"))
            if quota is not None and period is not None:
                return _ratio(quota, period)
    return None


def _cgroup_folders(root: str, controller: str, name: str) -> list[str]:
    """The folders that may hold ``name``: the process's own cgroup (from
    ``/proc/self/cgroup``), then the mount's root."""
    base = os.path.join(root, controller) if controller else root
    folders = []
    own = _read("/proc/self/cgroup") if root == CGROUP_ROOT else None
    for line in (own or "").splitlines():
        hierarchy, _, path = line.partition(":")[2].partition(":")
        if path not in ("", "/") and (hierarchy == controller
                                      or (not controller and hierarchy == "")):
            folders.append(os.path.join(base, path.lstrip("/")))
    return folders + [base]


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:  # v1 writes -1 for no quota
        return None
    return quota_us / period_us


_QUOTA = []  # the cgroup quota, read once per process


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask (``os.sched_getaffinity``),
    capped by its cgroup's CPU quota rounded up (joblib's rule: 1.5 CPUs of quota
    is 2), at least 1.

    Examples
    --------
    >>> from henderson.threads import available_cpus
    >>> available_cpus() >= 1
    True
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    if not _QUOTA:
        _QUOTA.append(cgroup_cpu_limit())
    if _QUOTA[0] is not None:
        cpus = min(cpus, math.ceil(_QUOTA[0]))
    return max(1, cpus)


def machine_load() -> tuple[float, int]:
    """The 1-minute load average and the threads of the whole machine runnable now
    besides the caller, from ``/proc/loadavg`` (its first and fourth fields; the
    fourth is ``running/total``); ``(0.0, 0)`` where it cannot be read.

    Examples
    --------
    >>> from henderson.threads import machine_load
    >>> load, runnable = machine_load()
    >>> load >= 0 and runnable >= 0
    True
    """
    try:
        fd = os.open("/proc/loadavg", os.O_RDONLY)
        try:
            fields = os.read(fd, 128).split()
        finally:
            os.close(fd)
        return float(fields[0]), max(0, int(fields[3].split(b"/")[0]) - 1)
    except (OSError, ValueError, IndexError):  # pragma: no cover - not on Linux
        return 0.0, 0


def available_memory() -> float:
    """Bytes of memory available to new allocations without swapping: ``MemAvailable``
    of ``/proc/meminfo`` (free pages and the page cache the kernel can drop); +inf where
    it cannot be read.

    Examples
    --------
    >>> from henderson.threads import available_memory
    >>> available_memory() > 0
    True
    """
    try:
        with open("/proc/meminfo", "rb") as meminfo:
            for line in meminfo:
                if line.startswith(b"MemAvailable:"):
                    return float(line.split()[1]) * 1024.0
    except (OSError, ValueError, IndexError):  # pragma: no cover - not on Linux
        pass
    return math.inf  # pragma: no cover


#: the load average's time constant in seconds (the kernel's 1-minute average)
LOAD_WINDOW = 60.0

_OWN = []  # this process's share of the load average: [when, CPU seconds, share]


def own_share() -> tuple[float, int]:
    """What this process itself adds to :func:`machine_load`: its share of the 1-minute
    load average and its threads runnable now besides the caller.

    The runnable threads are those of ``/proc/self/task`` in state R: OpenBLAS's
    workers spin for a while after a BLAS call and count as running, so a fresh
    process's first fit took its own pool for a busy neighbour and ran BLAS on one
    thread on an idle machine. Other fits running in threads of this process are
    counted by :func:`fit_threads` instead (:func:`default_blas_threads`). The share of the
    load is this process's CPU time averaged as the kernel averages the load (an
    exponential window of :data:`LOAD_WINDOW` seconds), from its start the first time
    and from the previous reading after: a loop of fits in one process raises the
    load average by about one and is not another process's work. ``(0.0, 0)`` where
    ``/proc`` cannot be read.

    Examples
    --------
    >>> from henderson.threads import own_share
    >>> share, runnable = own_share()
    >>> share >= 0.0 and runnable >= 0
    True
    """
    try:
        running = 0
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat", "rb") as stat:
                    text = stat.read()
            except OSError:  # the thread ended meanwhile
                continue
            # the state follows the command, which may hold spaces and parentheses
            state = text.rindex(b")") + 2
            if text[state:state + 1] == b"R":
                running += 1
        now = time.monotonic()
        cpu = time.process_time()
        if not _OWN:
            with open("/proc/self/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            with open("/proc/uptime", "rb") as uptime:
                up = float(uptime.read().split()[0])
            # field 22 of stat, the start in clock ticks after boot (the 20th after ")")
            started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
            elapsed, spent, share = max(up - started, 1e-3), cpu, 0.0
        else:
            read_at, spent_before, share = _OWN
            elapsed, spent = max(now - read_at, 1e-3), cpu - spent_before
        decay = math.exp(-elapsed / LOAD_WINDOW)
        share = share * decay + min(spent / elapsed, float(os.cpu_count() or 1)) * (1 - decay)
        _OWN[:] = [now, cpu, share]
        return share, max(0, running - 1)
    except (OSError, ValueError, IndexError):  # pragma: no cover - not on Linux
        return 0.0, 0


def machine_is_busy(cpus: int | None = None) -> bool:
    """Whether other work holds the CPUs: the 1-minute load average, or the threads
    runnable right now besides this one (:func:`machine_load`), less what this
    process adds to each (:func:`own_share`), reach ``BUSY_SHARE * (cpus - 1)``,
    where ``cpus`` is :func:`available_cpus`. A 2-CPU machine is busy from one busy
    core; the runnable count catches a neighbour that started too recently to show in
    the load average (two fits started together). A reading stands for
    ``BUSY_RECHECK`` seconds.

    Examples
    --------
    >>> from henderson.threads import machine_is_busy
    >>> machine_is_busy() in (True, False)
    True
    """
    cpus = available_cpus() if cpus is None else cpus
    now = time.monotonic()
    read_at, read_cpus, busy = _BUSY
    if read_cpus == cpus and now - read_at < BUSY_RECHECK:
        return busy
    threshold = BUSY_SHARE * (cpus - 1)
    load, runnable = machine_load()
    own_load, own_runnable = own_share()
    busy = load - own_load >= threshold or runnable - own_runnable >= threshold
    _BUSY[:] = [now, cpus, busy]
    return busy


_BUSY = [float("-inf"), None, False]  # the last reading: when, for how many CPUs, busy?


def default_threads() -> int:
    """The thread count of a fit when neither ``threads=`` nor ``HENDERSON_THREADS``
    sets it: :func:`available_cpus`. On a busy machine BLAS then runs one thread
    (:func:`default_blas_threads`) and henderson's own threads keep this count.

    Examples
    --------
    >>> from henderson.threads import available_cpus, default_threads
    >>> default_threads() == available_cpus()
    True
    """
    return available_cpus()


def default_blas_threads(threads: int) -> int:
    """BLAS's threads in a fit of ``threads`` threads whose count nobody set: one when
    the machine is busy (:func:`machine_is_busy`) or another fit runs in a thread of
    this process (threads a Dask worker or a thread pool runs fits in), else
    ``threads``.

    Why BLAS and not our own threads: OpenBLAS's threads spin and wait for each other,
    so a parallel LAPACK call waits for any of them another process holds (InstEval
    REML beside two busy processes: 14-20 s on two BLAS threads, ~2 s on one); the
    block elimination's two threads each take a fixed half and block (no spinning)
    when done, so a held core costs them at most the half's time: with one BLAS thread,
    two of ours did no worse than one beside busy processes and better alone
    (docs/benchmarks.md, "Threads on a shared machine").

    Examples
    --------
    >>> from henderson.threads import default_blas_threads
    >>> default_blas_threads(1)
    1
    """
    if threads > 1 and (machine_is_busy() or _FITS[0] > 1):
        return 1
    return threads


_FITS = [0]  # fits running in this process (fit_threads blocks), in any thread


def check_threads(threads, name: str = "threads") -> int | None:
    """``threads`` as a positive int, or None; a ValueError or TypeError naming
    ``name`` otherwise."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral):
        raise TypeError(f"{name} must be a positive whole number or None, got {threads!r}")
    value = int(threads)
    if value < 1:
        raise ValueError(f"{name} must be a positive whole number or None, got {threads!r}")
    return value


def resolve_threads(threads: int | None = None) -> int:
    """The number of threads a fit uses: ``threads`` if given, else the
    ``HENDERSON_THREADS`` environment variable, else :func:`default_threads`.

    Parameters
    ----------
    threads : int, optional
        A positive whole number; larger than the CPUs is allowed (it is what was asked).

    Returns
    -------
    int

    Raises
    ------
    ValueError, TypeError
        ``threads`` (or the environment variable) is not a positive whole number.

    Examples
    --------
    >>> from henderson.threads import resolve_threads
    >>> resolve_threads(1)
    1
    >>> resolve_threads(0)
    Traceback (most recent call last):
    ...
    ValueError: threads must be a positive whole number or None, got 0
    """
    if threads is not None:
        return check_threads(threads)
    text = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if text:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"the environment variable {ENVIRONMENT_VARIABLE} must be a "
                             f"positive whole number, got {text!r}")
        return value
    return default_threads()


# ---------------------------------------------------------------------------------
# the limits during a fit

_LOCAL = threading.local()
_CONTROLLER = []  # threadpoolctl's controller, built once (3.5 ms; its use ~3 µs)
_LOCK = threading.RLock()


def _libraries():
    """threadpoolctl's controllers of the loaded BLAS and OpenMP libraries, found once
    per process (after ``import henderson`` has loaded NumPy's, SciPy's and
    CHOLMOD's)."""
    if not _CONTROLLER:
        try:
            from threadpoolctl import ThreadpoolController
            libraries = [lib for lib in ThreadpoolController().lib_controllers
                         if lib.user_api in ("blas", "openmp")]
        except Exception:  # pragma: no cover - threadpoolctl is a dependency
            libraries = []
        _CONTROLLER.append(libraries)
    return _CONTROLLER[0]


def active_threads() -> int:
    """The thread count of the fit running in this thread (set by :func:`fit_threads`),
    or :func:`resolve_threads` outside a fit. Henderson's own thread pools start at most
    this many threads.

    Examples
    --------
    >>> from henderson.threads import active_threads, fit_threads
    >>> with fit_threads(1):
    ...     active_threads()
    1
    """
    active = getattr(_LOCAL, "threads", None)
    return resolve_threads() if active is None else active


def blas_thread_counts() -> dict[str, int]:
    """The current thread count of each BLAS and OpenMP library, by file path."""
    return {lib.filepath: lib.get_num_threads() for lib in _libraries()}


@contextlib.contextmanager
def fit_threads(threads: int | None = None, blas: int | None = None):
    """Run the block as a fit with ``threads`` threads: :func:`active_threads` gives
    that count in this thread, and the BLAS and OpenMP libraries run at most ``blas``
    threads (default ``threads``); their previous counts are restored on leaving.

    ``threads`` goes through :func:`resolve_threads` (None: the environment variable
    or the default). When neither the argument nor the environment sets it, BLAS gets
    :func:`default_blas_threads` (one on a busy machine), and a library already
    limited lower keeps its lower count (a Dask worker's or ``OPENBLAS_NUM_THREADS=1``). Inside another ``fit_threads`` block, None keeps the
    outer count. Entering costs ~10 µs (libraries whose count is already right are
    not touched).

    Examples
    --------
    >>> import henderson as hd
    >>> from henderson.threads import blas_thread_counts, fit_threads
    >>> before = blas_thread_counts()
    >>> with fit_threads(1):
    ...     set(blas_thread_counts().values())
    {1}
    >>> blas_thread_counts() == before
    True
    """
    previous_active = getattr(_LOCAL, "threads", None)
    if threads is None and blas is None and previous_active is not None:
        yield previous_active  # inside a fit already: its count holds
        return
    explicit = threads is not None or os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    count = resolve_threads(threads)
    with _LOCK:
        _FITS[0] += 1
    try:
        if blas is not None:
            limit = max(1, int(blas))
        else:
            limit = count if explicit else default_blas_threads(count)
        forced = explicit or blas is not None
        changed = _set_library_threads(lambda current: limit if forced else min(limit, current))
        _LOCAL.threads = count
        try:
            yield count
        finally:
            _LOCAL.threads = previous_active
            _restore_library_threads(changed)
    finally:
        with _LOCK:
            _FITS[0] -= 1


@contextlib.contextmanager
def blas_threads(limit: int = 1):
    """Run the block with at most ``limit`` BLAS (and OpenMP) threads, keeping the
    fit's own thread count; restored on leaving.

    Examples
    --------
    >>> from henderson.threads import blas_thread_counts, blas_threads
    >>> with blas_threads(1):
    ...     set(blas_thread_counts().values())
    {1}
    """
    changed = _set_library_threads(lambda current: min(limit, current))
    try:
        yield
    finally:
        _restore_library_threads(changed)


def _set_library_threads(target) -> list:
    """Give each BLAS/OpenMP library ``target(its current count)`` threads (a library
    that does not say its count is left alone); the changed ones, with their counts."""
    changed = []
    with _LOCK:
        for lib in _libraries():
            current = lib.get_num_threads()
            if current is None:
                continue
            wanted = target(current)
            if current != wanted:
                lib.set_num_threads(wanted)
                changed.append((lib, current))
    return changed


def _restore_library_threads(changed: list) -> None:
    with _LOCK:
        for lib, current in reversed(changed):
            lib.set_num_threads(current)


# OpenBLAS 0.3.30 (SciPy's wheels) and 0.3.31 (NumPy's) crash with a segmentation fault
# in their threaded SYRK (dsyrk_thread_LN/LT -> inner_thread -> dgemm_o?copy), which
# DPOTRF also calls, once the result passes ~2 GB; on one thread every size runs.
# Measured on this 2-core machine with two BLAS threads: dpotrf crashed at order 16,000
# (2.0 GB) and 20,000 and ran at 8,192-15,000 (1.8 GB); dsyrk crashed at 20,000 (3.2 GB;
# k = 256 and 2,048) and ran at 16,500 (2.2 GB); numpy's ``X @ X.T`` (a SYRK) crashed at
# 20,000; ssyrk ran at 20,000 and 24,000 (2.3 GB) and crashed at 33,000 (4.4 GB).
LARGE_DENSE_BYTES = 1.2e9


def dense_blas_threads(order: int, itemsize: int = 8):
    """A context for a SYRK or dense Cholesky (DPOTRF, ``np.linalg.cholesky``,
    ``X.T @ X``) whose result is ``order`` x ``order`` of ``itemsize`` bytes: one BLAS
    thread once the result reaches :data:`LARGE_DENSE_BYTES` (float64 from order
    12,248, float32 from 17,321), where OpenBLAS's threaded SYRK crashes; below,
    nothing changes.

    Examples
    --------
    >>> from henderson.threads import blas_thread_counts, dense_blas_threads
    >>> with dense_blas_threads(20_000):
    ...     set(blas_thread_counts().values())
    {1}
    """
    if float(order) * float(order) * itemsize >= LARGE_DENSE_BYTES:
        return blas_threads(1)
    return contextlib.nullcontext()
