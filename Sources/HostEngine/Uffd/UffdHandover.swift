// What a userfaultfd hand-over delivers — the uffd, the RAM file and the mapping's facts as the shim
// reported them, each already checked — and why a hand-over or takeover was refused.

#if canImport(Glibc)
import Glibc
#endif

/// Why a hand-over or takeover failed. The description says what to check.
public enum HandoverError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The peer's hello broke the protocol; the text names the field and the offending value.
    case invalidHello(String)
    /// Nothing arrived in time; the text says what was awaited.
    case timedOut(waitingFor: String)
    /// The peer closed the connection before sending a hello.
    case peerClosed
    /// The socket path cannot be listened on; the text says why.
    case unusableSocketPath(String)
    /// A descriptor that should be a userfaultfd is something else; the text says what it is.
    case notAUserfaultfd(String)
    /// A system call of the engine failed.
    case syscall(SyscallError)

    public var description: String {
        switch self {
        case .invalidHello(let why):
            return "rejected a uffd hand-over: \(why) (is the peer a libEpcopyPreload.so of this epcopy version?)"
        case .timedOut(let what):
            return "timed out waiting for \(what)"
        case .peerClosed:
            return "the shim closed its connection before sending a hello; its stderr has an 'epcopy-preload:' line"
                + " saying why"
        case .unusableSocketPath(let why):
            return "cannot listen for the shim: \(why)"
        case .notAUserfaultfd(let what):
            return "\(what) is not a userfaultfd"
        case .syscall(let error):
            return "uffd hand-over: \(error)\(Self.hint(for: error))"
        }
    }

    private static func hint(for error: SyscallError) -> String {
        guard error.call.hasPrefix("pidfd") else { return "" }
        switch error.errno {
        case EPERM, EACCES:
            return " (taking a descriptor from another process needs ptrace access to it: the same user with"
                + " kernel.yama.ptrace_scope allowing it, or CAP_SYS_PTRACE)"
        case ESRCH: return " (the process has exited)"
        case EBADF: return " (the process has no such descriptor open)"
        default: return ""
        }
    }
}

/// A userfaultfd and the RAM file received from the shim, with the facts it reported about its mapping.
/// Addresses are in the peer's address space, not the engine's: they are what uffd ioctls take.
public struct UffdHandover: ~Copyable, Sendable {
    /// The received userfaultfd (close-on-exec; its O_NONBLOCK is whatever the shim set, which is on).
    public let uffd: FileDescriptor
    /// The received guest-RAM file.
    public let memFile: FileDescriptor
    /// The process that owns the memory (checked against the connecting process's SO_PEERCRED pid).
    public let pid: Int32
    /// The uffd's descriptor number inside `pid`, for `UffdHandoverListener.takeOver(pid:remoteFD:)`.
    public let remoteUffdFD: Int32
    /// The RAM file's descriptor number inside `pid`.
    public let remoteMemFD: Int32
    /// Start of the registered range in `pid`'s address space; page aligned.
    public let hostVirtualAddress: UInt64
    /// Length of the registered range in bytes; page aligned, non-zero.
    public let length: UInt64
    /// Offset of the range's first byte in the RAM file; page aligned.
    public let fileOffset: UInt64
    public let registerMode: UffdRegisterMode
    /// Features the shim's UFFDIO_API enabled (as it reported them).
    public let features: UffdFeatures
    /// Ioctls UFFDIO_REGISTER allowed on the range (as the shim reported them).
    public let ioctls: UffdIoctls
    /// The RAM file's path as the shim's readlink saw it.
    public let path: String
}
