// The engine's end of the userfaultfd hand-over. The destination QEMU runs with libEpcopyPreload.so,
// which registers guest RAM with a uffd as QEMU maps it and sends that uffd, the RAM file and the
// mapping's facts here over a SOCK_SEQPACKET unix socket (wire format: CEpcopyHandover.h). Everything
// in the message is untrusted: the engine will write guest memory at addresses the peer named, so each
// field is checked before anyone acts on it. The takeover path (pidfd_getfd) lets a restarted engine
// pick up a uffd the shim still holds, because the shim never closes its copy.

import CEpcopyLinux
#if canImport(Glibc)
import Glibc
#endif

/// Accepts hand-overs from libEpcopyPreload.so on a unix socket. The socket file is created mode 0600
/// (only the engine's user may hand it memory) and removed when the listener goes away.
public final class UffdHandoverListener: Sendable {
    public let path: String
    private let socket: FileDescriptor
    /// Identity of the socket file this listener created, so deinit never removes someone else's.
    private let socketFile: (device: UInt64, inode: UInt64)

    /// What /proc/self/fd/N links to for a userfaultfd (anon_inode_getfd names it "[userfaultfd]").
    static let userfaultfdLink = "anon_inode:[userfaultfd]"

    /// Binds and listens on `path`. A stale socket file (nobody listening: connect gives ECONNREFUSED) is
    /// removed first; a live one, or a file that is not a socket, is left alone and reported.
    public init(path: String) throws(HandoverError) {
        try Self.removeStaleSocket(at: path)
        let raw = try Self.sys { () throws(SyscallError) in
            try Syscall.check("bind(\(path))") { Int(epc_unix_seqpacket_bind(path)) }
        }
        let socket = FileDescriptor(adopting: Int32(raw))
        var st = stat()
        do throws(SyscallError) {
            // Mode before listen(2): until then a connect(2) is refused (ECONNREFUSED), so no peer can slip
            // in under the umask's mode (man 7 unix: connecting needs write permission on the socket file).
            _ = try Syscall.check("chmod(\(path), 0600)") { Syscall.negErrno(Int(chmod(path, 0o600))) }
            _ = try Syscall.check("listen(\(path))") { Int(epc_listen(socket.rawValue, 16)) }
            _ = try Syscall.check("stat(\(path))") { Syscall.negErrno(Int(stat(path, &st))) }
        } catch {
            _ = unlink(path) // the file bind(2) just created
            throw .syscall(error)
        }
        self.path = path
        self.socket = socket
        self.socketFile = (UInt64(st.st_dev), UInt64(st.st_ino))
    }

    deinit {
        var st = stat()
        if lstat(path, &st) == 0, UInt64(st.st_dev) == socketFile.device, UInt64(st.st_ino) == socketFile.inode {
            _ = unlink(path)
        }
    }

    /// Waits up to `timeout` for one shim to connect and hand over, validates the hello and its two
    /// descriptors, and replies. On success the shim is told status 0 and the hand-over is returned; on a
    /// protocol violation the shim is told an errno (so it fails its mmap loudly) and the error is thrown.
    /// Either way the listener stays usable for the next connection.
    public func accept(timeout: Duration) throws(HandoverError) -> UffdHandover {
        let deadline = ContinuousClock.now + timeout
        let conn = try acceptConnection(deadline: deadline)
        do {
            let handover = try receiveHello(on: conn, deadline: deadline)
            // Only a shim that heard "accepted" keeps its mapping; if it gave up meanwhile (timeout, EPIPE)
            // the error is thrown and the descriptors close with `handover`.
            try Self.sendReply(on: conn, status: 0)
            return handover
        } catch let rejection as Rejection {
            try? Self.sendReply(on: conn, status: rejection.status)
            throw rejection.error
        } catch let error as HandoverError {
            // Best effort, so a shim that is merely slow fails with a reason rather than a closed socket.
            switch error {
            case .timedOut: try? Self.sendReply(on: conn, status: ETIMEDOUT)
            case .syscall(let failure): try? Self.sendReply(on: conn, status: failure.errno)
            default: break
            }
            throw error
        } catch {
            preconditionFailure("unexpected error \(error)")
        }
    }

