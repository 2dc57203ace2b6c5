// Owners for kernel resources. A descriptor or mapping is closed exactly once, by whoever owns it
// last: the types are ~Copyable, so the compiler refuses a second owner. Raw values cross threads as
// integers, never as pointers.

import CEpcopyLinux
#if canImport(Glibc)
import Glibc
#endif

/// An open file descriptor, closed when its owner goes away.
public struct FileDescriptor: ~Copyable, Sendable {
    public let rawValue: Int32

    /// Takes ownership of `rawValue`; the caller must not close it.
    public init(adopting rawValue: Int32) {
        precondition(rawValue >= 0, "FileDescriptor(adopting: \(rawValue))")
        self.rawValue = rawValue
    }

    /// Gives up ownership without closing (e.g. when handing the descriptor to another process).
    public consuming func release() -> Int32 {
        let raw = rawValue
        discard self
        return raw
    }

    /// A second descriptor for the same open file (close-on-exec).
    public func duplicate() throws(SyscallError) -> FileDescriptor {
        let raw = rawValue
        let fd = try Syscall.check("fcntl(F_DUPFD_CLOEXEC)") { Syscall.negErrno(Int(fcntl(raw, F_DUPFD_CLOEXEC, 0))) }
        return FileDescriptor(adopting: Int32(fd))
    }

    deinit {
        // close(2) must not be retried on EINTR on Linux: the descriptor is gone either way.
        _ = Glibc.close(rawValue)
    }

    /// open(2) with O_CLOEXEC always set.
    public static func open(_ path: String, _ flags: Int32, mode: mode_t = 0o600) throws(SyscallError) -> FileDescriptor {
        let fd = try Syscall.check("open(\(path))") { Syscall.negErrno(Int(Glibc.open(path, flags | O_CLOEXEC, mode))) }
        return FileDescriptor(adopting: Int32(fd))
    }

    /// memfd_create(2): anonymous shared memory, as tests and probes use for a stand-in RAM file.
    public static func memfd(name: String) throws(SyscallError) -> FileDescriptor {
        let fd = try Syscall.check("memfd_create(\(name))") { Int(epc_memfd_create(name, UInt32(MFD_CLOEXEC))) }
        return FileDescriptor(adopting: Int32(fd))
    }

    public func truncate(to size: UInt64) throws(SyscallError) {
        _ = try Syscall.check("ftruncate") { Syscall.negErrno(Int(ftruncate(rawValue, off_t(size)))) }
    }

    /// Returns memory to the host: the range reads as zeros afterwards and no longer counts in RSS.
    public func punchHole(offset: UInt64, length: UInt64) throws(SyscallError) {
        _ = try Syscall.check("fallocate(PUNCH_HOLE)") {
            Int(epc_fallocate(rawValue, EPC_FALLOC_PUNCH_HOLE, Int64(offset), Int64(length)))
        }
    }

    /// Reads up to `count` bytes; `.wouldBlock` on a non-blocking descriptor with nothing to read.
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(SyscallError) -> SyscallOutcome<Int> {
        try Syscall.run("read") { Syscall.negErrno(Glibc.read(rawValue, buffer.baseAddress, buffer.count)) }
    }

    public func write(_ buffer: UnsafeRawBufferPointer) throws(SyscallError) -> SyscallOutcome<Int> {
        try Syscall.run("write") { Syscall.negErrno(Glibc.write(rawValue, buffer.baseAddress, buffer.count)) }
    }
}

/// A shared mapping of a file, unmapped when its owner goes away.
public struct MemoryMapping: ~Copyable, Sendable {
    /// Start address as an integer, so it can be handed to other threads and to the kernel.
    public let address: UInt
    public let length: Int

    public init(file: borrowing FileDescriptor, length: Int, offset: UInt64 = 0,
                protection: Int32 = PROT_READ | PROT_WRITE, flags: Int32 = MAP_SHARED) throws(SyscallError) {
        var mapped: UnsafeMutableRawPointer?
        let fd = file.rawValue
        _ = try Syscall.check("mmap") {
            let p = mmap(nil, length, protection, flags, fd, off_t(offset))
            if p == MAP_FAILED { return -Int(errno) }
            mapped = p
            return 0
        }
        self.address = UInt(bitPattern: mapped)
        self.length = length
    }

    /// SAFETY: valid while this mapping is alive; callers must not keep it beyond the owner's lifetime.
    public var pointer: UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: address)! }

    deinit {
        _ = munmap(UnsafeMutableRawPointer(bitPattern: address), length)
    }
}
