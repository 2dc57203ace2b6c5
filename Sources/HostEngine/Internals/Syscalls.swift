// The one syscall layer of the engine. Every call into the kernel goes through `Syscall.run`, which
// retries EINTR, hands EAGAIN back as a value (it is flow control, not failure), treats EFAULT and
// EBADF as programming bugs, and turns any other errno into a `SyscallError` naming the call.
// The C wrappers in CEpcopyLinux all return their result or -errno, so this is the only place that
// has to know about errno at all.

import CEpcopyLinux
#if canImport(Glibc)
import Glibc
#endif

/// A failed system call: which call, and the errno it returned.
public struct SyscallError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The call as a user should read it: "UFFDIO_REGISTER", "open(/dev/userfaultfd)".
    public let call: String
    public let errno: Int32

    public init(call: String, errno: Int32) {
        self.call = call
        self.errno = errno
    }

    /// The symbolic name of the errno ("EINVAL"), or "errno N" when it has none we know.
    public var errnoName: String { Errno.name(errno) }

    public var description: String { "\(call): \(errnoName) (\(Errno.message(errno)))" }
}

/// The outcome of a call that may legitimately say "not now".
public enum SyscallOutcome<Value: Sendable>: Sendable {
    case done(Value)
    /// EAGAIN/EWOULDBLOCK: nothing was done; try again later (e.g. a uffd remove event is pending).
    case wouldBlock
}

extension SyscallOutcome: Equatable where Value: Equatable {}

public enum Syscall {
    /// Runs a raw call that returns its result or -errno. Retries EINTR, returns EAGAIN as `.wouldBlock`,
    /// traps on EFAULT/EBADF (a wrong pointer or a closed descriptor is a bug in epcopy, not a runtime
    /// condition to recover from), throws every other errno as `SyscallError(call:errno:)`.
    @inline(__always)
    public static func run(_ call: @autoclosure () -> String,
                           _ body: () -> Int) throws(SyscallError) -> SyscallOutcome<Int> {
        while true {
            let rc = body()
            if rc >= 0 { return .done(rc) }
            let err = Int32(truncatingIfNeeded: -rc)
            switch err {
            case EINTR:
                continue
            case EAGAIN, EWOULDBLOCK:
                return .wouldBlock
            case EFAULT, EBADF:
                preconditionFailure("\(call()): \(Errno.name(err)) — epcopy passed a bad pointer or descriptor")
            default:
                throw SyscallError(call: call(), errno: err)
            }
        }
    }

    /// Like `run`, for calls where EAGAIN cannot happen or is itself a failure (blocking descriptors).
    @inline(__always)
    public static func check(_ call: @autoclosure () -> String, _ body: () -> Int) throws(SyscallError) -> Int {
        switch try run(call(), body) {
        case .done(let value): return value
        case .wouldBlock: throw SyscallError(call: call(), errno: EAGAIN)
        }
    }

    /// Adapts a libc call that returns -1 and sets errno to the -errno convention.
    @inline(__always)
    public static func negErrno(_ rc: Int) -> Int { rc < 0 ? -Int(errno) : rc }
}

/// errno names and messages, so errors read "EINVAL (Invalid argument)" rather than "22".
public enum Errno {
    private static let names: [Int32: String] = [
        EPERM: "EPERM", ENOENT: "ENOENT", ESRCH: "ESRCH", EINTR: "EINTR", EIO: "EIO", ENXIO: "ENXIO",
        E2BIG: "E2BIG", ENOEXEC: "ENOEXEC", EBADF: "EBADF", ECHILD: "ECHILD", EAGAIN: "EAGAIN",
        ENOMEM: "ENOMEM", EACCES: "EACCES", EFAULT: "EFAULT", EBUSY: "EBUSY", EEXIST: "EEXIST",
        EXDEV: "EXDEV", ENODEV: "ENODEV", ENOTDIR: "ENOTDIR", EISDIR: "EISDIR", EINVAL: "EINVAL",
        ENFILE: "ENFILE", EMFILE: "EMFILE", ENOTTY: "ENOTTY", EFBIG: "EFBIG", ENOSPC: "ENOSPC",
        ESPIPE: "ESPIPE", EROFS: "EROFS", EPIPE: "EPIPE", ERANGE: "ERANGE", ENOSYS: "ENOSYS",
        EOPNOTSUPP: "EOPNOTSUPP", ECONNREFUSED: "ECONNREFUSED", ECONNRESET: "ECONNRESET",
        ETIMEDOUT: "ETIMEDOUT", EADDRINUSE: "EADDRINUSE", ENOTCONN: "ENOTCONN", EHOSTUNREACH: "EHOSTUNREACH",
        ENETUNREACH: "ENETUNREACH", EMSGSIZE: "EMSGSIZE", ECANCELED: "ECANCELED", ENOTSOCK: "ENOTSOCK",
    ]

    public static func name(_ err: Int32) -> String { names[err] ?? "errno \(err)" }

    public static func message(_ err: Int32) -> String {
        guard let text = strerror(err) else { return "unknown error" }
        return String(cString: text)
    }
}