    /// Whether a shim connects within `timeout` (then `accept` takes it at once): lets a caller wait in short
    /// steps, doing other things between them, without cutting a hand-over short.
    public func hasPendingConnection(within timeout: Duration) throws(HandoverError) -> Bool {
        do { try Self.waitReadable(socket.rawValue, until: ContinuousClock.now + timeout, waitingFor: "") } catch {
            if case .timedOut = error { return false }
            throw error
        }
        return true
    }

    /// Takes a duplicate of descriptor `remoteFD` of process `pid` with pidfd_getfd(2) and checks that it
    /// is a userfaultfd. This is how a new engine resumes serving faults after the old one died: the
    /// shim keeps its own uffd open, so the number in the hello stays valid for the life of the process.
    /// Needs ptrace access to `pid` (PTRACE_MODE_ATTACH_REALCREDS).
    ///
    /// After taking over, UFFDIO_WAKE every registered range once: a fault message is delivered only once,
    /// so faults whose messages the previous owner read but never resolved stay blocked and silent until
    /// their threads are woken, retry, and fault again (which queues a fresh message).
    public static func takeOver(pid: Int32, remoteFD: Int32) throws(HandoverError) -> FileDescriptor {
        let pidfdRaw = try sys { () throws(SyscallError) in
            try Syscall.check("pidfd_open(\(pid))") { Int(epc_pidfd_open(pid, 0)) }
        }
        let pidfd = FileDescriptor(adopting: Int32(pidfdRaw))
        // Not through Syscall.run: EBADF here means "the target has no such descriptor", a runtime answer
        // about another process, not a bad descriptor of ours (man 2 pidfd_getfd).
        var rc: Int32
        repeat {
            rc = epc_pidfd_getfd(pidfd.rawValue, remoteFD, 0)
        } while rc == -EINTR
        if rc < 0 { throw .syscall(SyscallError(call: "pidfd_getfd(pid \(pid), fd \(remoteFD))", errno: -rc)) }
        // pidfd_getfd sets close-on-exec on the new descriptor itself.
        let fd = FileDescriptor(adopting: rc)
        let link = linkTarget(of: fd.rawValue) ?? "(unreadable)"
        guard link == userfaultfdLink else {
            throw .notAUserfaultfd("descriptor \(remoteFD) of pid \(pid) (\(link))")
        }
        return fd
    }

    // MARK: - Steps

    /// A validation failure: the error to throw and the errno to tell the shim.
    private struct Rejection: Error {
        let status: Int32
        let error: HandoverError
        init(_ why: String, status: Int32 = EINVAL) {
            self.status = status
            self.error = .invalidHello(why)
        }
    }

    private func acceptConnection(deadline: ContinuousClock.Instant) throws(HandoverError) -> FileDescriptor {
        let what = "a shim to connect to \(path) (is the program running with LD_PRELOAD=libEpcopyPreload.so,"
            + " EPCOPY_SHIM_SOCKET=\(path) and an EPCOPY_SHIM_PREFIX matching its RAM file?)"
        while true {
            try Self.waitReadable(socket.rawValue, until: deadline, waitingFor: what)
            // The listener is non-blocking: a connection that was reset between poll and accept4 gives
            // EAGAIN (or ECONNABORTED) rather than a hang; go back to waiting.
            let outcome: SyscallOutcome<Int>
            do {
                outcome = try Syscall.run("accept4(\(path))") { Int(epc_accept_cloexec(socket.rawValue)) }
            } catch where error.errno == ECONNABORTED {
                continue
            } catch {
                throw .syscall(error)
            }
            guard case .done(let raw) = outcome else { continue }
            let conn = FileDescriptor(adopting: Int32(raw))
            // Accepted sockets do not inherit O_NONBLOCK (man 2 accept). Non-blocking, so a peer that never
            // reads cannot block the reply, and a poll that raced with nothing cannot block the receive.
            try Self.sys { () throws(SyscallError) in
                _ = try Syscall.check("fcntl(O_NONBLOCK)") {
                    Syscall.negErrno(Int(fcntl(conn.rawValue, F_SETFL, O_NONBLOCK | O_RDWR)))
                }
            }
            return conn
        }
    }

