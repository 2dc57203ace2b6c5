// A userfaultfd and its handshake and registration. Faults on a registered range block the faulting
// thread until the owner of this descriptor resolves them, which is what lets the destination run a
// guest whose memory has not arrived yet. See `man 2 userfaultfd` and `man 2 ioctl_userfaultfd`.

import CEpcopyLinux
import EpcopyProtocol
#if canImport(Glibc)
import Glibc
#endif

/// Features a userfaultfd can offer (`UFFD_FEATURE_*`), as reported by UFFDIO_API.
public struct UffdFeatures: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    public static let pagefaultFlagWP = UffdFeatures(rawValue: UInt64(UFFD_FEATURE_PAGEFAULT_FLAG_WP))
    public static let eventFork = UffdFeatures(rawValue: UInt64(UFFD_FEATURE_EVENT_FORK))
    public static let eventRemap = UffdFeatures(rawValue: UInt64(UFFD_FEATURE_EVENT_REMAP))
    public static let eventRemove = UffdFeatures(rawValue: UInt64(UFFD_FEATURE_EVENT_REMOVE))
    public static let missingHugetlbfs = UffdFeatures(rawValue: UInt64(UFFD_FEATURE_MISSING_HUGETLBFS))
    public static let missingShmem = UffdFeatures(rawValue: UInt64(UFFD_FEATURE_MISSING_SHMEM))
    public static let eventUnmap = UffdFeatures(rawValue: UInt64(UFFD_FEATURE_EVENT_UNMAP))
    public static let sigbus = UffdFeatures(rawValue: UInt64(UFFD_FEATURE_SIGBUS))
    public static let threadID = UffdFeatures(rawValue: UInt64(UFFD_FEATURE_THREAD_ID))
    public static let minorHugetlbfs = UffdFeatures(rawValue: UInt64(UFFD_FEATURE_MINOR_HUGETLBFS))
    public static let minorShmem = UffdFeatures(rawValue: UInt64(UFFD_FEATURE_MINOR_SHMEM))
    public static let exactAddress = UffdFeatures(rawValue: UInt64(UFFD_FEATURE_EXACT_ADDRESS))
    public static let wpHugetlbfsShmem = UffdFeatures(rawValue: UInt64(UFFD_FEATURE_WP_HUGETLBFS_SHMEM))
    public static let wpUnpopulated = UffdFeatures(rawValue: UInt64(UFFD_FEATURE_WP_UNPOPULATED))
    public static let poison = UffdFeatures(rawValue: UInt64(UFFD_FEATURE_POISON))
    public static let wpAsync = UffdFeatures(rawValue: UInt64(UFFD_FEATURE_WP_ASYNC))
    public static let move = UffdFeatures(rawValue: UInt64(UFFD_FEATURE_MOVE))

    /// Stable snake_case names, used by `epcopy probe --json`.
    public static let named: [(String, UffdFeatures)] = [
        ("missing_shmem", .missingShmem), ("missing_hugetlbfs", .missingHugetlbfs),
        ("wp", .pagefaultFlagWP), ("wp_shmem", .wpHugetlbfsShmem), ("wp_unpopulated", .wpUnpopulated),
        ("wp_async", .wpAsync), ("minor_shmem", .minorShmem), ("minor_hugetlbfs", .minorHugetlbfs),
        ("thread_id", .threadID), ("event_remove", .eventRemove), ("event_unmap", .eventUnmap),
        ("event_remap", .eventRemap), ("event_fork", .eventFork), ("sigbus", .sigbus),
        ("exact_address", .exactAddress), ("poison", .poison), ("move", .move),
    ]
}

/// The ioctls the kernel allows on a uffd or a registered range (the `ioctls` mask of UFFDIO_API/REGISTER).
public struct UffdIoctls: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    private init(bit: Int32) { self.rawValue = 1 << UInt64(bit) }

    public static let register = UffdIoctls(bit: EPC_UFFDIO_BIT_REGISTER)
    public static let unregister = UffdIoctls(bit: EPC_UFFDIO_BIT_UNREGISTER)
    public static let wake = UffdIoctls(bit: EPC_UFFDIO_BIT_WAKE)
    public static let copy = UffdIoctls(bit: EPC_UFFDIO_BIT_COPY)
    public static let zeropage = UffdIoctls(bit: EPC_UFFDIO_BIT_ZEROPAGE)
    public static let writeprotect = UffdIoctls(bit: EPC_UFFDIO_BIT_WRITEPROTECT)
    public static let `continue` = UffdIoctls(bit: EPC_UFFDIO_BIT_CONTINUE)
    public static let api = UffdIoctls(bit: EPC_UFFDIO_BIT_API)

    public static let named: [(String, UffdIoctls)] = [
        ("UFFDIO_API", .api), ("UFFDIO_REGISTER", .register), ("UFFDIO_UNREGISTER", .unregister),
        ("UFFDIO_WAKE", .wake), ("UFFDIO_COPY", .copy), ("UFFDIO_ZEROPAGE", .zeropage),
        ("UFFDIO_WRITEPROTECT", .writeprotect), ("UFFDIO_CONTINUE", .continue),
    ]

    public var names: [String] { Self.named.filter { contains($0.1) }.map(\.0) }
}

