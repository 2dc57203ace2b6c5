// Dedicated OS threads for blocking loops (uffd polling, io_uring rings). The cooperative pool has two
// threads on these machines; a fault loop must never wait behind a task there.

import CEpcopyLinux
#if canImport(Glibc)
import Glibc
#endif

/// A joinable pthread running one closure.
public final class JoinableThread: @unchecked Sendable {
    // SAFETY: `handle` is written once in init and read once in join; join is called by one owner.
    private var handle = pthread_t()
    private var joined = false

    private final class Box {
        let body: () -> Void
        init(_ body: @escaping () -> Void) { self.body = body }
    }

    public init(name: String, _ body: @escaping @Sendable () -> Void) {
        let box = Unmanaged.passRetained(Box({
            JoinableThread.nameCurrent(name)
            body()
        })).toOpaque()
        let rc = pthread_create(&handle, nil, { raw in
            let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
            box.body()
            return nil
        }, box)
        precondition(rc == 0, "pthread_create: \(Errno.name(rc))")
    }

    /// Sets the calling thread's nice value (Linux schedules threads individually). Fault-path threads
    /// run at -10 so that on a busy host a fault's few microseconds of work do not wait behind a bulk
    /// copy for a time slice. Needs CAP_SYS_NICE to go below 0; without it the call is a no-op.
    public static func setCurrentNice(_ nice: Int32) {
        _ = setpriority(__priority_which_t(PRIO_PROCESS.rawValue), id_t(epc_gettid()), nice)
    }

    /// Names the calling thread (15 characters at most): names show up in `top -H` and perf.
    public static func nameCurrent(_ name: String) {
        _ = epc_set_thread_name(String(name.prefix(15)))
    }

    /// Waits for the thread to finish. Call once.
    public func join() {
        guard !joined else { return }
        joined = true
        pthread_join(handle, nil)
    }
}

/// Monotonic time in nanoseconds.
@inline(__always)
public func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// CPU time (user + system) this process has used, in seconds.
public func processCPUSeconds() -> Double {
    var usage = rusage()
    getrusage(Int32(RUSAGE_SELF.rawValue), &usage)
    return Double(usage.ru_utime.tv_sec) + Double(usage.ru_utime.tv_usec) / 1e6
        + Double(usage.ru_stime.tv_sec) + Double(usage.ru_stime.tv_usec) / 1e6
}

/// CPU time the calling thread has used, in seconds.
public func threadCPUSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// An eventfd: how one thread wakes another's poll or io_uring loop.
public struct EventFD: ~Copyable, Sendable {
    public let descriptor: FileDescriptor

    public init() throws(SyscallError) {
        let fd = try Syscall.check("eventfd") { Int(epc_eventfd(0, 1)) }
        descriptor = FileDescriptor(adopting: Int32(fd))
    }

    public func signal() {
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { Glibc.write(descriptor.rawValue, $0.baseAddress, 8) }
    }

    /// Clears the counter; returns how many signals were pending.
    @discardableResult
    public func drain() -> UInt64 {
        var value: UInt64 = 0
        let n = withUnsafeMutableBytes(of: &value) { Glibc.read(descriptor.rawValue, $0.baseAddress, 8) }
        return n == 8 ? value : 0
    }
}