    private func receiveHello(on conn: borrowing FileDescriptor,
                              deadline: ContinuousClock.Instant) throws -> UffdHandover {
        var hello = epc_handover_hello()
        let helloSize = MemoryLayout<epc_handover_hello>.size
        // Room for one descriptor more than expected, so "3 descriptors" is reported as such; more than
        // that sets MSG_CTRUNC and epc_recv_with_fds closes them all and returns -EMSGSIZE.
        var fds: [Int32] = [-1, -1, -1]
        var nfds: Int32 = 0
        var received = 0
        while true {
            try Self.waitReadable(conn.rawValue, until: deadline, waitingFor: "the shim's hello on \(path)")
            let outcome: SyscallOutcome<Int>
            do {
                outcome = try Syscall.run("recvmsg(\(path))") {
                    // SAFETY: `hello` and `fds` outlive the call; the sizes passed are theirs.
                    withUnsafeMutableBytes(of: &hello) { buffer in
                        fds.withUnsafeMutableBufferPointer { fdBuffer in
                            epc_recv_with_fds(conn.rawValue, buffer.baseAddress, helloSize, fdBuffer.baseAddress,
                                              Int32(fdBuffer.count), &nfds)
                        }
                    }
                }
            } catch where error.errno == EMSGSIZE {
                throw Rejection("the hello is larger than \(helloSize) bytes or carries more than 3 descriptors",
                                status: EMSGSIZE)
            } catch {
                throw HandoverError.syscall(error)
            }
            if case .done(let n) = outcome {
                received = n
                break
            }
        }
        // Own what arrived before checking anything, so every early exit closes it. A third descriptor is
        // never used: closed right here.
        if nfds > 2 { _ = FileDescriptor(adopting: fds[2]) }
        let first: FileDescriptor? = nfds > 0 ? FileDescriptor(adopting: fds[0]) : nil
        let second: FileDescriptor? = nfds > 1 ? FileDescriptor(adopting: fds[1]) : nil

        if received == 0 { throw HandoverError.peerClosed }
        guard received == helloSize else {
            throw Rejection("the hello is \(received) bytes, expected \(helloSize)", status: EMSGSIZE)
        }
        guard hello.magic == EPC_HANDOVER_MAGIC else {
            throw Rejection("bad magic 0x\(String(hello.magic, radix: 16)), expected 0x"
                + String(EPC_HANDOVER_MAGIC, radix: 16), status: EPROTO)
        }
        guard Int32(hello.version) == EPC_HANDOVER_VERSION else {
            throw Rejection("protocol version \(hello.version), this engine speaks \(EPC_HANDOVER_VERSION)",
                            status: EPROTONOSUPPORT)
        }
        guard hello.flags == 0 else { throw Rejection("flags 0x\(String(hello.flags, radix: 16)) must be 0") }
        guard nfds == 2, let uffd = consume first, let memFile = consume second else {
            throw Rejection("expected 2 descriptors (the uffd and the RAM file), received \(nfds)")
        }

        let peer = try Self.sys { () throws(SyscallError) in
            try Syscall.check("getsockopt(SO_PEERCRED)") { Int(epc_peer_pid(conn.rawValue)) }
        }
        // The pid is what a takeover will use, so it must name the process that connected, in our pid
        // namespace (SO_PEERCRED translates it; a shim in another pid namespace reports its own view).
        guard hello.pid > 0, Int(hello.pid) == peer else {
            throw Rejection("pid \(hello.pid) is not the connecting process (pid \(peer))")
        }
        guard hello.uffd_fd >= 0, hello.mem_fd >= 0 else {
            throw Rejection("descriptor numbers \(hello.uffd_fd)/\(hello.mem_fd) must not be negative")
        }

        let page = UInt64(sysconf(Int32(_SC_PAGESIZE)))
        guard hello.length > 0 else { throw Rejection("length 0") }
        guard hello.length % page == 0 else { throw Rejection("length \(hello.length) is not page aligned") }
        guard hello.hva % page == 0 else {
            throw Rejection("address 0x\(String(hello.hva, radix: 16)) is not page aligned")
        }
        guard hello.file_offset % page == 0 else {
            throw Rejection("file offset \(hello.file_offset) is not page aligned")
        }
        let (end, addressOverflow) = hello.hva.addingReportingOverflow(hello.length)
        guard !addressOverflow, end <= 1 << 57 else {
            throw Rejection("range 0x\(String(hello.hva, radix: 16)) + \(hello.length) is not a user address")
        }
        let (fileEnd, fileOverflow) = hello.file_offset.addingReportingOverflow(hello.length)
        guard !fileOverflow, fileEnd <= UInt64(Int64.max) else {
            throw Rejection("file range \(hello.file_offset) + \(hello.length) overflows")
        }

        let mode = UffdRegisterMode(rawValue: UInt64(hello.reg_mode))
        let knownModes: UffdRegisterMode = [.missing, .writeProtect, .minor]
        guard knownModes.isSuperset(of: mode), mode.contains(.missing) else {
            throw Rejection("register mode 0x\(String(hello.reg_mode, radix: 16)) lacks MISSING or has unknown bits")
        }
        let ioctls = UffdIoctls(rawValue: hello.ioctls)
        guard ioctls.isSuperset(of: [.copy, .wake]), !mode.contains(.minor) || ioctls.contains(.continue) else {
            let faults = mode.contains(.minor) ? "MISSING and MINOR" : "MISSING"
            throw Rejection("the range's ioctls \(ioctls.names) cannot resolve \(faults) faults")
        }

        let path = try Self.decodePath(hello)

        let uffdLink = Self.linkTarget(of: uffd.rawValue) ?? "(unreadable)"
        guard uffdLink == Self.userfaultfdLink else {
            throw Rejection("descriptor 0 is \(uffdLink), not a userfaultfd")
        }
        var st = stat()
        try Self.sys { () throws(SyscallError) in
            _ = try Syscall.check("fstat(RAM file)") { Syscall.negErrno(Int(fstat(memFile.rawValue, &st))) }
        }
        guard st.st_mode & S_IFMT == S_IFREG else {
            throw Rejection("descriptor 1 (\(Self.linkTarget(of: memFile.rawValue) ?? "?")) is not a regular file")
        }
        guard UInt64(st.st_size) >= fileEnd else {
            throw Rejection("the RAM file is \(st.st_size) bytes, smaller than offset \(hello.file_offset) + length"
                + " \(hello.length)")
        }

        return UffdHandover(uffd: uffd, memFile: memFile, pid: hello.pid, remoteUffdFD: hello.uffd_fd,
                            remoteMemFD: hello.mem_fd, hostVirtualAddress: hello.hva, length: hello.length,
                            fileOffset: hello.file_offset, registerMode: mode,
                            features: UffdFeatures(rawValue: hello.features), ioctls: ioctls, path: path)
    }