/// Registration modes (`UFFDIO_REGISTER_MODE_*`).
public struct UffdRegisterMode: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let missing = UffdRegisterMode(rawValue: EPC_UFFDIO_REGISTER_MODE_MISSING)
    public static let writeProtect = UffdRegisterMode(rawValue: EPC_UFFDIO_REGISTER_MODE_WP)
    public static let minor = UffdRegisterMode(rawValue: EPC_UFFDIO_REGISTER_MODE_MINOR)
}

/// How a userfaultfd is obtained. Both paths exist because hosts differ: the syscall needs
/// CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1, the device needs permission on /dev/userfaultfd.
public enum UffdOpenPath: String, Sendable, CaseIterable {
    case syscall
    case device
}

/// An open userfaultfd after the UFFDIO_API handshake.
public struct Userfaultfd: ~Copyable, Sendable {
    public let descriptor: FileDescriptor
    /// Features the handshake enabled (a subset of what was asked; the kernel refuses unknown ones).
    public let features: UffdFeatures
    /// Ioctls allowed on the descriptor itself.
    public let ioctls: UffdIoctls

    /// Opens a uffd (non-blocking, close-on-exec) and performs UFFDIO_API asking for `features`.
    /// UFFDIO_API may be called once per descriptor, so the features are fixed from here on.
    public init(path: UffdOpenPath = .device, features: UffdFeatures = []) throws(SyscallError) {
        let flags = O_CLOEXEC | O_NONBLOCK
        let raw: Int
        switch path {
        case .syscall: raw = try Syscall.check("userfaultfd") { Int(epc_userfaultfd(flags)) }
        case .device: raw = try Syscall.check("open(/dev/userfaultfd)+USERFAULTFD_IOC_NEW") {
                Int(epc_userfaultfd_dev(flags))
            }
        }
        let fd = FileDescriptor(adopting: Int32(raw))
        var gotFeatures: UInt64 = 0
        var gotIoctls: UInt64 = 0
        // EINVAL here means an unknown API number or a feature this kernel lacks.
        _ = try Syscall.check("UFFDIO_API") {
            epc_uffd_api(fd.rawValue, features.rawValue, &gotFeatures, &gotIoctls)
        }
        self.descriptor = fd
        self.features = UffdFeatures(rawValue: gotFeatures)
        self.ioctls = UffdIoctls(rawValue: gotIoctls)
    }

    /// Every feature this kernel offers: asking for none makes UFFDIO_API report all of them.
    public static func availableFeatures(path: UffdOpenPath = .device) throws(SyscallError) -> UffdFeatures {
        try Userfaultfd(path: path, features: []).features
    }

    /// Registers `[start, start+length)` and returns the ioctls allowed on it. EINVAL: the range is not
    /// page aligned, the mapping type does not support `mode`, or the feature was not enabled.
    public func register(start: UInt, length: Int, mode: UffdRegisterMode) throws(SyscallError) -> UffdIoctls {
        var mask: UInt64 = 0
        _ = try Syscall.check("UFFDIO_REGISTER") {
            epc_uffd_register(descriptor.rawValue, UInt64(start), UInt64(length), mode.rawValue, &mask)
        }
        return UffdIoctls(rawValue: mask)
    }

    public func unregister(start: UInt, length: Int) throws(SyscallError) {
        _ = try Syscall.check("UFFDIO_UNREGISTER") {
            epc_uffd_unregister(descriptor.rawValue, UInt64(start), UInt64(length))
        }
    }
}

/// Resolving faults. Each call names the kernel's answers the engine must expect, from
/// `man 2 ioctl_userfaultfd`:
/// - EEXIST: the page is already present (another path placed it first): wake the waiters instead.
/// - EAGAIN: a remove/unmap event is pending, or the copy was partial; retry after reading events.
/// - ENOENT/ESRCH: the target mm is gone (the process exited): stop serving.
/// Addresses are host virtual addresses in the *registered* process, passed as integers.
extension Userfaultfd {
    /// Outcome of a placement ioctl.
    public enum Placement: Equatable, Sendable {
        /// Every byte was placed and the faulting threads (if any) were woken.
        case placed
        /// Some page in the range was already present; nothing beyond `bytesDone` was placed.
        case alreadyPresent(bytesDone: Int)
        /// EAGAIN: retry later; `bytesDone` bytes were placed before the kernel stopped.
        case retry(bytesDone: Int)
        /// ENOENT/ESRCH: the process that owned the memory is gone.
        case targetGone
    }