    private static func decodePath(_ hello: epc_handover_hello) throws(Rejection) -> String {
        var hello = hello
        // SAFETY: reads only within the fixed-size `path` array of the local copy.
        let bytes: [UInt8] = withUnsafeBytes(of: &hello.path) { Array($0) }
        guard let nul = bytes.firstIndex(of: 0) else {
            throw Rejection("path is not NUL-terminated within \(bytes.count) bytes")
        }
        guard nul > 0 else { throw Rejection("path is empty") }
        guard let path = String(validating: bytes[..<nul], as: UTF8.self) else {
            throw Rejection("path is not valid UTF-8")
        }
        return path
    }

    // MARK: - Helpers

    private static func sendReply(on conn: borrowing FileDescriptor, status: Int32) throws(HandoverError) {
        var reply = epc_handover_reply(magic: EPC_HANDOVER_MAGIC, status: status)
        try sys { () throws(SyscallError) in
            let outcome = try Syscall.run("sendmsg(reply)") {
                // SAFETY: `reply` outlives the call; no descriptors are sent.
                withUnsafeBytes(of: &reply) {
                    epc_send_with_fds(conn.rawValue, $0.baseAddress, $0.count, nil, 0)
                }
            }
            // A full queue on an 8-byte reply means the peer never reads: treat it as gone.
            if case .wouldBlock = outcome { throw SyscallError(call: "sendmsg(reply)", errno: EAGAIN) }
        }
    }

    /// poll(2) for POLLIN until `deadline`. POLLHUP/POLLERR also return, so the next read reports them.
    private static func waitReadable(_ fd: Int32, until deadline: ContinuousClock.Instant,
                                     waitingFor what: @autoclosure () -> String) throws(HandoverError) {
        while true {
            let remaining = deadline - ContinuousClock.now
            guard remaining > .zero else { throw .timedOut(waitingFor: what()) }
            let (seconds, attoseconds) = remaining.components
            let millis = Int32(clamping: seconds * 1000 + (attoseconds + 999_999_999_999_999) / 1_000_000_000_000_000)
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let ready = try sys { () throws(SyscallError) in
                try Syscall.check("poll") { Syscall.negErrno(Int(poll(&pfd, 1, max(millis, 1)))) }
            }
            if ready > 0 { return }
        }
    }

    private static func removeStaleSocket(at path: String) throws(HandoverError) {
        var st = stat()
        if lstat(path, &st) != 0 {
            let err = errno
            if err == ENOENT { return }
            throw .syscall(SyscallError(call: "lstat(\(path))", errno: err))
        }
        guard st.st_mode & S_IFMT == S_IFSOCK else {
            throw .unusableSocketPath("\(path) exists and is not a socket; not removing it")
        }
        switch probe(path) {
        case ECONNREFUSED:
            // Nobody is bound to it any more: the file is left over from an engine that died.
            try sys { () throws(SyscallError) in
                _ = try Syscall.check("unlink(\(path))") { Syscall.negErrno(Int(unlink(path))) }
            }
        case 0, EAGAIN:
            throw .unusableSocketPath("another process is listening on \(path)")
        case let err:
            throw .unusableSocketPath("\(path) is a socket that cannot be probed: \(Errno.name(err)) "
                + "(\(Errno.message(err)))")
        }
    }

    /// Connects to `path` without blocking and returns 0 (someone listens), or the errno. A full backlog
    /// gives EAGAIN on a non-blocking unix connect (man 7 unix), which also means someone listens.
    private static func probe(_ path: String) -> Int32 {
        let raw = Glibc.socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_NONBLOCK.rawValue)
            | Int32(SOCK_CLOEXEC.rawValue), 0)
        if raw < 0 { return errno }
        let fd = FileDescriptor(adopting: raw)
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard bytes.count < capacity else { return ENAMETOOLONG }
        // SAFETY: copies at most capacity-1 bytes into sun_path; the rest stays zero (NUL-terminated).
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: bytes) }
        let length = socklen_t(MemoryLayout<sockaddr_un>.offset(of: \.sun_path)! + bytes.count + 1)
        var rc: Int32
        repeat {
            // SAFETY: `addr` is a sockaddr_un of at least `length` bytes, alive for the call.
            rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd.rawValue, $0, length) }
            }
        } while rc < 0 && errno == EINTR
        return rc == 0 ? 0 : errno
    }

    static func linkTarget(of fd: Int32) -> String? {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/fd/\(fd)", &buffer, buffer.count)
        guard n >= 0 else { return nil }
        return String(decoding: buffer[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Runs syscall-layer code and wraps its typed error.
    @inline(__always)
    private static func sys<T>(_ body: () throws(SyscallError) -> T) throws(HandoverError) -> T {
        do {
            return try body()
        } catch {
            throw .syscall(error)
        }
    }
}