    static func placement(_ call: String, rc: Int, done: Int64) throws(SyscallError) -> Placement {
        if rc == 0 { return .placed }
        let err = Int32(-rc)
        let doneBytes = done > 0 ? Int(done) : 0
        switch err {
        case EEXIST: return .alreadyPresent(bytesDone: doneBytes)
        case EAGAIN: return .retry(bytesDone: doneBytes)
        case ENOENT, ESRCH: return .targetGone
        default: throw SyscallError(call: call, errno: err)
        }
    }

    /// UFFDIO_COPY: atomically fills missing pages at `destination` from `source` and wakes faulters.
    public func copy(to destination: UInt, from source: UnsafeRawPointer, length: Int,
                     wake: Bool = true) throws(SyscallError) -> Placement {
        try Self.copy(fd: descriptor.rawValue, to: destination, from: source, length: length, wake: wake)
    }

    /// UFFDIO_ZEROPAGE: maps zero-filled pages (free pages and holes are never fetched).
    public func zeroPage(at start: UInt, length: Int, wake: Bool = true) throws(SyscallError) -> Placement {
        try Self.zeroPage(fd: descriptor.rawValue, at: start, length: length, wake: wake)
    }

    /// UFFDIO_CONTINUE: maps pages already in the page cache (written through the engine's own
    /// mapping of the file) into the registered range without copying. MINOR mode only.
    public func `continue`(at start: UInt, length: Int, wake: Bool = true) throws(SyscallError) -> Placement {
        try Self.continue(fd: descriptor.rawValue, at: start, length: length, wake: wake)
    }

    /// UFFDIO_WAKE: wakes threads blocked on faults in the range (after EEXIST, or after DONTWAKE).
    public func wake(start: UInt, length: Int) throws(SyscallError) {
        try Self.wake(fd: descriptor.rawValue, start: start, length: length)
    }

    // The same ioctls on a descriptor the caller does not own as a `Userfaultfd` (a hand-over from the
    // shim, or a takeover): the engine's Placement is built on these. Each retries EINTR; EEXIST, EAGAIN,
    // ENOENT/ESRCH come back as `Placement` values (see the list above), anything else throws.

    static func copy(fd: Int32, to destination: UInt, from source: UnsafeRawPointer, length: Int,
                     wake: Bool = true) throws(SyscallError) -> Placement {
        try placing("UFFDIO_COPY") { done in
            epc_uffd_copy(fd, UInt64(destination), UInt64(UInt(bitPattern: source)), UInt64(length),
                          wake ? 0 : EPC_UFFDIO_COPY_MODE_DONTWAKE, &done)
        }
    }

    static func zeroPage(fd: Int32, at start: UInt, length: Int, wake: Bool = true) throws(SyscallError) -> Placement {
        try placing("UFFDIO_ZEROPAGE") { done in
            epc_uffd_zeropage(fd, UInt64(start), UInt64(length), wake ? 0 : EPC_UFFDIO_ZEROPAGE_MODE_DONTWAKE, &done)
        }
    }

    static func `continue`(fd: Int32, at start: UInt, length: Int, wake: Bool = true) throws(SyscallError) -> Placement {
        try placing("UFFDIO_CONTINUE") { done in
            epc_uffd_continue(fd, UInt64(start), UInt64(length), wake ? 0 : EPC_UFFDIO_CONTINUE_MODE_DONTWAKE, &done)
        }
    }

    /// Runs a placement ioctl (retrying EINTR) and classifies its result.
    private static func placing(_ call: String, _ ioctl: (inout Int64) -> Int) throws(SyscallError) -> Placement {
        var done: Int64 = 0
        var rc: Int
        repeat { rc = ioctl(&done) } while rc == -Int(EINTR)
        return try placement(call, rc: rc, done: done)
    }

    static func wake(fd: Int32, start: UInt, length: Int) throws(SyscallError) {
        _ = try Syscall.check("UFFDIO_WAKE") { epc_uffd_wake(fd, UInt64(start), UInt64(length)) }
    }

    /// UFFDIO_UNREGISTER. EINVAL: the range is not (or no longer) registered with this uffd.
    static func unregister(fd: Int32, start: UInt, length: Int) throws(SyscallError) {
        _ = try Syscall.check("UFFDIO_UNREGISTER") { epc_uffd_unregister(fd, UInt64(start), UInt64(length)) }
    }
}
